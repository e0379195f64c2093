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
