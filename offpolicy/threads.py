"""How many CPU threads a run may use, from what the process is actually allowed.

``available_cpus()`` is the smaller of the CPU affinity mask (``taskset``, SLURM's cpuset) and the cgroup
CPU quota (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of v1; a container's
``--cpus``). Thread counts left unset in the config are split from it so that explorer + trainer never
exceed it: sync runs give the trainer all of them; async runs give the explorer half (at least one) and
the trainer the rest. Oversubscribing the cores (each process pinning as many threads as the machine has)
is what made a busy machine 10-20x slower instead of about 2x.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup quota, or None when unlimited / unknown."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        p = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q.is_file() and p.is_file():
            quota = int(q.read_text())
            return None if quota <= 0 else quota / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """CPUs this process may use: affinity mask and cgroup quota, whichever is smaller (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def thread_split(mode: str, trainer: int | None, explorer: int | None, cpus: int | None = None) -> tuple[int, int]:
    """(trainer threads, explorer threads); explicit values win, the rest are split from ``cpus``."""
    cpus = available_cpus() if cpus is None else cpus
    if mode != "async":
        return trainer or cpus, explorer or 1
    if explorer is None:
        explorer = max(1, cpus - trainer) if trainer else max(1, cpus // 2)
    return trainer or max(1, cpus - explorer), explorer


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in vals]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        total += sum(v[:8])
        busy += sum(v[:8]) - idle
    return busy, total


def _proc_jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads), or 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _family(pid: int) -> list[int]:
    """``pid`` and all its descendants (reward workers, an async explorer), from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        out += frontier
    return out


class ThreadGovernor:
    """Adapts the trainer's torch threads to the CPUs that other processes leave free.

    Every ``every`` steps it measures, from /proc, how much CPU the processes other than this one and its
    descendants (reward workers; in async mode the explorer) used on the CPUs this process may run on,
    and sets the trainer's
    threads to the rest (at least 1, at most ``max_threads``), with hysteresis. OpenMP threads that spin
    at barriers while a competitor holds one of their cores make every step wait for the descheduled
    thread (a 10-20x slowdown measured here); one thread fewer avoids it. Linux only (a no-op elsewhere).
    """

    def __init__(self, max_threads: int, *, every: int = 10):
        self.max_threads = self.threads = max_threads
        self.every = every
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self._last = self._sample() if Path("/proc/stat").exists() and self.cpus else None

    def _sample(self) -> tuple[int, int, int]:
        busy, total = _cpu_jiffies(self.cpus)
        return busy, total, sum(_proc_jiffies(p) for p in _family(os.getpid()))

    def others(self) -> float | None:
        """CPUs' worth of work done by other processes since the last call (None: not measurable)."""
        if self._last is None:
            return None
        now = self._sample()
        d_busy, d_total, d_ours = (a - b for a, b in zip(now, self._last))
        self._last = now
        if d_total <= 0:
            return None
        return max(0.0, (d_busy - d_ours) / d_total * len(self.cpus))

    def tick(self, step: int) -> int:
        """Call once per step; every ``every`` steps re-decide. Returns the trainer's thread count."""
        if self.max_threads <= 1 or step % self.every:
            return self.threads
        others = self.others()
        if others is None:
            return self.threads
        want = max(1, min(self.max_threads, self.max_threads - math.floor(others + 0.4)))
        if want != self.threads:
            import torch

            torch.set_num_threads(want)
            self.threads = want
        return self.threads
