"""Benchmark: explorer / trainer throughput of ``pipeline.mode=ray`` versus the number of explorers N.

    .venv/bin/python benchmarks/ray_throughput.py [--explorers 1 2 3] [--offsets 0 1] [--steps 40]
        [--workers 1] [--out FILE.json] [overrides ...]

One short demo-sized run (the bundled model, 32 prompts x 8 samples) per (N, sync_offset) on a local Ray
instance sized to this machine; from its metrics, the medians over the steps after the first five of:
``step_s`` (wall per trainer step), ``gen_s`` (the slowest shard's generation), ``train_s``,
``trainer_idle_s`` (the trainer waiting for the batch), ``explorer_idle_s`` (an explorer waiting for
weights or work), ``publish_s``, and samples/s = rows / step_s. Each explorer keeps 1 torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

KEYS = ("step_s", "gen_s", "train_s", "trainer_idle_s", "explorer_idle_s", "publish_s", "weight_load_s",
        "buffer_put_s")


def main() -> None:
    from offpolicy.config import load_config
    from offpolicy.pipeline import run
    from offpolicy.train.metrics import read_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--explorers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--offsets", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for offset in args.offsets:
            for n in args.explorers:
                cfg = load_config(None, [f"train.steps={args.steps}", "eval.every=0", "tasks.eval_size=16",
                                         "run.progress=false", "run.loggers=[]", "run.save_final=false",
                                         "pipeline.mode=ray", f"pipeline.explorers={n}", f"pipeline.sync_offset={offset}",
                                         f"train.workers={args.workers}", f"run.dir={Path(tmp) / f'n{n}-o{offset}'}",
                                         *args.overrides])
                t0 = time.perf_counter()
                res = run(cfg, log=lambda *a: None)
                wall = time.perf_counter() - t0
                train = read_metrics(res.run_dir, "train")[5:]
                row = {"explorers": n, "sync_offset": offset, "workers": args.workers, "steps": args.steps,
                       "wall_s": wall}
                row.update({k: statistics.median(r.get(k, 0.0) for r in train) for k in KEYS})
                row["samples_per_s"] = train[0]["samples"] / row["step_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
