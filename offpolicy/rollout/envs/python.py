"""The ``python`` environment: a sandboxed Python interpreter as a tool, math-answer reward.

For GSM8K-style tasks with chat models in the Hermes format: the model may call ``python(code)`` (run by
:func:`offpolicy.rewards.code_exec.run_code` in a fresh sandboxed interpreter under a wall-clock and memory
limit; the tool answers with what the program printed, or its error) and ends with a turn without calls,
scored by :func:`offpolicy.rewards.math_reward`. The tool runs in-process: the sandbox kills a program at
its own time limit, so no worker process is needed to bound it.
"""

from __future__ import annotations

import functools
import math
import re

from offpolicy.rewards.code_exec import SandboxError, run_code
from offpolicy.rewards.math import math_reward
from offpolicy.rollout.env import register_env
from offpolicy.rollout.tool_env import ToolEnv
from offpolicy.rollout.tool_parsers import HermesFormat
from offpolicy.rollout.tools import Tool, ToolError

MAX_OUTPUT_BYTES = 2000  # of stdout shown to the model
ERROR_CHARS = 800  # of the traceback shown to the model
_HELPER_FRAME = re.compile(r'^  File "<string>".*\n', re.M)  # frames of the sandbox's own launcher
_WORKDIR = re.compile(r'"[^"\n]*offpolicy_exec_[^"/\n]*/')  # the sandbox's random working directory


def python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> str:
    """Run a Python program in a sandbox (no network, no files kept) and return what it printed.

    Args:
        code: A complete Python program; print() the values you want to see.
        timeout_s: Wall-clock limit of the program in seconds.
        memory_mb: Memory limit of the program in MiB.
    """
    try:
        res = run_code(code, timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)), memory_mb=memory_mb,
                       max_stdout_bytes=MAX_OUTPUT_BYTES)
    except SandboxError as e:
        raise ToolError(f"the sandbox could not run the code: {e}") from None
    if res.ok:
        return res.stdout if res.stdout.strip() else "(no output; print() the values you want to see)"
    if res.killed_reason in ("timeout", "cpu"):
        why = f"timed out after {timeout_s:g} s"
    elif res.killed_reason == "memory":
        why = f"exceeded the memory limit of {memory_mb} MiB"
    else:
        why = _WORKDIR.sub('"', _HELPER_FRAME.sub("", res.stderr)).strip()[-ERROR_CHARS:]
    raise ToolError(f"{res.stdout}{why}" if res.stdout.strip() else why)


def python_env(*, timeout_s: float = 5.0, memory_mb: int = 512, max_calls_per_turn: int = 4) -> ToolEnv:
    """A fresh python environment; ``timeout_s`` and ``memory_mb`` limit each program the model runs."""
    return ToolEnv([_tool(timeout_s, memory_mb)], HermesFormat(), math_reward, max_calls_per_turn=max_calls_per_turn,
                   tool_timeout_s=None)


@functools.lru_cache(maxsize=8)  # one schema per setting, not one per episode
def _tool(timeout_s: float, memory_mb: int) -> Tool:
    return Tool.from_function(python, in_process=True, bound={"timeout_s": timeout_s, "memory_mb": memory_mb})


register_env("python", python_env)
