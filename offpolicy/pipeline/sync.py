"""The synchronous runner: generate a batch with the current weights, then train on it, alternating.

The on-policy baseline (staleness 0). Data still flows through the buffer and the sample strategy,
exactly as in the asynchronous runner, so the two share every step but the scheduling.
"""

from __future__ import annotations

import time
from pathlib import Path

from offpolicy.config import Config
from offpolicy.data.sampling import make_strategy
from offpolicy.pipeline.explorer import Explorer
from offpolicy.pipeline.context import build_context, describe_logprobs, open_run_buffer
from offpolicy.pipeline.trainer import RunResult, TrainLoop


def run_sync(cfg: Config, *, run_dir: Path | None = None, progress=None, log=print) -> RunResult:
    """Train ``cfg.train.steps`` steps, evaluating at the start, every ``cfg.eval.every`` steps and at the end."""
    ctx = build_context(cfg, run_dir)
    log(f"run directory: {ctx.run_dir}")
    log(describe_logprobs(ctx))
    explorer = Explorer(cfg, ctx.model, ctx.tokenizer)
    buffer = open_run_buffer(cfg, ctx.run_dir)
    strategy = make_strategy("fifo")
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    loop = TrainLoop(ctx, progress=progress)
    try:
        for step in range(1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            exps, gen_s = explorer.explore(step - 1, version=step - 1)
            buffer.put(exps)
            exps = buffer.sample(rows, strategy, now_version=step - 1)
            buffer_s = time.perf_counter() - t0 - gen_s
            record = loop.train(exps, step)
            loop.log(record, {"gen_s": gen_s, "buffer_s": buffer_s, "step_s": time.perf_counter() - t0})
        return loop.finish()
    finally:
        loop.close()
        buffer.close()
