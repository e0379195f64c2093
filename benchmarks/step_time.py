"""Benchmark: time the on-policy GRPO step of the default demo and draw its learning curve.

    .venv/bin/python benchmarks/step_time.py [--steps 300] [--warmup 10] [key.sub=value ...]

Runs ``offpolicy train`` (sync, the embedded default unless overridden), then reports the median
generation, training and total step seconds over the steps after warm-up, and writes
``benchmarks/out/learning_curve.png`` (held-out greedy accuracy and batch reward vs step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offpolicy.config import load_config
    from offpolicy.pipeline import run as run_pipeline
    from offpolicy.train.metrics import read_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides) + [f"run.dir={out / 'run-{time}'}", "run.progress=false"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    res = run_pipeline(cfg, log=lambda *a: None)
    wall = time.perf_counter() - t0
    train = read_metrics(res.run_dir, "train")[args.warmup :]
    evals = read_metrics(res.run_dir, "eval")
    if len(train) < 50:
        print(f"warning: only {len(train)} timed steps (want >= 50)")
    med = lambda k: statistics.median(r[k] for r in train)  # noqa: E731
    step = statistics.median(r["gen_s"] + r["train_s"] for r in train)
    eval_s = sum(r["eval_s"] for r in evals)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-")
    ax[0].set(xlabel="step", ylabel="held-out greedy accuracy", title=f"{cfg.algorithm.preset} on the demo")
    all_train = read_metrics(res.run_dir, "train")
    ax[1].plot([r["step"] for r in all_train], [r["reward_mean"] for r in all_train], lw=0.8)
    ax[1].set(xlabel="step", ylabel="batch reward (exact match)")
    fig.tight_layout()
    png = out / "learning_curve.png"
    fig.savefig(png, dpi=120)

    print(f"| preset | steps timed | median gen s | median train s | median step s | eval before -> after | "
          f"wall s (incl. {eval_s:.0f} s eval) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {cfg.algorithm.preset} | {len(train)} | {med('gen_s'):.3f} | {med('train_s'):.3f} | {step:.3f} | "
          f"{res.eval_before['accuracy']:.3f} -> {res.eval_after['accuracy']:.3f} | {wall:.0f} |")
    print(f"learning curve: {png}; run: {res.run_dir}")


if __name__ == "__main__":
    main()
