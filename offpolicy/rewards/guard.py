"""Fault isolation for reward functions: exceptions, hangs and non-finite values, per sample.

:class:`GuardedReward` scores a list of ``(response, ground_truth)`` pairs in a worker process and
returns one :class:`Scored` per pair: a finite float, or ``value=None`` with the fault kind
(``"exception"``, ``"timeout"``, ``"non_finite"``, ``"not_a_number"``, ``"worker_died"``) and a
message (the traceback for exceptions). The time limit is enforced by the parent, which kills the
worker, so even code that never returns (a C loop, ignored signals) is stopped; the worker is then
restarted and scoring continues with the next sample. A worker is used only when ``timeout_s`` is
set; without one, rewards run in-process and only exceptions and bad values are caught.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
import traceback
from typing import Callable, NamedTuple, Sequence

FAULT_KINDS = ("exception", "timeout", "non_finite", "not_a_number", "worker_died")


class Scored(NamedTuple):
    value: float | None
    fault: str | None = None
    message: str = ""


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
    except Exception:  # a user reward may raise anything; the sample is marked, the run goes on
        return Scored(None, "exception", traceback.format_exc(limit=8))


def _worker(fn, conn) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        for response, truth in job:
            conn.send(score_one(fn, response, truth))


class GuardedReward:
    """Score pairs with ``fn`` in a (restartable) worker process with a per-sample time limit."""

    def __init__(self, fn: Callable[[str, str], float], *, timeout_s: float | None = 5.0):
        self.fn = fn
        self.timeout_s = timeout_s
        self._proc = self._conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(self.fn, child), daemon=True, name="offpolicy-reward")
        self._proc.start()
        child.close()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.pid is not None:  # started
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = self._conn = None

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        if self.timeout_s is None:
            return [score_one(self.fn, r, t) for r, t in pairs]
        out: list[Scored] = []
        while len(out) < len(pairs):
            if self._proc is None or not self._proc.is_alive():
                self._start()
            pending = list(pairs[len(out):])
            self._conn.send(pending)
            for _ in pending:
                deadline = time.monotonic() + self.timeout_s
                if not self._conn.poll(max(deadline - time.monotonic(), 0)):
                    alive = self._proc.is_alive()
                    self._kill()
                    kind = "timeout" if alive else "worker_died"
                    out.append(Scored(None, kind, f"reward did not return within {self.timeout_s} s"
                                      if alive else "the reward worker process died"))
                    break
                try:
                    out.append(self._conn.recv())
                except EOFError:
                    self._kill()
                    out.append(Scored(None, "worker_died", "the reward worker process died"))
                    break
        return out

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
