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

import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from offpolicy.config import Config
from offpolicy.pipeline.context import (RunLog, build_context, check_run, open_run_buffer, reward_function,
                                        task_source)
from offpolicy.pipeline.explorer import Explorer, weights_version
from offpolicy.pipeline.replay import apply_preset_defaults, sample_strategy
from offpolicy.pipeline.resume import StopRequest, checkpoint_run, restore_run
from offpolicy.pipeline.trainer import RunResult, TrainLoop
from offpolicy.pipeline.weights import PeerGone, WeightChannel
from offpolicy.rewards.guard import RewardFaultError
from offpolicy.train.step import train_step


def _explorer_main(cfg_json: str, channel: WeightChannel, setup, ready, reports, stop, parent_pid: int) -> None:
    """Entry point of the explorer process: generate every batch with its scheduled weight version.

    The process starts before the trainer builds its context and loads its own model meanwhile
    (imports included: most of its start-up), then waits on ``setup`` for the rest of its job (None:
    the trainer failed first). The job: ``tensors`` (the weight slot, see :class:`WeightChannel`),
    ``buffer``, ``run_dir`` and ``start``: ``batch`` (first batch index), ``min_version`` (after a
    resume, the older weights the schedule names are not checkpointed: the checkpoint's version is
    used until the schedule passes it) and ``explorer`` (the task cursor / generator state to
    continue from, or None).
    """
    import os
    import queue


    from offpolicy.rollout.model import policy_from_config

    explorer = None
    alive = lambda: not stop.is_set() and _parent_alive(parent_pid)  # noqa: E731
    try:
        cfg = Config.model_validate_json(cfg_json)
        from offpolicy.threads import thread_split

        torch.set_num_threads(thread_split("async", cfg.train.threads, cfg.pipeline.explorer_threads)[1])
        model, tokenizer = policy_from_config(cfg.model, training=False)  # the trainer's structure (LoRA too)
        job = None
        while job is None:
            if not alive():
                return
            try:
                job = setup.get(timeout=0.5) or {}
            except queue.Empty:
                continue
        if not job:  # the trainer failed before training
            return
        channel.attach(job["tensors"])
        buffer, start = job["buffer"], job["start"]
        tasks, _ = task_source(cfg, tokenizer, report=lambda line: None)  # built once here; the trainer reports
        explorer = Explorer(cfg, model, tokenizer, tasks=tasks, reward_fn=reward_function(cfg),
                            run_dir=Path(job["run_dir"]))
        if start["explorer"] is not None:
            explorer.load_state_dict(start["explorer"])
        loaded = -1
        p = cfg.pipeline
        for e in range(start["batch"], cfg.train.steps):
            t0 = time.perf_counter()
            version = max(weights_version(e, sync_offset=p.sync_offset, sync_interval=p.sync_interval),
                          start["min_version"])
            wait_s = load_s = 0.0
            if version != loaded:
                wait_s, load_s = channel.load(model, version, alive=alive)
                loaded = version
            exps, gen_s = explorer.explore(e, version)
            t1 = time.perf_counter()
            buffer.put(exps)
            reports.put({"batch": e, "gen_s": gen_s, "explorer_idle_s": wait_s, "weight_load_s": load_s,
                         "engine_load_s": explorer.engine_load_s,
                         "buffer_put_s": time.perf_counter() - t1, "explore_s": time.perf_counter() - t0,
                         "state": explorer.state_dict()})
            ready.release()
            if stop.is_set():
                return
    except BaseException as exc:  # report any failure to the trainer instead of dying silently
        fault = isinstance(exc, RewardFaultError)  # a new process would meet it again: not restartable
        reports.put({"error": str(exc) if fault else traceback.format_exc(), "fatal": fault, "pid": os.getpid()})
        ready.release()
    finally:
        if explorer is not None:
            explorer.close()


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _parent_alive(parent_pid: int) -> bool:
    """Whether this process's parent (the trainer) still lives: when it dies this process is re-parented. Not
    ``kill(parent_pid, 0)``, which a dead trainer nobody has reaped yet (a zombie) still answers."""
    import os

    return os.getppid() == parent_pid and _pid_alive(parent_pid)


class ExplorerDied(RuntimeError):
    """The explorer process exited or failed with batches still due (the message says how). ``fatal``:
    it failed in a way a restarted process would repeat (a reward fault)."""

    def __init__(self, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


def _next_report(ready, reports, proc, pending: dict) -> None:
    """Block until the explorer reports one more batch (into ``pending``). Raises ExplorerDied."""
    import queue

    while not ready.acquire(timeout=1.0):
        if not proc.is_alive():
            raise ExplorerDied(f"the explorer process exited (code {proc.exitcode}) with batches still due")
    while True:  # the report may lag the semaphore (a feeder thread writes it), or die with a killed explorer
        try:
            rep = reports.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise ExplorerDied(f"the explorer process exited (code {proc.exitcode}) before its report reached "
                                   "the trainer") from None
    if "error" in rep:
        raise ExplorerDied(f"the explorer process failed:\n{rep['error']}", fatal=rep.get("fatal", False))
    pending[rep["batch"]] = rep


def _batch_index(exps) -> int:
    """The explorer batch a sampled batch came from (the staleness strategy returns one batch's groups)."""
    e = exps[0].batch_index
    if e < 0:
        raise RuntimeError("the sampled experiences carry no batch index; the explorer must pass "
                           "batch_index to the workflow")
    return e


class _ReportedOnly:
    """``strategy`` over the groups of the batches the explorer has reported (up to ``last``; and of unknown
    batch, -1). The explorer puts a batch's rows, then reports it: a trainer that took the rows in between
    and then found the explorer dead would hold a batch it cannot train (no cursor to restart after it),
    while its rows counted as used. Kept out of reach, they are rolled back with the dead explorer's other
    unreported rows (fate ``dropped``) and regenerated."""

    def __init__(self, strategy, last: int):
        self.strategy, self.last = strategy, last

    def select(self, groups, n: int, now_version: int):
        return self.strategy.select([g for g in groups if g.batch_index <= self.last], n, now_version)

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)


class _ExplorerProcess:
    """The explorer process and its hand-offs: the weight channel, the job queue, the batch reports.
    ``restart`` replaces a dead process with a new one that continues after the last batch reported."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mpc = mp.get_context("spawn")
        self.channel = WeightChannel(self.mpc)
        self.pending: dict[int, dict] = {}
        self.latest: tuple[int, dict | None] | None = None  # (batch, cursor after it) of the last report
        self.restarts = 0
        self._spawn()

    def _spawn(self) -> None:
        import os

        mpc = self.mpc
        self.ready, self.reports, self.stop_event, self.setup = mpc.Semaphore(0), mpc.Queue(), mpc.Event(), mpc.Queue()
        self.setup.cancel_join_thread()  # an explorer that died before reading its job must not block our exit
        self.job_sent = False
        # not a daemon: the explorer starts its own reward worker; stop() always ends it
        self.proc = mpc.Process(target=_explorer_main, name="offpolicy-explorer", daemon=False,
                                args=(self.cfg.model_dump_json(), self.channel, self.setup, self.ready, self.reports,
                                      self.stop_event, os.getpid()))
        self.proc.start()

    def send_job(self, ctx, buffer, start: dict) -> None:
        """Publish the weights the explorer starts from and hand it the rest of its job."""
        slot = self.channel.allocate(ctx.model)
        self.channel.publish(ctx.model, start["min_version"], after_loaded=None)
        if start["min_version"]:  # the explorer may need only newer versions; do not wait for it to load this
            self.channel.mark_loaded(start["min_version"])
        self.latest = (start["batch"] - 1, start["explorer"])
        self.setup.put({"tensors": slot, "buffer": buffer, "start": start, "run_dir": str(ctx.run_dir)})
        self.job_sent = True

    def next_batch(self, buffer, strategy, rows: int, now_version: int) -> tuple[list, dict]:
        """Block until the buffer yields the batch for ``now_version``; (its rows, the explorer's report).
        Only reported batches are sampled (:class:`_ReportedOnly`)."""
        while not (exps := buffer.sample(rows, _ReportedOnly(strategy, self.latest[0]), now_version=now_version)):
            self._next_report()
        e = _batch_index(exps)
        while e not in self.pending:  # the explorer reports each batch right after putting it
            self._next_report()
        return exps, self.pending.pop(e)

    def _next_report(self) -> None:
        _next_report(self.ready, self.reports, self.proc, self.pending)
        last = max(self.pending)
        if self.latest is None or last > self.latest[0]:
            self.latest = (last, self.pending[last]["state"])

    def restart(self, ctx, buffer, now_version: int) -> int:
        """Replace the dead explorer: its unreported batches (rows put without a report) are rolled back
        (fate ``dropped`` in the ledger) and regenerated by a new process, from the cursor after the last
        reported batch, with the weights published now. Returns the first batch the new process makes."""
        from offpolicy.pipeline.resume import RollBackBatches

        self.stop()
        last, cursor = self.latest
        buffer.sample(0, RollBackBatches(last), now_version=now_version)
        self.restarts += 1
        self.channel.renew_lock(self.mpc)  # the dead process may have died holding it
        self._spawn()
        start = {"batch": last + 1, "explorer": cursor, "min_version": self.channel.published}
        self.channel.mark_loaded(self.channel.published)
        self.setup.put({"tensors": self.channel.tensors, "buffer": buffer, "start": start, "run_dir": str(ctx.run_dir)})
        self.job_sent = True
        return last + 1

    def stop(self) -> None:
        """Ask the explorer to end and wait for it; terminate it if it does not. Before its job was sent it
        is still importing and loading its model, which it cannot interrupt (tens of seconds on a busy
        machine): it is given longer then, so that it ends by itself."""
        self.stop_event.set()
        self.proc.join(timeout=10 if self.job_sent else 120)
        if self.proc.is_alive():
            self.proc.terminate()


def run_async(cfg: Config, *, run_dir: Path | None = None, resume: bool = False, progress=None,
              log=print, step_fn=train_step) -> RunResult:
    """Train up to ``cfg.train.steps`` steps with the explorer in a separate process (see the module docstring).

    Checkpoints as the synchronous runner does, with the explorer's cursor after the batch trained at
    the checkpoint. On resume, the batches not yet consumed (those the explorer had written ahead) are
    rolled back and regenerated in order from that cursor. The first batches generated after a resume
    use the checkpoint's weights where the schedule names an older version (older weights are not
    saved), so their staleness can be below ``sync_offset`` for a few steps.
    """
    cfg = apply_preset_defaults(cfg)
    runlog = RunLog(progress, cfg, run_dir, resume=resume)  # run.log opens as soon as the run directory exists
    check_run(cfg)
    # the explorer starts first: its start-up (imports, its model) overlaps the trainer's own set-up
    explorer = _ExplorerProcess(cfg)
    opened: list = []  # the buffer and the train loop, closed last first
    try:
        ctx = build_context(cfg, run_dir, resume=resume, log=log, on_run_dir=runlog.open)
        log(f"run directory: {ctx.run_dir}")
        log(ctx.plan.describe())
        buffer = open_run_buffer(cfg, ctx.run_dir)
        opened.append(buffer)
        strategy = sample_strategy(cfg)
        state, start = None, {"batch": 0, "explorer": None, "min_version": 0}
        if resume:
            state = restore_run(ctx, strategy=strategy, buffer=buffer)
            start = {"batch": state["next_batch"], "explorer": state["explorer"], "min_version": state["step"]}
            log(f"resuming from step {state['step']} ({state['path']}); the explorer continues at batch "
                f"{start['batch']}")
        explorer.send_job(ctx, buffer, start)
        loop = TrainLoop(ctx, strategy, progress=runlog.handed_on(), resumed=state, step_fn=step_fn)
        opened.append(loop)
        if resume:
            ctx.write_config()
        return _train(ctx, explorer, buffer, strategy, loop, start, state)
    finally:
        explorer.stop()
        for obj in reversed(opened):
            obj.close()


def _train(ctx, explorer: _ExplorerProcess, buffer, strategy, loop: TrainLoop, start: dict,
           state: dict | None) -> RunResult:
    """The trainer side of an async run: take each batch as the explorer writes it, train, publish."""
    cfg, p = ctx.cfg, ctx.cfg.pipeline
    rows = loop.rows
    last_needed = weights_version(cfg.train.steps - 1, sync_offset=p.sync_offset, sync_interval=p.sync_interval)
    first = start["min_version"]
    # the explorer's cursor after each batch (from its reports; after a resume, from the checkpoint);
    # a checkpoint at step s stores the cursor after batch s - 1: a resume rolls back every batch not yet
    # consumed (the few the explorer wrote ahead) and regenerates from there, in order
    cursor = {start["batch"] - 1: start["explorer"]} if state else {}

    def save(step: int, eval_after: dict | None = None) -> None:
        checkpoint_run(ctx, step, explorer_state=cursor[step - 1], strategy=strategy,
                       trainer_state=loop.state_dict(), next_batch=step, eval_after=eval_after, frozen=loop.frozen_models())

    with StopRequest() as stop:
        t0 = time.perf_counter()
        for step in range(first + 1, cfg.train.steps + 1):
            t_wait = time.perf_counter()
            exps, report = _next_or_restart(ctx, explorer, buffer, strategy, rows, step, save=save,
                                            can_save=step > first + 1)
            idle_s = time.perf_counter() - t_wait
            e = report.pop("batch")
            cursor[e] = report.pop("state")
            for old in [k for k in cursor if k < e]:  # a checkpoint needs the cursor of the batch just trained only
                del cursor[old]

            def publish(step=step) -> dict:
                wait = publish_s = 0.0
                if step % p.sync_interval == 0 and step <= last_needed:
                    try:
                        wait, publish_s = explorer.channel.publish(ctx.model, step, after_loaded=step - p.sync_interval,
                                                                   alive=explorer.proc.is_alive)
                    except PeerGone:  # publish anyway: the next wait for a batch notices the death and restarts
                        # the explorer from these weights, or (no restart left) stops with a checkpoint of this
                        # step, once its record is written (a restart here would stop without either)
                        explorer.channel.renew_lock(explorer.mpc)
                        wait, publish_s = explorer.channel.publish(ctx.model, step, after_loaded=None)
                return {"publish_s": publish_s, "publish_wait_s": wait}

            restarts = {"explorer_restarts": explorer.restarts} if explorer.restarts else {}
            loop.step(step, exps, t0, {**report, "trainer_idle_s": idle_s, **restarts}, save=save, stop=stop,
                      after_train=publish)
            t0 = time.perf_counter()  # evaluation and checkpoints are not step time (as in sync)
        result = loop.finish()
        save(cfg.train.steps, result.eval_after)
        return result


def _next_or_restart(ctx, explorer: _ExplorerProcess, buffer, strategy, rows: int, step: int, *, save,
                     can_save: bool) -> tuple[list, dict]:
    """The batch for ``step``; a dead explorer is restarted up to ``pipeline.explorer_restarts`` times,
    after that the run stops with a checkpoint of the last step (ExplorerDied)."""
    limit = ctx.cfg.pipeline.explorer_restarts
    while True:
        try:
            return explorer.next_batch(buffer, strategy, rows, now_version=step - 1)
        except ExplorerDied as err:
            if (err.fatal or explorer.restarts >= limit) and can_save:
                save(step - 1)
            _restart(ctx, explorer, buffer, step, err)


def _restart(ctx, explorer: _ExplorerProcess, buffer, step: int, err: ExplorerDied) -> None:
    """Restart a dead explorer, or raise ExplorerDied past ``pipeline.explorer_restarts`` (or when it died
    of a reward fault, which a new process would meet again)."""
    import sys

    limit = ctx.cfg.pipeline.explorer_restarts
    if err.fatal:
        raise err
    if explorer.restarts >= limit:
        raise ExplorerDied(f"{err}\n(restarted {explorer.restarts} time(s); pipeline.explorer_restarts={limit})") from None
    first = explorer.restart(ctx, buffer, now_version=step - 1)
    print(f"step {step}: {str(err).splitlines()[0]}; restarting it ({explorer.restarts}/{limit}), regenerating "
          f"from batch {first}", file=sys.stderr, flush=True)
