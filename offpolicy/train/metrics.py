"""Per-step metrics: one JSON line per record in ``metrics.jsonl`` plus TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """Append-only metrics sink. Every record is flushed at once, so a crash loses nothing written."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (optionally only one ``kind``: 'train' | 'eval')."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def episode_metrics(exps: list) -> dict:
    """Multi-turn counters (``info["episode"]``): ``<name>_mean`` per episode (turns, tool calls, env
    seconds, success, ...), and totals for error counts (``tool_errors/<kind>``, ``prefix_failures``)."""
    episodes = [e.info["episode"] for e in exps if "episode" in e.info]
    if not episodes:
        return {}
    keys = sorted({k for ep in episodes for k in ep})
    out = {}
    for k in keys:
        total = sum(ep.get(k, 0) for ep in episodes)
        if k.startswith("tool_errors/") or k == "prefix_failures":
            out[k] = total
        else:
            out[f"{k}_mean"] = total / len(episodes)
    out["success"] = sum(bool(e.info.get("success")) for e in exps) / len(exps)
    return out
