"""Benchmark: the REC paper's central claim in miniature — which losses stay stable on stale data?

    .venv/bin/python benchmarks/staleness.py [--steps 200] [--seeds 0 1] [--interval 10]

Runs reinforce, grpo, rec_oneside_nois, rec_oneside_is, rec_ring_nois and asymre on the demo with the
asynchronous pipeline and heavy staleness (weights published every ``--interval`` trainer steps, so a
batch is 0 .. interval-1 versions old), plus on-policy sync grpo as the reference; every preset on the
same tasks and seeds. The runs go to benchmarks/out/staleness/runs/<time>/ (a rerun starts afresh); the
dashboard and the table are copied to benchmarks/out/staleness/{dashboard.png, table.md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = ["reinforce", "grpo", "rec_oneside_nois", "rec_oneside_is", "rec_ring_nois", "asymre"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "staleness"))
    args = ap.parse_args()

    from benchmarks.rundirs import fresh_runs, publish
    from offpolicy.pipeline.compare import run_compare
    from offpolicy.report import dashboard, load_run, summary_table

    common = [f"train.steps={args.steps}", "eval.every=20", "run.loggers=[]", "train.threads=1"]
    stale = {f"interval{args.interval}": ["pipeline.mode=async", f"pipeline.sync_interval={args.interval}"]}
    top = Path(args.out)
    out = fresh_runs(top)
    run_compare(["grpo"], args.seeds, out / "sync", overrides=common)
    run_compare(PRESETS, args.seeds, out / "stale", overrides=common, variants=stale)
    runs = [load_run(d, "grpo sync (on-policy)") for d in sorted((out / "sync").glob("grpo-s*"))]
    runs += [load_run(d, f"{d.name.split('-interval')[0]} stale") for p in PRESETS
             for d in sorted((out / "stale").glob(f"{p}-interval*"))]
    table, target = summary_table(runs)
    png = dashboard(runs, out / "dashboard.png",
                    title=f"async, sync_interval={args.interval} (staleness 0..{args.interval - 1}); "
                          f"{args.steps} steps; seeds {args.seeds}")
    (out / "table.md").write_text(table + "\n")
    publish(top, png, out / "table.md")
    print(table)
    print(f"dashboard: {top / 'dashboard.png'}; runs: {out}")


if __name__ == "__main__":
    main()
