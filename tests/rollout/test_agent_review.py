"""Regression tests from a review of the agents half: a model's turn never makes an environment raise, and an
environment that raises in ``reset`` is isolated to its own episodes."""

import pytest

from offpolicy.rollout.tool_parsers import HermesFormat


@pytest.mark.parametrize("body", ["[" * 5000, '{"name": "add", "arguments": "' + "[" * 5000 + '"}'])
def test_hermes_deeply_nested_call_is_malformed_not_an_exception(body):
    # json.loads raises RecursionError (not JSONDecodeError) from about 1000 nested brackets: a degenerate
    # turn must become a 'malformed' observation, not an exception that makes the episode inert
    calls, err = HermesFormat().parse(f"<tool_call>{body}</tool_call>")
    assert calls == [] and err.startswith("malformed tool call (call 1:")
