import pytest

from offpolicy.rewards import exact_match, parse_final_integer


@pytest.mark.parametrize("text, value", [
    ("85", 85), (" 85", 85), ("-12", -12), ("085", 85), ("x=7.", 7), ("3 then 41", 41),
    ("1,000", 1000), ("1,2", 2), ("", None), ("abc", None), (None, None), ("+-", None), ("--3", -3),
    ("12.5", None), ("0.75", None), ("-3.25", None), ("12.0", 12), ("7.00.", 7), ("2.5 then 8", 8),
])
def test_parse_final_integer(text, value):
    assert parse_final_integer(text) == value


def test_exact_match():
    assert exact_match("85", "85") == 1.0
    assert exact_match("84", "85") == 0.0
    assert exact_match("", "85") == 0.0
    assert exact_match("-53", "-53") == 1.0
    assert exact_match("53", "-53") == 0.0
    assert exact_match("the answer is 1,000", "1000") == 1.0
    assert exact_match("the answer is 12.5", "5") == 0.0  # not the digits after the point
    assert exact_match("0.75", "75") == 0.0
