"""Profile offpolicy's two halves on the demo batch: the engine's sampling and the training step.

    .venv/bin/python benchmarks/profile_step.py [--threads 2] [--repeats 30] [key.sub=value ...]

Generates one batch of the default demo (32 prompts x 8 samples) with the bundled model, then reports
the median seconds of ``Explorer.explore`` (sampling + reward) and of ``train_step`` on that batch
(collate included), and a ``torch.profiler`` table of ten training steps (operators by self CPU time).
Overrides apply to the config, e.g. ``model.attn_implementation=eager`` or ``algorithm.preset=rec_oneside_nois``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rows", type=int, default=30, help="rows of the profiler table")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from offpolicy.config import load_config
    from offpolicy.data.experience import collate
    from offpolicy.pipeline.context import build_context
    from offpolicy.pipeline.explorer import Explorer
    from offpolicy.train.step import train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run.dir={tmp}/run", "run.loggers=[]", f"train.threads={args.threads}",
                                 *args.overrides])
        ctx = build_context(cfg, None)
        torch.set_num_threads(args.threads)
        explorer = Explorer.from_context(ctx)
        try:
            exps, _ = explorer.explore(0, version=0)
            batches = iter(range(1, 10**6))

            def train() -> None:
                batch = collate(exps, ctx.tokenizer.pad_token_id)
                train_step(ctx.model, ctx.optimizer, batch, ctx.algo, ctx.plan)

            for _ in range(5):  # warm-up
                train()
            batch = collate(exps, ctx.tokenizer.pad_token_id)
            print(f"batch {tuple(batch.input_ids_BL.shape)} (prompt length {batch.prompt_len}), "
                  f"{args.threads} thread(s), preset {cfg.algorithm.preset}")
            print(f"explore (sampling + reward), median s: "
                  f"{_median_s(lambda: explorer.explore(next(batches), version=0), args.repeats):.4f}")
            print(f"collate, median s: {_median_s(lambda: collate(exps, ctx.tokenizer.pad_token_id), args.repeats):.4f}")
            print(f"train_step (collate included), median s: {_median_s(train, args.repeats):.4f}")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    train()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        finally:
            explorer.close()


if __name__ == "__main__":
    main()
