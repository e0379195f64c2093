"""The asynchronous runner: the explorer generates in its own process while the trainer trains.

Hand-offs: experiences go through the durable SQLite buffer (one ``put`` per batch, atomic);
weights come back through a shared-memory :class:`~offpolicy.pipeline.weights.WeightChannel`
with a version number. The schedule (``weights_version`` in :mod:`.explorer`) fixes which policy
version generates each batch, from ``pipeline.sync_offset`` and ``pipeline.sync_interval``; the
explorer waits for that version rather than produce data older than the bound (admission control),
and never drops finished work. With ``sync_offset=0, sync_interval=1`` the result equals the
synchronous runner's, bit for bit, for the same seed.
"""

from __future__ import annotations

import queue
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from offpolicy.config import Config
from offpolicy.data.sampling import make_strategy
from offpolicy.pipeline.explorer import Explorer, weights_version
from offpolicy.pipeline.context import build_context, describe_logprobs, open_run_buffer
from offpolicy.pipeline.trainer import RunResult, TrainLoop
from offpolicy.pipeline.weights import WeightChannel


def _explorer_main(cfg_json: str, channel: WeightChannel, buffer, ready, reports, stop, parent_pid: int) -> None:
    """Entry point of the explorer process: generate every batch with its scheduled weight version."""
    import os

    import torch

    from offpolicy.rollout.model import load_policy

    try:
        cfg = Config.model_validate_json(cfg_json)
        torch.set_num_threads(cfg.pipeline.explorer_threads)
        model, tokenizer = load_policy(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype)
        explorer = Explorer(cfg, model, tokenizer)
        alive = lambda: not stop.is_set() and _pid_alive(parent_pid)  # noqa: E731
        loaded = -1
        p = cfg.pipeline
        for e in range(cfg.train.steps):
            t0 = time.perf_counter()
            version = weights_version(e, sync_offset=p.sync_offset, sync_interval=p.sync_interval)
            wait_s = load_s = 0.0
            if version != loaded:
                wait_s, load_s = channel.load(model, version, alive=alive)
                loaded = version
            exps, gen_s = explorer.explore(e, version)
            t1 = time.perf_counter()
            buffer.put(exps)
            reports.put({"batch": e, "gen_s": gen_s, "explorer_idle_s": wait_s, "weight_load_s": load_s,
                         "buffer_put_s": time.perf_counter() - t1, "explore_s": time.perf_counter() - t0})
            ready.release()
            if stop.is_set():
                return
    except BaseException:  # report any failure to the trainer instead of dying silently
        reports.put({"error": traceback.format_exc(), "pid": os.getpid()})
        ready.release()


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _wait_batch(ready, reports, proc, pending: dict, e: int) -> tuple[float, dict]:
    """Block until the explorer reports batch ``e``; (seconds waited, its report). Raises on explorer failure."""
    t0 = time.perf_counter()
    while e not in pending:
        if not ready.acquire(timeout=1.0):
            if not proc.is_alive():
                raise RuntimeError(f"the explorer process exited (code {proc.exitcode}) before batch {e}")
            continue
        while True:
            try:
                rep = reports.get(timeout=5.0)
            except queue.Empty:
                break
            if "error" in rep:
                raise RuntimeError(f"the explorer process failed:\n{rep['error']}")
            pending[rep["batch"]] = rep
            break
    return time.perf_counter() - t0, pending.pop(e)


def run_async(cfg: Config, *, run_dir: Path | None = None, progress=None, log=print) -> RunResult:
    """Train ``cfg.train.steps`` steps with the explorer in a separate process (see the module docstring)."""
    import os

    ctx = build_context(cfg, run_dir)
    log(f"run directory: {ctx.run_dir}")
    log(describe_logprobs(ctx))
    p = cfg.pipeline
    mpc = mp.get_context("spawn")
    channel = WeightChannel(ctx.model, mpc)
    channel.publish(ctx.model, 0, after_loaded=None)
    buffer = open_run_buffer(cfg, ctx.run_dir)
    strategy = make_strategy("staleness", max_staleness=cfg.staleness_bound)
    ready, reports, stop = mpc.Semaphore(0), mpc.Queue(), mpc.Event()
    proc = mpc.Process(target=_explorer_main, name="offpolicy-explorer", daemon=True,
                       args=(cfg.model_dump_json(), channel, buffer, ready, reports, stop, os.getpid()))
    proc.start()
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    last_needed = weights_version(cfg.train.steps - 1, sync_offset=p.sync_offset, sync_interval=p.sync_interval)
    loop = TrainLoop(ctx, progress=progress)
    pending: dict[int, dict] = {}
    try:
        t_prev = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            idle_s, report = _wait_batch(ready, reports, proc, pending, step - 1)
            exps = buffer.sample(rows, strategy, now_version=step - 1)
            if len(exps) != rows:
                raise RuntimeError(f"buffer returned {len(exps)} rows for step {step}, expected {rows}")
            record = loop.train(exps, step)
            publish_wait = publish_s = 0.0
            if step % p.sync_interval == 0 and step <= last_needed:
                publish_wait, publish_s = channel.publish(ctx.model, step, after_loaded=step - p.sync_interval)
            now = time.perf_counter()
            timings = {k: v for k, v in report.items() if k != "batch"}
            loop.log(record, {**timings, "trainer_idle_s": idle_s, "publish_s": publish_s,
                              "publish_wait_s": publish_wait, "step_s": now - t_prev})
            t_prev = now
        return loop.finish()
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
        loop.close()
        buffer.close()
