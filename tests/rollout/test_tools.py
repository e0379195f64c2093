"""Tools: schemas from functions, argument checks, fault isolation with real time-outs; the hermes and
compact call formats."""

import json
import os
import time

import pytest

from offpolicy.rollout.tool_parsers import CompactFormat, HermesFormat, make_format
from offpolicy.rollout.tools import Tool, ToolCall, ToolError, ToolResult, check_arguments, run_tool_calls


# Module-level, so that they pickle by reference into the worker process.
def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def shout(text: str, times: int = 1) -> str:
    """Repeat text in capitals.

    Args:
        text: What to shout.
        times: How often.
    """
    return " ".join([text.upper()] * times)


def broken(x: str) -> str:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise KeyError("no such key")


def polite_failure(x: str) -> str:
    """Fails with a message for the model.

    Args:
        x: Ignored.
    """
    raise ToolError(f"cannot handle {x}")


def hang(x: str) -> str:
    """Never returns in time.

    Args:
        x: Ignored.
    """
    time.sleep(60)
    return "late"


def pid(x: str) -> str:
    """The process it runs in.

    Args:
        x: Ignored.
    """
    return str(os.getpid())


def exits(x: str) -> str:
    """Takes its process down.

    Args:
        x: Ignored.
    """
    os._exit(3)


def tools(*fns, in_process=False):
    return {t.name: t for t in (Tool.from_function(f, in_process=in_process) for f in fns)}


# ---------------------------------------------------------------------------------------------------
# Schemas and argument checks


def test_schema_comes_from_signature_and_docstring():
    tool = Tool.from_function(add)
    assert tool.name == "add" and tool.fn is add and not tool.in_process
    fn = tool.schema["function"]
    assert tool.schema["type"] == "function" and fn["name"] == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"] == {"a": {"type": "integer", "description": "The first number."},
                                              "b": {"type": "integer", "description": "The second number."}}
    assert fn["parameters"]["required"] == ["a"]  # b has a default


def test_bound_settings_are_hidden_from_the_model_and_checked():
    tool = Tool.from_function(shout, bound={"times": 2})
    assert list(tool.schema["function"]["parameters"]["properties"]) == ["text"]
    assert run_tool_calls([ToolCall("shout", {"text": "hi"})], {"shout": tool}, timeout_s=None) == [
        ToolResult(True, "HI HI")]
    with pytest.raises(ValueError, match="tims"):
        Tool.from_function(shout, bound={"tims": 2})


def test_a_tool_that_cannot_reach_a_worker_is_refused_at_setup():
    def local(x: str) -> str:
        """Local.

        Args:
            x: Ignored.
        """
        return x

    with pytest.raises(ValueError, match="module-level"):
        Tool.from_function(local)
    assert Tool.from_function(local, in_process=True).in_process


def test_check_arguments():
    schema = Tool.from_function(add).schema
    assert check_arguments({"a": 1}, schema) is None
    assert check_arguments({"a": 1, "b": 2}, schema) is None
    assert "missing required argument 'a'" in check_arguments({"b": 2}, schema)
    assert "unknown argument 'c'" in check_arguments({"a": 1, "c": 2}, schema)
    assert "must be integer, got str" in check_arguments({"a": "1"}, schema)
    assert "must be integer, got bool" in check_arguments({"a": True}, schema)  # JSON true is not a number
    assert "must be integer, got float" in check_arguments({"a": 1.5}, schema)
    assert "JSON object" in check_arguments([1], schema)


# ---------------------------------------------------------------------------------------------------
# Running calls


def test_faults_become_error_results_in_call_order():
    ts = tools(add, broken, polite_failure)
    out = run_tool_calls([ToolCall("add", {"a": 2, "b": 3}), ToolCall("nope", {}), ToolCall("add", {"a": "2"}),
                          ToolCall("broken", {"x": "1"}), ToolCall("polite_failure", {"x": "that"})],
                         ts, timeout_s=30)
    assert out[0] == ToolResult(True, "5")  # non-string results are sent as JSON text
    assert out[1].kind == "unknown_tool" and not out[1].ok
    assert "'nope'" in out[1].text and "['add', 'broken', 'polite_failure']" in out[1].text
    assert out[2].kind == "bad_arguments" and "'a' must be integer" in out[2].text
    assert out[3] == ToolResult(False, "KeyError: 'no such key'", "exception")
    assert out[4] == ToolResult(False, "cannot handle that", "exception")


def test_in_process_tools_catch_exceptions_too():
    out = run_tool_calls([ToolCall("broken", {"x": ""}), ToolCall("add", {"a": 1})],
                         tools(broken, add, in_process=True), timeout_s=1)
    assert out == [ToolResult(False, "KeyError: 'no such key'", "exception"), ToolResult(True, "2")]


@pytest.mark.timing
def test_a_hanging_tool_is_stopped_and_the_next_call_still_works():
    ts = tools(hang, pid, add)
    before = run_tool_calls([ToolCall("pid", {"x": ""})], ts, timeout_s=30)[0]  # warm a worker up
    assert before.ok and int(before.text) != os.getpid()
    start = time.monotonic()
    out = run_tool_calls([ToolCall("hang", {"x": ""})], ts, timeout_s=1.0)
    took = time.monotonic() - start
    assert out == [ToolResult(False, "hang did not return within 1 s", "timeout")]
    assert 1.0 <= took < 10.0, took  # stopped at its 1 s limit (the tool sleeps far longer); slack for a loaded CI
    with pytest.raises(ProcessLookupError):  # the worker that ran it was killed, not left sleeping
        os.kill(int(before.text), 0)
    assert run_tool_calls([ToolCall("add", {"a": 41})], ts, timeout_s=30) == [ToolResult(True, "42")]


def test_a_tool_that_kills_its_process_is_an_exception_and_the_next_call_works():
    ts = tools(exits, add)
    out = run_tool_calls([ToolCall("exits", {"x": ""}), ToolCall("add", {"a": 1, "b": 1})], ts, timeout_s=30)
    assert out == [ToolResult(False, "exits crashed its process", "exception"), ToolResult(True, "2")]


def test_a_warm_worker_is_reused():
    ts = tools(pid)
    pids = {run_tool_calls([ToolCall("pid", {"x": ""})], ts, timeout_s=30)[0].text for _ in range(3)}
    assert len(pids) == 1


# ---------------------------------------------------------------------------------------------------
# Formats


def test_hermes_parses_one_and_two_calls():
    h = HermesFormat()
    one = 'Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert h.parse(one) == ([ToolCall("add", {"a": 2, "b": 3})], None)
    two = ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
           '<tool_call>{"name": "shout", "arguments": "{\\"text\\": \\"hi\\"}"}</tool_call>')  # arguments as a string
    assert h.parse(two) == ([ToolCall("add", {"a": 1}), ToolCall("shout", {"text": "hi"})], None)
    assert h.parse("The answer is 5.") == ([], None)
    assert h.stop == ()


def test_hermes_malformed_calls_are_errors_not_exceptions():
    h = HermesFormat()
    calls, err = h.parse('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>')
    assert calls == [] and err.startswith("malformed tool call (call 1: invalid JSON (Expecting property name")
    calls, err = h.parse('<tool_call>{"arguments": {"a": 1}}</tool_call>')
    assert calls == [] and "call 1: missing 'name'" in err
    # a good call is kept beside a bad one; the bad one is reported
    calls, err = h.parse('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
                         '<tool_call>[1, 2]</tool_call>')
    assert calls == [ToolCall("add", {"a": 1})] and "call 2: expected a JSON object" in err
    calls, err = h.parse('<tool_call>{"name": "add", "arguments": {"a": 1}}')
    assert calls == [] and "<tool_call> without </tool_call>" in err
    calls, err = h.parse('<tool_call>{"name": "add", "arguments": [1]}</tool_call>')
    assert "'arguments' must be a JSON object" in err


def test_hermes_renders_results_as_tool_message_content():
    h = HermesFormat()
    assert h.render_result([ToolResult(True, "5")]) == "5"
    joined = h.render_result([ToolResult(True, "5"), ToolResult(False, "boom", "exception")])
    assert joined == "5\n</tool_response>\n<tool_response>\nError: boom"
    assert h.final_answer("  The answer is 5.\n") == "The answer is 5."


def test_compact_parse_and_render():
    c = make_format("compact", [Tool.from_function(shout, bound={"times": 1})])
    assert isinstance(c, CompactFormat) and c.stop == ("]",)
    assert c.parse("[482*77]") == ([ToolCall("shout", {"text": "482*77"})], None)
    assert c.parse("12[3+4]") == ([ToolCall("shout", {"text": "3+4"})], None)
    assert c.parse("37114") == ([], None)
    assert c.parse("[48") == ([], None)  # ended at EOS or the token limit, not at "]": a (wrong) final answer
    assert c.parse("3]") == ([], "malformed call")  # ended at "]" without a call
    assert c.parse("[1[2]") == ([ToolCall("shout", {"text": "2"})], "malformed call")
    assert c.parse("[]") == ([ToolCall("shout", {"text": ""})], None)  # the tool judges an empty expression
    assert c.render_result([ToolResult(True, "37114")]) == "{37114}"
    assert c.render_result([ToolResult(True, "-5")]) == "{-5}"
    assert c.render_result([ToolResult(False, "division by zero", "exception")]) == "{?}"
    assert c.render_result([ToolResult(True, "1.5")]) == "{?}"  # outside the alphabet
    assert c.render_result([ToolResult(True, "{1}")]) == "{?}"  # braces would break the framing
    assert c.final_answer("{37114}37114") == "37114" and c.final_answer(" 12 ") == "12"


def test_compact_needs_one_tool_with_one_string_argument():
    with pytest.raises(ValueError, match="exactly one tool"):
        make_format("compact", [Tool.from_function(add), Tool.from_function(pid)])
    with pytest.raises(ValueError, match="one string argument"):
        make_format("compact", [Tool.from_function(add)])
    with pytest.raises(ValueError, match="unknown tool format 'json'"):
        make_format("json", [])


def test_hermes_call_json_matches_what_the_parser_reads():
    # the template writes arguments with json.dumps defaults; a round trip through text is exact
    args = {"expression": "2*(3+4)", "note": "ünïcode \"quoted\""}
    text = '<tool_call>\n{"name": "calc", "arguments": ' + json.dumps(args, ensure_ascii=False) + "}\n</tool_call>"
    assert HermesFormat().parse(text) == ([ToolCall("calc", args)], None)
