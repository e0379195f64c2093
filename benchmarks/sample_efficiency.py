"""Benchmark: rollouts needed to reach on-policy GRPO's final held-out accuracy.

    .venv/bin/python benchmarks/sample_efficiency.py [--steps 400] [--seeds 0 1 2] [--configs ...]

Runs the default demo (bundled model, 32 prompts x 8 per step) with on-policy sync ``grpo`` as the
reference and off-policy configurations on the same tasks and seeds:

- ``grpo_async1``: grpo, async, ``sync_offset=1`` (every batch one version stale; pi_old = the sampling
  policy, ``train.old_logp=auto``);
- ``rec_async1``: ``rec_oneside_nois``, async, ``sync_offset=1``;
- ``remix``: sync, mix p=0.4 over the last 2 policies, m=2, reincarnation at step 50 (fewer fresh
  rollouts per step).

"Rollouts" count generated samples (``fresh_samples``), so replayed rows are not counted twice. The target
is the reference's final accuracy (mean over seeds); the table gives, per configuration, the mean final
accuracy and the rollouts / training seconds at the first evaluation reaching the target. Runs already
finished in ``--out`` are reused (the results do not depend on timing: the async schedule is exact).
Writes ``--out``/{dashboard.png, table.md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ASYNC1 = ["pipeline.mode=async", "pipeline.sync_offset=1", "train.threads=1", "pipeline.explorer_threads=1"]
CONFIGS = {  # name: (preset, overrides, label)
    "grpo_sync": ("grpo", ["train.threads=2"], "grpo sync (on-policy)"),
    "grpo_async1": ("grpo", ASYNC1, "grpo async offset 1"),
    "rec_async1": ("rec_oneside_nois", ASYNC1, "rec_oneside_nois async offset 1"),
    "remix": ("remix", ["train.threads=2"], "remix sync"),
}


def _finished(run_dir: Path, steps: int) -> bool:
    from offpolicy.train.metrics import read_metrics

    return (run_dir / "metrics.jsonl").exists() and any(r["step"] == steps for r in read_metrics(run_dir, "eval"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="the first is the reference")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sample_efficiency"))
    args = ap.parse_args()

    from offpolicy.pipeline.compare import run_compare
    from offpolicy.report import dashboard, load_run, summary_table

    out = Path(args.out)
    common = [f"train.steps={args.steps}", f"eval.every={args.eval_every}", "run.loggers=[]"]
    runs = []
    for name in args.configs:
        preset, extra, label = CONFIGS[name]
        todo = [s for s in args.seeds if not _finished(out / name / f"{preset}-s{s}", args.steps)]
        if todo:
            run_compare([preset], todo, out / name, overrides=[*common, *extra])
        runs += [load_run(out / name / f"{preset}-s{s}", label) for s in args.seeds]
    table, target = summary_table(runs)
    ref_rollouts = args.steps * 32 * 8
    lines = [table, "", f"Target: the reference runs' mean final accuracy {target:.3f} after {ref_rollouts:,} "
                        f"rollouts ({args.steps} steps); 0.5x = {ref_rollouts // 2:,} rollouts."]
    png = dashboard(runs, out / "dashboard.png", title=f"demo, {args.steps} steps, seeds {args.seeds}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"dashboard: {png}")


if __name__ == "__main__":
    main()
