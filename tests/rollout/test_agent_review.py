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


def test_an_environment_that_raises_in_reset_isolates_its_episodes(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_multi_turn import ALPHABET, ScriptedCalc, ScriptedEngine

    from offpolicy.data.arithmetic import Task
    from offpolicy.rewards.exact_match import exact_match
    from offpolicy.rewards.guard import GuardedReward
    from offpolicy.rollout.multi_turn import MultiTurn
    from offpolicy.rollout.workflow import Sampling
    from offpolicy.train.tiny import build_tokenizer

    class ResetFailsOnB(ScriptedCalc):
        async def reset(self, task):
            if task.task_id == "b":
                raise KeyError("meta")
            return ""

    tok = build_tokenizer(ALPHABET)
    engine = ScriptedEngine(tok, ["[12*3]", "36<eos>"])
    tasks = [Task("a", "12*3=", "36"), Task("b", "2*3=", "6")]
    exps = MultiTurn(ResetFailsOnB)(engine, tok, tasks, GuardedReward(exact_match, timeout_s=None),
                                    sampling=Sampling(group_size=2))
    a, b = exps[:2], exps[2:]
    assert [e.reward for e in a] == [1.0, 1.0] and all(e.response_mask.sum() > 0 for e in a)
    assert all(e.info["reward_fault"] == "env_exception" and e.response_mask.sum() == 0 for e in b)
    assert all(len(e.response_ids) == 0 and e.prompt_ids.tolist() == tok("2*3=")["input_ids"] for e in b)
    assert engine.calls[0]["prompts"] == [tok("12*3=")["input_ids"]]  # the failed episodes are not sampled
    assert "the environment raised on task b in reset" in capsys.readouterr().err


def _tuple_keyed(n: int) -> dict:
    """A result JSON cannot hold.

    Args:
        n: How many entries.
    """
    return {(i, i): i for i in range(n)}


def test_a_tool_result_json_cannot_hold_is_an_exception_result_not_a_raise():
    from offpolicy.rollout.tools import Tool, ToolCall, run_tool_calls

    tool = Tool.from_function(_tuple_keyed, in_process=True)
    (res,) = run_tool_calls([ToolCall("_tuple_keyed", {"n": 2})], {"_tuple_keyed": tool}, timeout_s=None)
    assert not res.ok and res.kind == "exception" and res.text.startswith("TypeError: keys must be str")
