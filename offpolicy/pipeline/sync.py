"""The synchronous runner: generate a batch with the current weights, then train on it, alternating.

The on-policy baseline (staleness 0). Data still flows through the buffer and the sample strategy,
exactly as in the asynchronous runner, and the step body (:meth:`TrainLoop.step`) is the same; only the
scheduling differs. The run is checkpointed every ``checkpoint.every`` steps, at the end, on
SIGTERM/SIGINT and before stopping on a fault; ``resume=True`` continues from the newest checkpoint
(see :mod:`.resume`).
"""

from __future__ import annotations

import time
from pathlib import Path

from offpolicy.config import Config
from offpolicy.pipeline.context import RunLog, build_context, check_run, open_run_buffer
from offpolicy.pipeline.explorer import Explorer, RewardFaultError
from offpolicy.pipeline.replay import apply_preset_defaults, fresh_prompts, sample_strategy
from offpolicy.pipeline.resume import StopRequest, checkpoint_run, restore_run
from offpolicy.pipeline.trainer import RunResult, TrainLoop
from offpolicy.train.step import train_step


def run_sync(cfg: Config, *, run_dir: Path | None = None, resume: bool = False, progress=None,
             log=print, step_fn=train_step) -> RunResult:
    """Train up to ``cfg.train.steps`` steps, evaluating at the start, every ``cfg.eval.every`` steps and at the end."""
    cfg = apply_preset_defaults(cfg)
    runlog = RunLog(progress, cfg, run_dir, resume=resume)  # run.log opens as soon as the run directory exists
    check_run(cfg)
    ctx = build_context(cfg, run_dir, resume=resume, log=log, on_run_dir=runlog.open)
    log(f"run directory: {ctx.run_dir}")
    log(ctx.plan.describe())
    explorer = Explorer.from_context(ctx)
    buffer = loop = None
    try:
        buffer = open_run_buffer(cfg, ctx.run_dir)
        strategy = sample_strategy(cfg)
        state = None
        if resume:
            state = restore_run(ctx, strategy=strategy, buffer=buffer)
            explorer.load_state_dict(state["explorer"])
            log(f"resuming from step {state['step']} ({state['path']})")
        loop = TrainLoop(ctx, strategy, progress=runlog.handed_on(), resumed=state, step_fn=step_fn)
        if resume:
            ctx.write_config()
    except BaseException:
        for obj in (loop, buffer, explorer):
            if obj is not None:
                obj.close()
        raise
    rows = loop.rows

    def save(step: int, explorer_state: dict | None = None, eval_after: dict | None = None) -> None:
        checkpoint_run(ctx, step, explorer_state=explorer_state or explorer.state_dict(), strategy=strategy,
                       trainer_state=loop.state_dict(), eval_after=eval_after, frozen=loop.frozen_models())

    try:
        with StopRequest() as stop:
            for step in range((state or {}).get("step", 0) + 1, cfg.train.steps + 1):
                t0 = time.perf_counter()
                before = explorer.state_dict()
                try:
                    exps, gen_s = explorer.explore(step - 1, version=step - 1,
                                                   prompts=fresh_prompts(cfg, strategy, buffer, step - 1))
                except RewardFaultError:
                    save(step - 1, before)
                    raise
                buffer.put(exps)
                exps = buffer.sample(rows, strategy, now_version=step - 1)
                timings = {"gen_s": gen_s, "engine_load_s": explorer.engine_load_s,
                           "buffer_s": time.perf_counter() - t0 - gen_s - explorer.engine_load_s}
                loop.step(step, exps, t0, timings, save=save, stop=stop)
            result = loop.finish()
            save(cfg.train.steps, eval_after=result.eval_after)
            return result
    finally:
        loop.close()
        buffer.close()
        explorer.close()
