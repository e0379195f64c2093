"""Fault isolation for reward functions: exceptions, hangs and non-finite values, per sample.

:class:`GuardedReward` scores a list of ``(response, ground_truth)`` pairs in a worker process and
returns one :class:`Scored` per pair: a finite float, or ``value=None`` with the fault kind
(``"exception"``, ``"timeout"``, ``"non_finite"``, ``"not_a_number"``, ``"worker_died"``) and a
message (the traceback for exceptions). The time limit is enforced by the parent, which kills the
worker, so even code that never returns (a C loop, ignored signals) is stopped; the worker is then
restarted and scoring continues with the next sample. A worker is used only when ``timeout_s`` is
set; without one, rewards run in-process and only exceptions and bad values are caught.

A reward that hangs on every sample must not stall the run one time-out at a time: after
``max_timeouts`` consecutive samples time out (a circuit breaker), or when one batch is not scored
within ``batch_timeout_s`` (a per-batch deadline), :class:`RewardStalledError` names the function and
stops the run; the runners treat it as any :class:`RewardFaultError` (checkpoint, then stop).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

FAULT_KINDS = ("exception", "timeout", "non_finite", "not_a_number", "worker_died")


class RewardFaultError(RuntimeError):
    """The reward stops the run: too many samples of one batch had faulty rewards (``reward.max_invalid_frac``),
    or the reward function hangs (:class:`RewardStalledError`)."""


class RewardStalledError(RewardFaultError):
    """``reward.max_timeouts`` consecutive samples timed out, or a batch missed ``reward.batch_timeout_s``."""


class Scored(NamedTuple):
    """A sample's reward, or its fault. ``correct``: whether the answer is right by the task's own rule,
    when the reward is something else (a reward model); None = the reward decides (value >= 1)."""

    value: float | None
    fault: str | None = None
    message: str = ""
    correct: bool | None = None


def check_value(value) -> Scored:
    """A reward value as a finite float, or the fault it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return Scored(None, "not_a_number", f"reward returned {value!r}")
    if not math.isfinite(value):
        return Scored(None, "non_finite", f"reward returned {value!r}")
    return Scored(float(value))


def score_one(fn: Callable[[str, str], float], response: str, truth: str) -> Scored:
    try:
        return check_value(fn(response, truth))
    except (Exception, SystemExit):  # a user reward may raise anything (even sys.exit); the sample is marked
        return Scored(None, "exception", traceback.format_exc(limit=8))


WORKER_START_S = 120.0  # a worker's start-up (importing the reward's module) is not the reward's time
FLUSH_S = 0.005  # the worker sends its results at least this often (one message, not one per sample)
TICK_S = 0.02  # the parent looks at the worker's progress this often while it waits


def _worker(fn, conn, progress) -> None:
    """Score each job (a list of pairs) in order. ``progress`` counts the samples finished (shared memory), so
    the parent can time each sample; the results go back in lists, at least every FLUSH_S, at each fault and at
    the end."""
    conn.send(None)  # ready: ``fn`` arrived, so its module is imported
    while True:
        job = conn.recv()
        if job is None:
            return
        done, since = [], time.monotonic()
        for response, truth in job:
            done.append(score_one(fn, response, truth))
            progress.value += 1
            if done[-1].fault is not None or time.monotonic() - since >= FLUSH_S:  # a fault is reported at once
                conn.send(done)
                done, since = [], time.monotonic()
        if done:
            conn.send(done)


class FirstFaults:
    """``on_fault`` hook of :class:`GuardedReward`: print the first fault of each kind as it happens, in full
    (traceback), to stderr and ``log`` (appended); later ones are only counted by the caller."""

    def __init__(self, log: str | Path | None = None, *, during: str = ""):
        self.log = None if log is None else Path(log)
        self.during = f" ({during})" if during else ""
        self.seen: set[str] = set()

    def __call__(self, s: Scored) -> None:
        if s.fault in self.seen:
            return
        self.seen.add(s.fault)
        text = f"first reward fault of kind '{s.fault}'{self.during}:\n{s.message}\n"
        print(text, file=sys.stderr, flush=True)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(text)


class GuardedReward:
    """Score pairs with ``fn`` in a (restartable) worker process with a per-sample time limit.

    ``batch_timeout_s``: deadline of one call (a batch); ``max_timeouts``: consecutive per-sample time-outs
    (across calls; any sample that returns resets the count) before :class:`RewardStalledError`; None: off.
    ``on_fault``: called with each faulty :class:`Scored` as soon as it is known (e.g. :class:`FirstFaults`);
    ``name``: how messages name the function (default: its module and name).
    """

    def __init__(self, fn: Callable[[str, str], float], *, timeout_s: float | None = 5.0,
                 batch_timeout_s: float | None = None, max_timeouts: int | None = None,
                 on_fault: Callable[[Scored], None] | None = None, name: str | None = None):
        self.fn = fn
        self.timeout_s = timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.max_timeouts = max_timeouts
        self.on_fault = on_fault
        self.name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        self.consecutive_timeouts = 0
        self._proc = self._conn = None

    @classmethod
    def from_config(cls, fn: Callable[[str, str], float], reward_cfg, *, on_fault=None) -> "GuardedReward":
        """The guard a :class:`~offpolicy.config.RewardConfig` describes (``reward.function`` names ``fn``)."""
        return cls(fn, timeout_s=reward_cfg.timeout_s, batch_timeout_s=reward_cfg.batch_timeout_s,
                   max_timeouts=reward_cfg.max_timeouts, on_fault=on_fault, name=reward_cfg.function)

    def _start(self) -> None:
        """Start the worker and wait until it is ready, so that importing the reward's module does not count
        against the first sample's limit. A worker that cannot load the function never will: stop."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._progress = ctx.RawValue("q", 0)
        self._proc = ctx.Process(target=_worker, args=(self.fn, child, self._progress), daemon=True,
                                 name="offpolicy-reward")
        self._proc.start()
        child.close()
        try:
            if self._conn.poll(WORKER_START_S):
                self._conn.recv()
                return
            why = f"did not start within {WORKER_START_S:.0f} s"
        except EOFError:
            self._proc.join(timeout=5)
            why = f"exited while loading it (exit code {self._proc.exitcode}; its error is printed above)"
        self._kill()
        raise RewardFaultError(f"the reward worker for {self.name} {why}")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.pid is not None:  # started
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = self._conn = None

    def __call__(self, pairs: Sequence[tuple[str, ...]]) -> list[Scored]:
        """One Scored per ``(response, ground_truth)`` sample; a third element (the prompt, which workflows
        pass for reward models) is not given to a rule reward."""
        pairs = [(p[0], p[1]) for p in pairs]
        deadline = None if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        if self.timeout_s is None:  # in-process: the deadline is checked between samples
            out = []
            for r, t in pairs:
                if deadline is not None and time.monotonic() > deadline:
                    raise self._overdue(len(out), len(pairs))
                out.append(self._record(score_one(self.fn, r, t)))
            return out
        results: dict[int, Scored] = {}
        while len(results) < len(pairs):
            if self._proc is None or not self._proc.is_alive():
                t0 = time.monotonic()
                self._start()
                deadline = None if deadline is None else deadline + time.monotonic() - t0  # start-up is not scoring
            todo = [i for i in range(len(pairs)) if i not in results]
            base = self._progress.value  # before the job goes: the worker may finish samples before we look
            self._conn.send([pairs[i] for i in todo])
            self._collect(todo, results, deadline, len(pairs), base)
        return [results[i] for i in range(len(pairs))]

    def _collect(self, todo: list[int], results: dict[int, Scored], deadline: float | None, total: int,
                 base: int) -> None:
        """Receive the worker's results for ``todo`` (sent in order) into ``results``, timing each sample from
        the moment the worker's progress counter says the one before finished. ``base``: the counter when the
        job was sent (the worker was idle). A sample past its limit is a time-out (the worker is killed); results
        the worker held but had not sent yet are lost with it and scored again by the next worker."""
        seen = self._progress.value
        clock = time.monotonic()  # when the sample in progress started, as far as the parent can see
        got = 0
        while got < len(todo):
            limit = clock + self.timeout_s
            until = limit if deadline is None else min(limit, deadline)
            try:
                if self._conn.poll(min(max(until - time.monotonic(), 0), TICK_S)):
                    for s in self._conn.recv():
                        results[todo[got]] = self._record(s)
                        got += 1
                    continue
            except EOFError:
                pass  # the worker died: handled below like a silent one
            now, progress = time.monotonic(), self._progress.value
            alive = self._proc.is_alive()
            if progress != seen and alive:
                seen, clock = progress, now  # a sample finished: the next one's clock starts
                continue
            if alive and now < until:
                continue
            if not alive:
                seen = progress  # it died in the sample after the last one it finished
            self._kill()
            if alive and until < limit:  # the batch's deadline came before the sample's own limit
                raise self._overdue(len(results), total)
            if seen - base > got:  # samples before it returned (their results are lost, scored again): not in a row
                self.consecutive_timeouts = 0
            stuck = todo[min(seen - base, len(todo) - 1)]  # the sample in progress when it stopped
            results[stuck] = self._record(
                Scored(None, "timeout", f"reward did not return within {self.timeout_s} s") if alive
                else Scored(None, "worker_died", "the reward worker process died"))
            return

    def _record(self, s: Scored) -> Scored:
        """Report a fault, count consecutive time-outs, and trip the circuit breaker."""
        if s.fault is not None and self.on_fault is not None:
            self.on_fault(s)
        if s.fault == "timeout":
            self.consecutive_timeouts += 1
            if self.max_timeouts is not None and self.consecutive_timeouts >= self.max_timeouts:
                self.consecutive_timeouts = 0
                raise RewardStalledError(
                    f"reward {self.name} timed out on {self.max_timeouts} consecutive samples (reward.timeout_s="
                    f"{self.timeout_s}, reward.max_timeouts={self.max_timeouts}): it seems to hang; stopping")
        elif s.fault != "worker_died":
            self.consecutive_timeouts = 0
        return s

    def _overdue(self, done: int, total: int) -> RewardStalledError:
        return RewardStalledError(f"reward {self.name} scored {done} of {total} samples of a batch within "
                                  f"reward.batch_timeout_s={self.batch_timeout_s} s: it is too slow or hangs; "
                                  "stopping (raise reward.batch_timeout_s for a slow reward)")

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=2)
            except (BrokenPipeError, OSError):
                pass
        self._kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean up reliably
            pass
