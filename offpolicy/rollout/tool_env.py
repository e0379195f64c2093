"""An :class:`~offpolicy.rollout.env.Env` over tools: each model turn either calls tools or answers.

A turn with calls (or a malformed call) is answered with the rendered results (``done=False``); a turn
without any ends the episode with ``reward_fn(final_answer, task.answer)``. Tool faults (unknown tool,
bad arguments, exceptions, time-outs, malformed calls, calls beyond ``max_calls_per_turn``) become error
observations the model sees and counts in ``info``; a reward function that raises or returns a non-number
gives reward 0 and ``info["reward_fault"]`` (:func:`offpolicy.rewards.guard.score_one`). Nothing here
raises for what the model or a tool does.

Every step's info has the same keys, so they sum over an episode: ``tool_calls`` (calls parsed),
``tool_errors/<kind>`` for every kind in ``TOOL_ERROR_KINDS``, ``env_s`` (seconds in this step); the
final step adds ``success`` (reward >= 1) and, on a fault, ``reward_fault``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Sequence

from offpolicy.rewards.guard import score_one
from offpolicy.rollout.env import StepResult
from offpolicy.rollout.tool_parsers import ToolFormat
from offpolicy.rollout.tools import ERROR_KINDS, Tool, ToolResult, run_tool_calls

TOOL_ERROR_KINDS = ERROR_KINDS + ("malformed", "too_many_calls")


class ToolEnv:
    """One episode at a time over ``tools`` in the tool-call format ``parser``.

    For the multi-turn workflow (see :class:`~offpolicy.rollout.env.Env`): ``chat`` (the format's: render
    observations with the chat template), ``tools`` (the tools' JSON schemas, for the chat template),
    ``stop`` (the format's pause strings). ``tool_timeout_s`` limits each call of a tool run in a worker
    process.
    """

    def __init__(self, tools: Sequence[Tool], parser: ToolFormat, reward_fn: Callable[[str, str], float], *,
                 max_calls_per_turn: int = 4, tool_timeout_s: float | None = 10.0):
        if max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn must be >= 1, got {max_calls_per_turn}")
        self._by_name = {t.name: t for t in tools}
        if len(self._by_name) != len(tools):
            raise ValueError(f"tool names must be unique, got {[t.name for t in tools]}")
        self.parser = parser
        self.reward_fn = reward_fn
        self.max_calls_per_turn = max_calls_per_turn
        self.tool_timeout_s = tool_timeout_s
        self.chat: bool = parser.chat
        self.tools: list[dict] = [t.schema for t in tools]
        self.stop: tuple[str, ...] = tuple(parser.stop)
        self._task = None
        self._done = False

    async def reset(self, task) -> str:
        self._task, self._done = task, False
        return ""  # the task's prompt is the whole first turn

    async def step(self, action: str) -> StepResult:
        if self._task is None or self._done:
            raise RuntimeError("ToolEnv.step before reset or after the episode ended")
        start = time.perf_counter()
        calls, error = self.parser.parse(action)
        info = {"tool_calls": len(calls), **{f"tool_errors/{k}": 0 for k in TOOL_ERROR_KINDS}}
        if not calls and error is None:
            self._done = True
            scored = score_one(self.reward_fn, self.parser.final_answer(action), self._task.answer)
            reward = 0.0 if scored.value is None else scored.value
            info["success"] = reward >= 1.0
            if scored.fault is not None:
                info["reward_fault"] = scored.fault
            info["env_s"] = time.perf_counter() - start
            return StepResult(reward=reward, done=True, info=info)
        run, extra = calls[:self.max_calls_per_turn], calls[self.max_calls_per_turn:]
        if all(getattr(self._by_name.get(c.name), "instant", True) for c in run):  # unknown names fail at once
            results = run_tool_calls(run, self._by_name, timeout_s=self.tool_timeout_s)
        else:  # a thread: a slow call overlaps the other episodes' (an instant one would pay the hand-off)
            results = await asyncio.to_thread(run_tool_calls, run, self._by_name, timeout_s=self.tool_timeout_s)
        results += [ToolResult(False, f"not run: at most {self.max_calls_per_turn} tool calls per turn",
                               "too_many_calls")] * len(extra)
        if error is not None:
            results.append(ToolResult(False, error, "malformed"))
        for r in results:
            if not r.ok:
                key = f"tool_errors/{r.kind}"
                info[key] = info.get(key, 0) + 1
        info["env_s"] = time.perf_counter() - start
        return StepResult(observation=self.parser.render_result(results), role="tool", info=info)
