"""Output folders of the benchmarks that train through ``offpolicy compare``.

A run directory that already holds a run is refused (``ConfigError``), so a benchmark that ran into fixed
folders under ``--out`` stopped at once when rerun. These run every invocation into a fresh
``<out>/runs/<time>/`` and copy its summary files up to ``<out>/``, where the docs point.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def fresh_runs(top: str | Path) -> Path:
    """``<top>/runs/<YYYYmmdd-HHMMSS>/``, a new folder (a second suffix if two start in the same second)."""
    base = Path(top) / "runs" / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    out.mkdir(parents=True)
    return out


def publish(top: str | Path, *files: Path) -> list[Path]:
    """Copy ``files`` (a run's dashboard, table) to ``top``; returns the copies."""
    return [Path(shutil.copy(f, Path(top) / Path(f).name)) for f in files]
