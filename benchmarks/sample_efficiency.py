"""Benchmark: rollouts needed to reach on-policy GRPO's final held-out accuracy (issue: sample efficiency).

    .venv/bin/python benchmarks/sample_efficiency.py [--steps 400] [--seeds 0 1 2]

Runs the default demo (bundled model, 32 prompts x 8 per step, 400 steps) with on-policy sync ``grpo`` as
the reference and three off-policy configurations on the same tasks and seeds:

- ``grpo`` async, ``sync_offset=1`` (every batch one version stale; pi_old = the sampling policy);
- ``rec_oneside_nois`` async, ``sync_offset=1``;
- ``remix`` sync (mix p=0.4 over the last 2 policies, m=2, reincarnation at step 50): fewer fresh
  rollouts per step.

"Rollouts" count generated samples (``fresh_samples``), so replayed rows are not counted twice. The target
is the reference's final accuracy (mean over seeds); the table gives, per configuration, the mean final
accuracy and the rollouts / training seconds at the first evaluation reaching the target. Writes
benchmarks/out/sample_efficiency/{dashboard.png, table.md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ASYNC1 = ["pipeline.mode=async", "pipeline.sync_offset=1", "train.threads=1", "pipeline.explorer_threads=1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sample_efficiency"))
    args = ap.parse_args()

    from offpolicy.pipeline.compare import run_compare
    from offpolicy.report import dashboard, load_run, summary_table

    out = Path(args.out)
    common = [f"train.steps={args.steps}", f"eval.every={args.eval_every}", "run.tensorboard=false"]
    run_compare(["grpo"], args.seeds, out / "onpolicy", overrides=[*common, "train.threads=2"])
    run_compare(["grpo", "rec_oneside_nois"], args.seeds, out / "async", overrides=common,
                variants={"async1": ASYNC1})
    run_compare(["remix"], args.seeds, out / "remix", overrides=[*common, "train.threads=2"])
    runs = [load_run(d, "grpo sync (on-policy)") for d in sorted((out / "onpolicy").glob("grpo-s*"))]
    runs += [load_run(d, f"{p} async offset 1") for p in ("grpo", "rec_oneside_nois")
             for d in sorted((out / "async").glob(f"{p}-async1-s*"))]
    runs += [load_run(d, "remix sync") for d in sorted((out / "remix").glob("remix-s*"))]
    table, target = summary_table(runs)
    ref_rollouts = args.steps * 32 * 8
    lines = [table, "", f"Target: the on-policy grpo runs' mean final accuracy {target:.3f}, reached by them "
                        f"after {ref_rollouts:,} rollouts ({args.steps} steps); 0.5x = {ref_rollouts // 2:,}."]
    png = dashboard(runs, out / "dashboard.png", title=f"demo, {args.steps} steps, seeds {args.seeds}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"dashboard: {png}")


if __name__ == "__main__":
    main()
