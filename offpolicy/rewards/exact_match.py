"""Exact-match reward on the parsed final integer answer."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")  # a decimal is one number: "12.5" is not the integer 5


def parse_final_integer(response: str) -> int | None:
    """The last integer in ``response`` (``"-12"``, ``" 85"``, ``"x=7."`` -> 7), or None if there is none.

    Thousands separators are removed first (``"1,000"`` -> 1000). A final number with a fractional part is no
    integer (``"12.5"`` -> None, not 5); zeros after the point are allowed (``"12.0"`` -> 12).
    """
    matches = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response or ""))
    if not matches:
        return None
    whole, _, fraction = matches[-1].partition(".")
    return None if fraction.strip("0") else int(whole)


def exact_match(response: str, ground_truth: str) -> float:
    """1.0 if the final integer of ``response`` equals ``ground_truth`` (an integer string), else 0.0."""
    got, want = parse_final_integer(response), parse_final_integer(ground_truth)
    return float(got is not None and got == want)
