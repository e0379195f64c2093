"""Tool-call formats: how a model writes a call, where generation pauses, how results are shown to it.

A format is a small object (:class:`ToolFormat`): ``parse(text)`` finds the calls in one model turn
(and a ``malformed`` error message, never an exception), ``stop`` lists the strings at which generation
pauses for a tool result, ``render_result(results)`` is the observation text (``chat``: the content of a
``tool`` message, else text appended as is), and ``final_answer(text)`` the answer stated by a turn
without calls.

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or
  more per turn; the turn ends at EOS (``<|im_end|>``), so ``stop`` is empty. Results are the content of
  one ``tool`` message; several results are joined so that Qwen's template renders them exactly as it
  renders one ``tool`` message per result (``<tool_response>`` blocks in one user turn).
- ``compact`` (the bundled character-level calculator agent, alphabet ``0-9+-*=[]{}?``): ``[482*77]``
  calls the environment's single tool with ``482*77`` as its one argument; generation pauses at ``]``;
  the result is appended as ``{37114}`` (``{?}`` for any error or a result outside the alphabet). A turn
  that ends otherwise (EOS, token limit) is the final one; its answer is what follows its last ``}``.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Protocol, Sequence

from offpolicy.rollout.tools import Tool, ToolCall, ToolResult


class ToolFormat(Protocol):
    stop: tuple[str, ...]  # generation pauses after any of these (the stop string is part of the turn)
    chat: bool  # observations are chat messages (rendered with the chat template), else plain text

    def parse(self, text: str) -> tuple[list[ToolCall], str | None]:
        """The well-formed calls of one model turn, and a message for the malformed ones (or None)."""

    def render_result(self, results: Sequence[ToolResult]) -> str:
        """The observation text for a turn's results (errors included), in call order."""

    def final_answer(self, text: str) -> str:
        """The answer stated by a final turn (a turn without calls)."""


class HermesFormat:
    """Qwen / Hermes ``<tool_call>`` JSON blocks; results as ``tool`` message content."""

    stop: tuple[str, ...] = ()  # several calls may share a turn: it ends at EOS
    chat = True
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
    _SEPARATOR = "\n</tool_response>\n<tool_response>\n"  # between two tool messages in Qwen's template

    def parse(self, text: str) -> tuple[list[ToolCall], str | None]:
        calls, problems = [], []
        for i, body in enumerate(self._CALL.findall(text)):
            call = _hermes_call(body)
            if isinstance(call, str):
                problems.append(f"call {i + 1}: {call}")
            else:
                calls.append(call)
        rest = self._CALL.sub("", text)
        if "<tool_call>" in rest:
            problems.append("<tool_call> without </tool_call>")
        elif "</tool_call>" in rest:
            problems.append("</tool_call> without <tool_call>")
        if not problems:
            return calls, None
        want = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        return calls, f"malformed tool call ({'; '.join(problems)}); write {want}"

    def render_result(self, results: Sequence[ToolResult]) -> str:
        return self._SEPARATOR.join(r.text if r.ok else f"Error: {r.text}" for r in results)

    def final_answer(self, text: str) -> str:
        return text.strip()


def _hermes_call(body: str) -> ToolCall | str:
    """The call in one ``<tool_call>`` body, or what is wrong with it."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at char {e.pos})"
    except RecursionError:  # json raises this, not JSONDecodeError, from about 1000 nested brackets
        return "invalid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        return "expected a JSON object"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return "missing 'name'"
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string (OpenAI's wire format)
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            pass
    if not isinstance(args, dict):
        return "'arguments' must be a JSON object"
    return ToolCall(name, args)


class CompactFormat:
    """``[expression]`` calls one tool's one string argument; results as ``{value}``, errors ``{?}``."""

    stop: tuple[str, ...] = ("]",)
    chat = False
    _CALL = re.compile(r"\[([^\[\]{}]*)\]")
    _SHOWABLE = re.compile(r"[0-9+\-*=]+")  # the alphabet, less the brackets and braces that frame things

    def __init__(self, tool: str, arg: str):
        self.tool, self.arg = tool, arg

    @classmethod
    def for_tools(cls, tools: Sequence[Tool]) -> CompactFormat:
        """The format for an environment's single tool, which must take exactly one string argument."""
        if len(tools) != 1:
            raise ValueError(f"the compact tool format needs exactly one tool, got {[t.name for t in tools]}")
        props = tools[0].schema["function"]["parameters"].get("properties", {})
        if len(props) != 1 or next(iter(props.values())).get("type") != "string":
            raise ValueError(f"the compact tool format needs a tool with one string argument; "
                             f"{tools[0].name!r} takes {props}")
        return cls(tools[0].name, next(iter(props)))

    def parse(self, text: str) -> tuple[list[ToolCall], str | None]:
        """A turn that does not end at the stop ``]`` ended at EOS or the token limit: it is the final
        answer, whatever brackets it holds. One that does is a call, or malformed (a stray ``]``)."""
        if not text.rstrip().endswith("]"):
            return [], None
        calls = [ToolCall(self.tool, {self.arg: expr}) for expr in self._CALL.findall(text)]
        rest = self._CALL.sub("", text)
        if "[" in rest or "]" in rest:
            return calls, "malformed call"
        return calls, None

    def render_result(self, results: Sequence[ToolResult]) -> str:
        return "".join("{" + r.text + "}" if r.ok and self._SHOWABLE.fullmatch(r.text) else "{?}"
                       for r in results)

    def final_answer(self, text: str) -> str:
        return text.rsplit("}", 1)[-1].strip()


FORMATS: dict[str, Callable[[Sequence[Tool]], ToolFormat]] = {
    "hermes": lambda tools: HermesFormat(),
    "compact": CompactFormat.for_tools,
}


def make_format(name: str, tools: Sequence[Tool]) -> ToolFormat:
    """The tool format ``name`` for an environment with ``tools``."""
    if name not in FORMATS:
        raise ValueError(f"unknown tool format {name!r}; available: {sorted(FORMATS)}")
    return FORMATS[name](tools)
