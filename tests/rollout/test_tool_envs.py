"""Tool environments: the calculator tool and env, ToolEnv episodes and their info, the python env, and
the smoke Qwen2 model's chat template with tools (Hermes style, as Qwen2.5's)."""

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from offpolicy.rollout.env import ENVS, Env, make_env_factory
from offpolicy.rollout.envs.calculator import CALCULATOR, MAX_DIGITS, calculator
from offpolicy.rollout.tool_env import TOOL_ERROR_KINDS, ToolEnv
from offpolicy.rollout.tool_parsers import HermesFormat
from offpolicy.rollout.tools import Tool, ToolCall, ToolError


def task(prompt="482*77=", answer="37114"):
    return SimpleNamespace(task_id="t0", prompt=prompt, answer=answer)


def episode(env, turns, t=None):
    """Run ``turns`` (model texts) through ``env``; the list of StepResults."""
    async def go():
        assert await env.reset(t or task()) == ""
        return [await env.step(a) for a in turns]

    return asyncio.run(go())


def errors(info):
    return {k.split("/", 1)[1]: v for k, v in info.items() if k.startswith("tool_errors/") and v}


# ---------------------------------------------------------------------------------------------------
# The calculator tool


@pytest.mark.parametrize("expr, want", [
    ("482*77", "37114"), ("1+2*3", "7"), ("(1+2)*3", "9"), ("-5+2", "-3"), ("7//2", "3"), ("-7//2", "-4"),
    ("7%3", "1"), ("12/4", "3"), ("2**10", "1024"), (" 3 - 10 ", "-7"), ("--4", "4"),
])
def test_calculator_values(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr, why", [
    ("1//0", "division by zero"), ("5%0", "division by zero"), ("7/2", "not an integer"),
    ("9**999999999", "too large"), ("10**100", "too large"), ("9" * 101, "too large"),
    ("1.5*2", "only integers"), ("x+1", "only integers"), ("__import__('os')", "only integers"),
    ("2**-1", "negative"), ("(" * 150 + "1" + ")" * 150, "longer than"), ("482*", "cannot parse"),
    ("", "cannot parse"), ("True+1", "only integers"),
])
def test_calculator_refusals(expr, why):
    with pytest.raises(ToolError, match=why):
        calculator(expr)


def test_calculator_bound_is_on_digits():
    assert calculator("10**99") == "1" + "0" * 99
    with pytest.raises(ToolError, match=f"more than {MAX_DIGITS} digits"):
        calculator("10**50*10**50")  # each factor is fine, the product is not


@pytest.mark.timing
def test_a_huge_power_is_refused_quickly():
    start = time.monotonic()
    with pytest.raises(ToolError):
        calculator("99999**99999**99999")
    assert time.monotonic() - start < 2.0  # refused from the operands' sizes (~1 ms); computing it never ends


# ---------------------------------------------------------------------------------------------------
# Calculator env (compact, the bundled agent's format)


def test_calculator_env_is_registered_and_compact_by_default():
    env = make_env_factory("calculator")()
    assert isinstance(env, Env) and isinstance(env, ToolEnv) and "calculator" in ENVS
    assert env.stop == ("]",) and not env.chat and env.tools == [CALCULATOR.schema]
    assert env.tools[0]["function"]["name"] == "calculator"


def test_compact_episode_call_then_answer():
    env = make_env_factory("calculator")()
    first, last = episode(env, ["[482*77]", "37114"])
    assert (first.observation, first.done, first.reward, first.role) == ("{37114}", False, 0.0, "tool")
    assert first.info["tool_calls"] == 1 and errors(first.info) == {} and first.info["env_s"] >= 0
    assert set(first.info) == {"tool_calls", "env_s", *(f"tool_errors/{k}" for k in TOOL_ERROR_KINDS)}
    assert last.done and last.reward == 1.0 and last.info["success"] is True and last.info["tool_calls"] == 0
    assert "reward_fault" not in last.info


def test_compact_errors_are_shown_as_question_marks_and_counted():
    env = make_env_factory("calculator")()
    steps = episode(env, ["[5//0]", "1]", "[2**999]", "37000"])
    assert [s.observation for s in steps[:3]] == ["{?}", "{?}", "{?}"]
    assert [errors(s.info) for s in steps[:3]] == [{"exception": 1}, {"malformed": 1}, {"exception": 1}]
    assert steps[1].info["tool_calls"] == 0  # a malformed call is not a call
    assert steps[3].done and steps[3].reward == 0.0 and steps[3].info["success"] is False
    (cut,) = episode(make_env_factory("calculator")(), ["[482*7"])  # EOS or the token limit inside a call
    assert cut.done and cut.reward == 0.0


def test_compact_answer_is_what_follows_the_last_brace():
    env = make_env_factory("calculator")()
    assert episode(env, ["{37114}37114"])[0].reward == 1.0
    env = make_env_factory("calculator")()
    assert episode(env, ["37114+0"])[0].reward == 0.0  # exact, not the last integer


def test_calculator_env_in_hermes_format():
    env = make_env_factory("calculator", format="hermes")()
    assert env.stop == () and env.chat and env.tools == [CALCULATOR.schema]
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "482*77"}}\n</tool_call>'
    first, last = episode(env, [call, "482*77 = 37114"])
    assert first.observation == "37114" and not first.done
    assert last.done and last.reward == 1.0
    with pytest.raises(ValueError, match="format must be one of"):
        make_env_factory("calculator", format="json")()


# ---------------------------------------------------------------------------------------------------
# ToolEnv with user tools and rewards


def echo(text: str) -> str:
    """Echo.

    Args:
        text: The text.
    """
    return text


def test_tool_env_counts_hermes_errors_and_caps_calls_per_turn():
    env = ToolEnv([Tool.from_function(echo, in_process=True)], HermesFormat(), lambda a, t: float(a == t),
                  max_calls_per_turn=2)
    call = '<tool_call>{"name": "%s", "arguments": %s}</tool_call>'
    turn = (call % ("echo", '{"text": "a"}') + call % ("nope", "{}") + call % ("echo", '{"text": "c"}')
            + "<tool_call>{oops}</tool_call>")
    first, last = episode(env, [turn, "37114"])
    assert first.info["tool_calls"] == 3
    assert errors(first.info) == {"unknown_tool": 1, "too_many_calls": 1, "malformed": 1}
    parts = first.observation.split("\n</tool_response>\n<tool_response>\n")
    assert parts[0] == "a" and parts[1].startswith("Error: unknown tool 'nope'")
    assert parts[2] == "Error: not run: at most 2 tool calls per turn"
    assert parts[3].startswith("Error: malformed tool call (call 4: invalid JSON")
    assert last.reward == 1.0 and last.info["success"] is True


def test_a_raising_reward_gives_zero_and_a_fault():
    def bad_reward(answer, truth):
        raise RuntimeError("reward bug")

    env = ToolEnv([Tool.from_function(echo, in_process=True)], HermesFormat(), bad_reward)
    (last,) = episode(env, ["37114"])
    assert last.done and last.reward == 0.0 and last.info["reward_fault"] == "exception"
    assert last.info["success"] is False
    env = ToolEnv([Tool.from_function(echo, in_process=True)], HermesFormat(), lambda a, t: float("nan"))
    assert episode(env, ["x"])[0].info["reward_fault"] == "non_finite"


def test_step_after_the_end_is_a_workflow_bug():
    env = make_env_factory("calculator")()
    episode(env, ["1"])
    with pytest.raises(RuntimeError, match="after the episode ended"):
        asyncio.run(env.step("2"))


def test_concurrent_episodes_share_nothing():
    factory = make_env_factory("calculator")

    async def one(a, b):
        env = factory()
        await env.reset(task(f"{a}*{b}=", str(a * b)))
        obs = await env.step(f"[{a}*{b}]")
        return obs.observation, (await env.step(obs.observation[1:-1])).reward

    async def many():
        return await asyncio.gather(*(one(a, 7) for a in range(100, 120)))

    assert asyncio.run(many()) == [("{%d}" % (a * 7), 1.0) for a in range(100, 120)]


# ---------------------------------------------------------------------------------------------------
# Python env (sandboxed code, math reward)


@pytest.mark.timing
def test_python_env_runs_code_in_the_sandbox_and_scores_with_math_reward():
    env = make_env_factory("python", timeout_s=2.0)()
    assert env.stop == () and env.chat and list(env.tools[0]["function"]["parameters"]["properties"]) == ["code"]
    call = '<tool_call>\n{"name": "python", "arguments": {"code": %s}}\n</tool_call>'
    ok, err, slow, last = episode(env, [call % '"print(12*3)"', call % '"1/0"', call % '"while True: pass"',
                                        "So the answer is 36."], task("q", "some work\n#### 36"))
    assert ok.observation == "36\n" and errors(ok.info) == {}
    assert err.observation.startswith("Error: Traceback") and "ZeroDivisionError: division by zero" in err.observation
    assert '"<string>"' not in err.observation and "offpolicy_exec_" not in err.observation
    assert errors(err.info) == {"exception": 1}
    assert slow.observation == "Error: timed out after 2 s" and slow.info["env_s"] < 5
    assert last.done and last.reward == 1.0


# ---------------------------------------------------------------------------------------------------
# The smoke model's chat template with tools (Qwen2.5 / Hermes layout)


@pytest.fixture(scope="module")
def smoke_tokenizer(smoke_model_dir):
    from offpolicy.rollout.model import load_tokenizer

    return load_tokenizer(str(smoke_model_dir))


def test_plain_messages_render_as_before(smoke_tokenizer):
    msgs = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}]
    text = smoke_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>assistant\n")


def test_tools_schema_in_the_prompt_and_a_call_round_trips(smoke_tokenizer):
    tok = smoke_tokenizer
    msgs = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "482*77?"}]
    prompt = tok.apply_chat_template(msgs, tools=[CALCULATOR.schema], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nUse the calculator.\n\n# Tools\n\n")
    assert "<tools>\n" + json.dumps(CALCULATOR.schema, ensure_ascii=False) + "\n</tools>" in prompt
    assert prompt.count("Use the calculator.") == 1  # the system message is not repeated
    assert prompt.endswith("<|im_end|>\n<|im_start|>user\n482*77?<|im_end|>\n<|im_start|>assistant\n")

    call = {"name": "calculator", "arguments": {"expression": "482*77"}}
    chat = msgs + [{"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": call}]},
                   {"role": "tool", "content": "37114"}]
    full = tok.apply_chat_template(chat, tools=[CALCULATOR.schema], add_generation_prompt=True, tokenize=False)
    assert full.startswith(prompt)  # the prompt the model saw is a prefix
    turn = full[len(prompt):].split("<|im_end|>")[0]  # what the model wrote in its call turn
    assert turn == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "482*77"}}\n</tool_call>'
    assert HermesFormat().parse(turn) == ([ToolCall("calculator", {"expression": "482*77"})], None)
    assert full.endswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n37114\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert tok.decode(tok(full)["input_ids"]) == full

    # an env observation for several results renders exactly as one tool message per result
    env = make_env_factory("calculator", format="hermes")()
    (obs,) = episode(env, [turn + "\n" + turn.replace("482*77", "1//0")])
    one = tok.apply_chat_template(chat[:-1] + [{"role": "tool", "content": obs.observation}], tokenize=False)
    two = tok.apply_chat_template(chat[:-1] + [{"role": "tool", "content": "37114"},
                                               {"role": "tool", "content": "Error: division by zero"}],
                                  tokenize=False)
    assert one == two


def test_instant_tools_run_on_the_event_loop_and_others_in_a_thread():
    """An ``instant`` tool is called on the episode's event loop (no thread hand-off); any other in-process
    tool in a thread, so that a slow call overlaps the other episodes'; a call mixing both goes to a thread."""
    import threading

    seen = []

    def fast(text: str) -> str:
        """Where it ran.

        Args:
            text: Ignored.
        """
        seen.append(threading.current_thread() is threading.main_thread())
        return text

    def slow(text: str) -> str:
        """Where it ran.

        Args:
            text: Ignored.
        """
        return fast(text)

    call = '<tool_call>{"name": "%s", "arguments": {"text": "a"}}</tool_call>'
    env = ToolEnv([Tool.from_function(fast, in_process=True, instant=True), Tool.from_function(slow, in_process=True)],
                  HermesFormat(), lambda a, t: 0.0)
    episode(env, [call % "fast", call % "slow", call % "fast" + call % "slow", "done"])
    assert seen == [True, False, False, False]
    assert CALCULATOR.instant and CALCULATOR.in_process
    with pytest.raises(ValueError, match="instant=True needs in_process=True"):
        Tool.from_function(echo, instant=True)
