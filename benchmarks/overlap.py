"""Benchmark: does the asynchronous pipeline overlap generation and training?

    .venv/bin/python benchmarks/overlap.py [--steps 400] [--seeds 0 1] [--preset grpo] [--offset 1]

Runs the default demo in sync mode (one process, train.threads=2) and in async mode (explorer and
trainer in two processes, one torch thread each, pipeline.sync_offset=--offset). Reports, per mode,
the median generation, training and whole-step seconds after a 10-step warm-up; the async target is
median step <= 1.2 x max(median generation, median training), where sync pays their sum. The runs go to
benchmarks/out/overlap/runs/<time>/ (a rerun never meets an earlier run's directory); the dashboard and
the table are copied to benchmarks/out/overlap/{dashboard.png, table.md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--preset", default="grpo")
    ap.add_argument("--offset", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "overlap"))
    args = ap.parse_args()

    from offpolicy.pipeline.compare import run_compare
    from benchmarks.rundirs import fresh_runs, publish
    from offpolicy.train.metrics import read_metrics

    top = Path(args.out)
    out = fresh_runs(top)
    variants = {"sync": ["train.threads=2"],
                "async": ["pipeline.mode=async", f"pipeline.sync_offset={args.offset}", "train.threads=1",
                          "pipeline.explorer_threads=1"]}
    png, md = run_compare([args.preset], args.seeds, out, overrides=[f"train.steps={args.steps}",
                                                                     "run.loggers=[]"], variants=variants)
    lines = ["| mode | median gen s | median train s | median step s | step / max(gen, train) | "
             "step / (gen + train) | wall s (sum of steps) |", "|---|---|---|---|---|---|---|"]
    for mode in variants:
        rows = [r for d in sorted(out.glob(f"{args.preset}-{mode}-s*")) for r in read_metrics(d, "train")[10:]]
        med = {k: statistics.median(r[k] for r in rows) for k in ("gen_s", "train_s", "step_s")}
        wall = sum(r["step_s"] for d in sorted(out.glob(f"{args.preset}-{mode}-s*"))
                   for r in read_metrics(d, "train")) / len(args.seeds)
        lines.append(f"| {mode} | {med['gen_s']:.3f} | {med['train_s']:.3f} | {med['step_s']:.3f} | "
                     f"{med['step_s'] / max(med['gen_s'], med['train_s']):.2f} | "
                     f"{med['step_s'] / (med['gen_s'] + med['train_s']):.2f} | {wall:.1f} |")
    timing = "\n".join(lines)
    md.write_text(md.read_text() + "\n" + timing + "\n")
    publish(top, png, md)
    print(md.read_text())
    print(f"dashboard: {top / 'dashboard.png'}; runs: {out}")


if __name__ == "__main__":
    main()
