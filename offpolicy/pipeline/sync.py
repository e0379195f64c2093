"""The synchronous runner: generate a batch with the current weights, then train on it, alternating.

This is the on-policy baseline (staleness 0, reuse 1). Each step writes one ``kind="train"``
record to ``metrics.jsonl``; evaluations write ``kind="eval"`` records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from offpolicy.config import Config
from offpolicy.data.experience import collate
from offpolicy.pipeline.run import RunContext, build_context
from offpolicy.rollout.engine import HFEngine
from offpolicy.rollout.workflow import single_turn
from offpolicy.train.evaluate import evaluate
from offpolicy.train.metrics import MetricsWriter
from offpolicy.train.step import train_step


@dataclass
class RunResult:
    run_dir: Path
    eval_before: dict
    eval_after: dict
    steps: int
    seconds: float


def _evaluate(ctx: RunContext, step: int, writer: MetricsWriter) -> dict:
    t0 = time.perf_counter()
    res = evaluate(ctx.model, ctx.tokenizer, ctx.eval_tasks, ctx.reward_fn,
                   max_new_tokens=ctx.cfg.rollout.max_new_tokens)
    writer.write({"kind": "eval", "step": step, **res, "eval_s": time.perf_counter() - t0})
    return res


def explore_step(ctx: RunContext, engine: HFEngine, version: int):
    """Generate and score one batch of experiences with the current weights."""
    r = ctx.cfg.rollout
    ctx.model.eval()
    return single_turn(engine, ctx.tokenizer, ctx.next_tasks(), ctx.reward_fn, group_size=r.group_size,
                       max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                       version=version, generator=ctx.generator)


def step_record(step: int, exps, train_stats: dict, gen_s: float, train_s: float) -> dict:
    rewards = torch.tensor([e.reward for e in exps])
    lengths = torch.tensor([len(e.response_ids) for e in exps], dtype=torch.float32)
    n_tokens = float(lengths.sum())
    return {
        "kind": "train", "step": step, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "accuracy": float(torch.tensor([e.info.get("correct", False) for e in exps], dtype=torch.float32).mean()),
        "response_len": float(lengths.mean()), "gen_s": gen_s, "train_s": train_s,
        "tokens_per_s": n_tokens / max(gen_s + train_s, 1e-9), **train_stats,
    }


def run_sync(cfg: Config, *, run_dir: Path | None = None, progress=None, log=print) -> RunResult:
    """Train ``cfg.train.steps`` steps, evaluating at the start, every ``cfg.eval.every`` steps and at the end."""
    start = time.perf_counter()
    ctx = build_context(cfg, run_dir)
    log(f"run directory: {ctx.run_dir}")
    engine = HFEngine(ctx.model, pad_id=ctx.tokenizer.pad_token_id, eos_id=ctx.tokenizer.eos_token_id)
    writer = MetricsWriter(ctx.run_dir, tensorboard=cfg.run.tensorboard)
    try:
        before = _evaluate(ctx, 0, writer)
        if progress:
            progress.start(cfg.train.steps, before["accuracy"])
        for step in range(1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            exps = explore_step(ctx, engine, version=step - 1)
            t1 = time.perf_counter()
            batch = collate(exps, ctx.tokenizer.pad_token_id)
            stats = train_step(ctx.model, ctx.optimizer, batch, ctx.algo, grad_clip=cfg.train.grad_clip,
                               micro_batches=cfg.train.micro_batches, temperature=cfg.rollout.temperature,
                               ref_model=ctx.ref_model, scheduler=ctx.scheduler)
            record = step_record(step, exps, stats, t1 - t0, time.perf_counter() - t1)
            writer.write(record)
            last_eval = None
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
                last_eval = _evaluate(ctx, step, writer)["accuracy"]
            if progress:
                progress.update(step, record, last_eval)
        after = _evaluate(ctx, cfg.train.steps, writer)
        if cfg.run.save_final:
            ctx.model.save_pretrained(ctx.run_dir / "final", safe_serialization=True)
            ctx.tokenizer.save_pretrained(ctx.run_dir / "final")
    finally:
        writer.close()
        if progress:
            progress.stop()
    return RunResult(ctx.run_dir, before, after, cfg.train.steps, time.perf_counter() - start)
