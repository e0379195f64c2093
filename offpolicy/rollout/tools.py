"""Tools for multi-turn agents: plain Python functions, their JSON schemas, and fault-isolated calls.

A tool is a function with type hints and a Google-style docstring (an ``Args:`` section);
:meth:`Tool.from_function` reads its schema with ``transformers.utils.get_json_schema``, the format chat
templates take as ``apply_chat_template(..., tools=[schema])``. :func:`run_tool_calls` runs one turn's
calls and never raises: an unknown tool, arguments that do not fit the schema, an exception inside the
tool and a time-out each become a failed :class:`ToolResult` whose ``text`` is the short message the model
sees next (a tool reports an error in its own words by raising :class:`ToolError`).

Time-outs are real: a tool runs in a worker process (one of a small pool that grows to the number of
concurrent callers and is reused across calls, about 0.1 ms per call when warm) which the caller kills
when the deadline passes and replaces on the next call, so a tool that never returns (a C loop, ignored
signals) is stopped. A trusted tool whose own code bounds its time (the calculator; the python tool,
whose sandbox has its own wall-clock limit) may run in-process (``in_process=True``): no process hop, and
no time limit from here. An in-process tool that is also pure and takes microseconds (no I/O, no
subprocess: the calculator) may be marked ``instant``: an environment then calls it on its event loop, without
the thread hand-off that lets a slower tool's call overlap the other episodes'.
"""

from __future__ import annotations

import functools
import inspect
import json
import multiprocessing as mp
import pickle
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

ERROR_KINDS = ("unknown_tool", "bad_arguments", "exception", "timeout")
MAX_RESULT_CHARS = 4000  # longer tool output is cut (the model's context is the budget)


class ToolCall(NamedTuple):
    """One call the model asked for: the tool's name and its keyword arguments (decoded JSON)."""

    name: str
    arguments: dict


class ToolResult(NamedTuple):
    """What one call gave: ``ok`` and the text the model sees (the tool's output, or the error message);
    ``kind`` names the failure (one of ``ERROR_KINDS``, or a parser's ``"malformed"``), None when ok."""

    ok: bool
    text: str
    kind: str | None = None


class ToolError(Exception):
    """Raised by a tool to report a failure to the model with exactly this message (kind ``exception``)."""


@dataclass(frozen=True)
class Tool:
    """A callable the model may invoke by name; ``schema`` is what the chat template shows the model."""

    name: str
    fn: Callable[..., Any]
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters": {...}}}
    in_process: bool = False  # trusted and bounded in time by its own code: run without a worker process
    instant: bool = False  # in-process, pure and microseconds long: called on the event loop, not in a thread

    def __post_init__(self):
        if self.instant and not self.in_process:
            raise ValueError(f"tool {self.name!r}: instant=True needs in_process=True (a worker-process call "
                             "blocks until the worker answers)")

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, in_process: bool = False, instant: bool = False,
                      bound: Mapping[str, Any] | None = None) -> Tool:
        """The tool ``fn`` with its schema from its signature and docstring (every parameter type-hinted
        and described under ``Args:``; ``get_json_schema`` raises otherwise).

        ``bound``: settings fixed now (``functools.partial``) and hidden from the model, e.g. a time limit.
        A tool run in a worker process must pickle by reference (a module-level function); checked here.
        """
        from transformers.utils import get_json_schema

        schema = get_json_schema(fn)
        bound = dict(bound or {})
        if bound:
            unknown = sorted(set(bound) - set(inspect.signature(fn).parameters))
            if unknown:
                raise ValueError(f"tool {fn.__name__!r}: bound settings {unknown} are not parameters of it")
            params = schema["function"]["parameters"]
            for key in bound:
                params["properties"].pop(key, None)
            params["required"] = [k for k in params.get("required", []) if k not in bound]
            fn = functools.partial(fn, **bound)
        if not in_process:
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise ValueError(f"tool {schema['function']['name']!r} must be a module-level function to run "
                                 f"in a worker process (or pass in_process=True): {e}") from None
        return cls(schema["function"]["name"], fn, schema, in_process, instant)


def check_arguments(arguments: Any, schema: dict) -> str | None:
    """Why ``arguments`` do not fit the tool's ``schema`` (required parameters present, no unknown ones,
    JSON types and enums of those given), or None if they fit. Nested items are not checked."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    params = schema["function"].get("parameters", {})
    props = params.get("properties", {})
    missing = [k for k in params.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument {missing[0]!r}"
    for key, value in arguments.items():
        if key not in props:
            return f"unknown argument {key!r}; expected {sorted(props)}"
        spec = props[key]
        if not _fits(value, spec):
            return f"argument {key!r} must be {_type_text(spec)}, got {type(value).__name__}"
        if "enum" in spec and value not in spec["enum"] and not (value is None and spec.get("nullable")):
            return f"argument {key!r} must be one of {spec['enum']}"
    return None


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
               "object": dict, "null": type(None)}


def _fits(value: Any, spec: dict) -> bool:
    if value is None and spec.get("nullable"):
        return True
    types = spec.get("type")
    if types is None:
        return True
    for t in [types] if isinstance(types, str) else types:
        py = _JSON_TYPES.get(t)
        if py is None:  # a type this check does not know: let the tool judge
            return True
        if isinstance(value, bool) and t in ("integer", "number"):  # JSON true is not a number
            continue
        if isinstance(value, py):
            return True
    return False


def _type_text(spec: dict) -> str:
    types = spec.get("type")
    return " or ".join(types) if isinstance(types, list) else str(types)


def run_tool_calls(calls: Sequence[ToolCall], tools: Mapping[str, Tool], *,
                   timeout_s: float | None) -> list[ToolResult]:
    """One :class:`ToolResult` per call, in order; never raises.

    ``timeout_s``: the limit of each call of a tool that runs in a worker process (None: no limit, the
    call still runs in a worker so an exception or crash stays isolated). In-process tools are not timed.
    """
    out = []
    for call in calls:
        tool = tools.get(call.name)
        if tool is None:
            out.append(ToolResult(False, f"unknown tool {call.name!r}; available: {sorted(tools)}", "unknown_tool"))
            continue
        problem = check_arguments(call.arguments, tool.schema)
        if problem is not None:
            out.append(ToolResult(False, f"bad arguments for {tool.name}: {problem}", "bad_arguments"))
            continue
        if tool.in_process:
            ok, text = _call(tool.fn, call.arguments, catch=Exception)
            out.append(ToolResult(True, text) if ok else ToolResult(False, text, "exception"))
        else:
            out.append(_POOL.call(tool, call.arguments, timeout_s))
    return out


# ---------------------------------------------------------------------------------------------------
# Execution: in-process, or in a pool of killable worker processes


def _call(fn: Callable[..., Any], kwargs: dict, *, catch: type[BaseException]) -> tuple[bool, str]:
    try:
        value = fn(**kwargs)
        text = value if isinstance(value, str) else json.dumps(value, default=str)  # may raise: tuple keys, cycles
    except ToolError as e:
        return False, _cut(str(e))
    except catch as e:  # the tool's fault, not the run's: the model is told
        return False, _cut(f"{type(e).__name__}: {e}")
    return True, _cut(text)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "\n[... truncated]"


def _serve(conn) -> None:
    """Worker loop. ``("load", fn)``: import the tool (answers ``(True, "")``); ``("call", fn, kwargs)``:
    run it (answers ``(ok, text)``); ``None`` ends the loop."""
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        except Exception as e:  # the message arrived but the tool cannot be loaded here (unpickling failed)
            conn.send((False, f"the tool cannot be loaded in its worker process: {type(e).__name__}: {e}"))
            continue
        if job is None:
            return
        if job[0] == "load":
            conn.send((True, ""))
        else:
            conn.send(_call(job[1], job[2], catch=BaseException))  # SystemExit too: the worker must answer


START_TIMEOUT_S = 120.0  # for a worker to start and import a tool's module (not part of any call's limit)


class _Worker:
    def __init__(self):
        ctx = mp.get_context("spawn")  # no fork of a process holding threads, CUDA or a model
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="offpolicy-tool")
        self.proc.start()
        child.close()
        self.loaded: set[str] = set()  # tools imported here, so their calls are timed without the import

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class _Pool:
    """Idle workers, taken by one call at a time; a worker that timed out or died is killed, not returned."""

    def __init__(self):
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def call(self, tool: Tool, kwargs: dict, timeout_s: float | None) -> ToolResult:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None or not worker.proc.is_alive():
            if worker is not None:
                worker.kill()
            try:
                worker = _Worker()
            except Exception as e:  # cannot start a process (limits): the call fails, the run goes on
                return ToolResult(False, f"could not start a tool process: {e}", "exception")
        try:
            if tool.name not in worker.loaded:
                worker.conn.send(("load", tool.fn))
                if not worker.conn.poll(START_TIMEOUT_S):
                    worker.kill()
                    return ToolResult(False, f"{tool.name}: the tool process did not start", "exception")
                ok, text = worker.conn.recv()
                if not ok:
                    self._put(worker)
                    return ToolResult(False, text, "exception")
                worker.loaded.add(tool.name)
            worker.conn.send(("call", tool.fn, kwargs))
            if not worker.conn.poll(timeout_s):  # poll(None) waits for as long as it takes
                worker.kill()
                return ToolResult(False, f"{tool.name} did not return within {timeout_s:g} s", "timeout")
            ok, text = worker.conn.recv()
        except (EOFError, OSError):
            worker.kill()
            return ToolResult(False, f"{tool.name} crashed its process", "exception")
        except Exception as e:  # the call could not be sent (arguments that do not pickle)
            worker.kill()
            return ToolResult(False, f"{tool.name}: cannot pass the arguments: {type(e).__name__}: {e}", "exception")
        self._put(worker)
        return ToolResult(True, text) if ok else ToolResult(False, text, "exception")

    def _put(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()


_POOL = _Pool()


def close_tool_workers() -> None:
    """Stop the idle tool worker processes (they are daemons, so they also end with this process)."""
    _POOL.close()
