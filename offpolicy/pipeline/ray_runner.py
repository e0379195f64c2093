"""The Ray runner: ``pipeline.explorers`` explorer actors and a trainer group, from the same config.

Roles are those of the async runner, reused rather than copied: each explorer actor holds an
:class:`~offpolicy.pipeline.explorer.Explorer` (its own engine, task stream and reward), the trainer is
the run's own process driving :class:`~offpolicy.pipeline.trainer.TrainLoop` (evaluation, metrics,
checkpoints), with ``train.workers - 1`` more data-parallel ranks as actors
(:mod:`offpolicy.train.distributed`), and the buffer is the run's SQL buffer (the SQLite file in the run
directory on one machine, or ``buffer.kind=sql`` for explorers on other machines), which every actor
opens by address.

Schedule: trainer batch ``e`` is generated with the weights of version ``weights_version(e)``
(``pipeline.sync_offset``, ``pipeline.sync_interval``; see :mod:`.explorer`) and trained at step
``e + 1``, exactly as in the async runner. It is split over the N explorers: explorer ``j`` generates
shard ``j`` (prompts ``arange(P).tensor_split(N)[j]``, the tasks the one explorer of an async run would
draw there: each actor skips the others' tasks), tagged with explorer batch index ``e * N + j``. Shard
calls are dispatched the moment their weight version exists (admission control: nothing older than the
bound is ever produced), so explorers run ahead by up to ``sync_offset`` batches and queue the rest.
Each version is published once, by ``ray.put`` of the trainable state (as numpy byte arrays, which Ray
copies once into the object store and hands to actors without a copy); its object is freed when no batch
left needs it. With N=1 and staleness 0 the run equals ``pipeline.mode=sync`` bit for bit.

Faults: an explorer actor that dies (or fails) is replaced; the rows of its shards not yet trained are
rolled back (fate ``dropped`` in the buffer's ledger) and regenerated from its cursor after the last shard
it reported, with the very weight versions the schedule names for them; at most
``pipeline.explorer_restarts`` times, then the run stops with a checkpoint (ExplorerDied). A reward fault
(which a new actor would meet again) stops at once. A trainer rank that dies stops the run
(:class:`TrainerDied`) with a checkpoint of the last completed step. Checkpoints hold every explorer's
cursor, so ``--resume`` continues a Ray run like the others.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from offpolicy.config import Config, ConfigError
from offpolicy.pipeline.asynchronous import ExplorerDied
from offpolicy.pipeline.context import (RunLog, build_context, check_run, open_run_buffer, reward_function,
                                        task_source)
from offpolicy.pipeline.explorer import Explorer, weights_version
from offpolicy.pipeline.replay import apply_preset_defaults, sample_strategy
from offpolicy.pipeline.resume import StopRequest, checkpoint_run, restore_run
from offpolicy.pipeline.trainer import RunResult, TrainLoop
from offpolicy.data.sampling import Selection
from offpolicy.rewards.guard import RewardFaultError
from offpolicy.train.step import train_step
from offpolicy.train.distributed import with_rank0_logprobs


class TrainerDied(RuntimeError):
    """A rank of the data-parallel trainer group died or failed; the run stops (with a checkpoint of the last
    completed step when the weights are intact, see :meth:`TrainerGroup.train_step`)."""

    def __init__(self, message: str, *, intact: bool):
        super().__init__(message)
        self.intact = intact


def _shard(prompts: int, explorers: int, j: int) -> tuple[int, int]:
    """(first prompt, prompt count) of explorer ``j``'s shard of a batch of ``prompts`` prompts."""
    sizes = [len(part) for part in torch.arange(prompts).tensor_split(explorers)]
    return sum(sizes[:j]), sizes[j]


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Tensors as (uint8 numpy array, dtype, shape): Ray stores numpy arrays out of band (one memcpy into the
    object store, read back without a copy), which measured 10x faster than pickling the tensors. A tied
    name (:func:`~offpolicy.rollout.model.tied_aliases`) is packed as the name it shares its tensor with."""
    from offpolicy.rollout.model import tied_aliases

    aliases = tied_aliases(state)
    out = {}
    for k, v in state.items():
        if k in aliases:
            out[k] = aliases[k]
            continue
        v = v.detach().to("cpu").contiguous()
        out[k] = (v.reshape(-1).view(torch.uint8).numpy(), str(v.dtype).removeprefix("torch."), tuple(v.shape))
    return out


def unpack_state(packed: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack_state` (views of the object store's read-only memory: copy before writing)."""
    import warnings

    with warnings.catch_warnings():  # the arrays are read-only; load_state_dict only reads them
        warnings.simplefilter("ignore", UserWarning)
        out = {k: torch.from_numpy(v[0]).view(getattr(torch, v[1])).view(v[2]) for k, v in packed.items()
               if not isinstance(v, str)}
    return {k: out[v] if isinstance(v, str) else out[k] for k, v in packed.items()}


def _encode_cursor(state: dict | None) -> dict | None:
    """An explorer cursor (``Explorer.state_dict()``) as JSON (the generator state in hex)."""
    return None if state is None else {"tasks_consumed": state["tasks_consumed"], "generator": state["generator"].hex()}


def _decode_cursor(state: dict | None) -> dict | None:
    return None if state is None else {"tasks_consumed": state["tasks_consumed"],
                                        "generator": bytes.fromhex(state["generator"])}


# ----------------------------------------------------------------------------------------------- actors


class ExplorerActor:
    """Explorer ``index`` of N (a Ray actor): its own policy copy, task stream, reward and engine.

    The model loads in the constructor (overlapping the trainer's set-up); :meth:`setup` hands it the
    buffer, run directory and cursor; :meth:`explore` makes one shard and puts it in the buffer."""

    def __init__(self, cfg_json: str, index: int, threads: int):
        from offpolicy.rollout.model import policy_from_config

        torch.set_num_threads(threads)
        self.cfg = Config.model_validate_json(cfg_json)
        self.index = index
        self.model, self.tokenizer = policy_from_config(self.cfg.model, training=False)
        self.explorer = self.buffer = None
        self.loaded = None
        self.idle_since = None

    def setup(self, buffer, run_dir: str, cursor: dict | None) -> int:
        cfg = self.cfg
        tasks, _ = task_source(cfg, self.tokenizer, report=lambda line: None)  # the trainer reports rows left out
        self.explorer = Explorer(cfg, self.model, self.tokenizer, tasks=tasks, reward_fn=reward_function(cfg),
                                 run_dir=Path(run_dir))
        if cursor is not None:
            self.explorer.load_state_dict(cursor)
        elif self.index:  # explorer 0 samples as the one explorer of a sync / async run; the others apart
            self.explorer.generator.manual_seed(cfg.train.seed + 7919 * self.index)
        self.buffer = buffer
        return os.getpid()

    def explore(self, e: int, version: int, weights) -> dict:
        """Shard ``self.index`` of trainer batch ``e`` with weights ``version`` (``weights``: that version's
        trainable state, or None when it is the one loaded); returns the report."""
        t0 = time.perf_counter()
        idle_s = 0.0 if self.idle_since is None else t0 - self.idle_since
        if weights is not None:
            from offpolicy.rollout.model import load_trainable_state

            load_trainable_state(self.model, unpack_state(weights))
            self.loaded = version
            del weights
        if self.loaded != version:
            raise RuntimeError(f"explorer {self.index}: batch {e} needs weights {version}, holds {self.loaded}")
        load_s = time.perf_counter() - t0
        cfg, n = self.cfg, self.cfg.pipeline.explorers
        first, count = _shard(cfg.rollout.prompts_per_step, n, self.index)
        ex = self.explorer
        # the tasks one explorer would draw for this shard: skip the other explorers' (a deterministic stream)
        while ex.tasks_consumed < e * cfg.rollout.prompts_per_step + first:
            next(ex.tasks)
            ex.tasks_consumed += 1
        exps, gen_s = ex.explore(e * n + self.index, version, prompts=count)
        t1 = time.perf_counter()
        self.buffer.put(exps)
        now = time.perf_counter()
        self.idle_since = now
        return {"batch": e, "explorer": self.index, "rows": len(exps), "gen_s": gen_s, "explorer_idle_s": idle_s,
                "weight_load_s": load_s, "buffer_put_s": now - t1, "explore_s": now - t0, "state": ex.state_dict()}

    def close(self) -> None:
        if self.explorer is not None:
            self.explorer.close()
        if self.buffer is not None:
            self.buffer.close()


class TrainerWorker:
    """Rank ``r >= 1`` of the data-parallel trainer group (a Ray actor, or a torchrun process): the policy
    and its optimiser, and :func:`~offpolicy.train.step.train_step` on its share of each batch. It has no
    LR schedule: rank 0's learning rates come with every step."""

    def __init__(self, cfg_json: str, threads: int):
        from offpolicy.pipeline.context import bind_algorithm, make_optimizer, seed_everything
        from offpolicy.rollout.model import policy_from_config

        torch.set_num_threads(threads)
        self.cfg = cfg = Config.model_validate_json(cfg_json)
        self.algo, self.plan = bind_algorithm(cfg)
        seed_everything(cfg.train.seed)
        self.model, _ = policy_from_config(cfg.model)
        self.optimizer, _ = make_optimizer(cfg, self.model)
        self.dp = None

    def join(self, address: str, port: int, rank: int, world: int, backend: str) -> None:
        from offpolicy.train.distributed import join

        self.dp = join(address, port, rank, world, parallel=self.cfg.train.parallel, backend=backend)

    def sync_state(self) -> None:
        """Take rank 0's weights and optimiser state (fresh, resumed, or a LoRA adapter's random init)."""
        self.start(*self.dp.broadcast_state(None, None))

    def start(self, weights: dict, optimizer_state: dict) -> None:
        """Load rank 0's ``weights`` and ``optimizer_state``, then build what this rank trains (DDP / FSDP2)."""
        from offpolicy.pipeline.context import make_optimizer
        from offpolicy.rollout.model import load_trainable_state

        load_trainable_state(self.model, weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.dp.prepare(self.model, self.optimizer, lambda m: make_optimizer(self.cfg, m)[0])
        self.model = self.optimizer = None  # FSDP2: the unsharded originals are freed

    def train(self, batch, algo, plan, lrs: list[float], step_kw: dict) -> None:
        """One step as rank 0 takes it: its algorithm and plan (the main one, or SPEAR's self-imitation
        pass), its batch (with the reference / pi_{k-1} log-probs on it) and keywords (step, loss_weight)."""
        self.dp.train(batch, algo, plan, lrs=lrs, **step_kw)

    def optimizer_state(self) -> None:
        """Join rank 0's gathering of the sharded optimiser state (FSDP2, for a checkpoint)."""
        self.dp.optimizer_state()

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()


# ------------------------------------------------------------------------------------------- Ray start


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("pipeline.mode=ray needs Ray: pip install 'offpolicy[ray]'") from None
    return ray


def start_ray(cfg: Config, log=print):
    """Connect to the Ray cluster at ``RAY_ADDRESS`` (``ray start --head`` elsewhere), or start a local
    instance sized to this machine (at least the CPUs the actors reserve). Returns (ray, started here)."""
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    import logging

    from offpolicy.threads import available_cpus

    p = cfg.pipeline
    kw = {"logging_level": logging.WARNING, "include_dashboard": False}
    if not os.environ.get("RAY_ADDRESS"):
        need = (p.explorers + cfg.train.workers - 1) * p.explorer_cpus
        kw["num_cpus"] = max(available_cpus(), int(-(-need // 1)))
    ray.init(**kw)
    res = ray.cluster_resources()
    log(f"ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU(s), {res.get('GPU', 0):g} GPU(s); "
        f"{p.explorers} explorer actor(s), {cfg.train.workers} trainer rank(s)")
    return ray, True


def _died_of(err) -> tuple[str, bool]:
    """(first line of what killed an actor call, whether it was a reward fault: not worth a restart)."""
    cause = getattr(err, "cause", None)
    fatal = isinstance(cause, RewardFaultError) or isinstance(err, RewardFaultError)
    text = str(cause if cause is not None else err).strip().splitlines()
    return (text[-1] if text else type(err).__name__), fatal


# ---------------------------------------------------------------------------------------------- explorers


class _InBatch:
    """Sample trainer batch ``e`` only (explorer batch indices ``e*N .. e*N + N-1``), with ``inner`` deciding
    as usual (its staleness bound, its state); shards of later batches wait in the buffer."""

    def __init__(self, e: int, n: int, inner):
        self.e, self.n, self.inner = e, n, inner

    def select(self, groups, n, now_version) -> Selection:
        return self.inner.select([g for g in groups if g.batch_index >= 0 and g.batch_index // self.n == self.e],
                                 n, now_version)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class _RollBackShards:
    """Remove the never-consumed groups of explorer ``j``'s shards of batches ``>= e`` (one-shot strategy)."""

    def __init__(self, e: int, j: int, n: int):
        self.e, self.j, self.n = e, j, n

    def select(self, groups, n, now_version) -> Selection:
        late = [g.key for g in groups if g.use_count == 0 and not g.expert and g.batch_index >= self.e * self.n
                and g.batch_index % self.n == self.j]
        return Selection(remove=tuple(late))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ExplorerFleet:
    """The N explorer actors, the published weight versions and the shard calls in flight."""

    def __init__(self, ray, cfg: Config):
        self.ray, self.cfg = ray, cfg
        p = cfg.pipeline
        self.n = p.explorers
        self.actor_cls = ray.remote(num_cpus=p.explorer_cpus, num_gpus=p.explorer_gpus, max_restarts=0)(ExplorerActor)
        self.threads = p.explorer_threads or 1
        self.actors = [self._create(j) for j in range(self.n)]
        self.cursor: list[dict | None] = [None] * self.n  # each explorer's state after its last reported shard
        self.weights: dict[int, object] = {}  # version -> ObjectRef of its trainable state
        self.sent: list[int | None] = [None] * self.n  # the version each actor holds (or will, once its queue runs)
        self.calls: dict[tuple[int, int], object] = {}  # (batch, explorer) -> ObjectRef of the report
        self.next_batch = self.min_version = 0
        self.restarts = 0
        self.pids: list[int] = []

    def _create(self, j: int):
        return self.actor_cls.remote(self.cfg.model_dump_json(), j, self.threads)

    def version_of(self, e: int) -> int:
        p = self.cfg.pipeline
        return max(weights_version(e, sync_offset=p.sync_offset, sync_interval=p.sync_interval), self.min_version)

    def start(self, ctx, buffer, *, batch: int, cursors: list[dict | None]) -> None:
        """Hand every actor its job; publish the weights the first batches need (the run's version ``batch``
        after a resume: older weights are not checkpointed, so those batches use it)."""
        self.ctx, self.buffer, self.next_batch, self.min_version = ctx, buffer, batch, batch
        self.cursor = list(cursors)
        self.pids = self.ray.get([a.setup.remote(buffer, str(ctx.run_dir), c) for a, c in zip(self.actors, cursors)])
        self.publish(ctx.model, batch)

    def publish(self, model, version: int) -> float:
        """Put ``version``'s trainable state in the object store once and dispatch the shards waiting for
        it. Returns the seconds ``ray.put`` took."""
        from offpolicy.rollout.model import trainable_state

        t0 = time.perf_counter()
        self.weights[version] = self.ray.put(pack_state(trainable_state(model)))
        seconds = time.perf_counter() - t0
        self._dispatch()
        return seconds

    def _dispatch(self) -> None:
        while self.next_batch < self.cfg.train.steps and self.version_of(self.next_batch) in self.weights:
            for j in range(self.n):
                self._call(self.next_batch, j)
            self.next_batch += 1

    def _call(self, e: int, j: int) -> None:
        v = self.version_of(e)
        weights = self.weights[v] if self.sent[j] != v else None
        self.calls[(e, j)] = self.actors[j].explore.remote(e, v, weights)
        self.sent[j] = v

    def reports(self, e: int, *, on_give_up) -> list[dict]:
        """Every shard report of batch ``e`` (blocks); replaces dead explorers (``on_give_up()`` runs
        before ExplorerDied is raised, to checkpoint)."""
        out = []
        for j in range(self.n):
            while True:
                try:
                    out.append(self.ray.get(self.calls[(e, j)]))
                    break
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as err:
                    self._replace(e, j, err, on_give_up)
            del self.calls[(e, j)]
        # the cursors move once the whole batch is in: a checkpoint or a restart meanwhile needs those of e - 1
        for rep in out:
            self.cursor[rep["explorer"]] = rep.pop("state")
        for v in [v for v in self.weights if v < self.version_of(e + 1)]:  # no batch left needs it
            del self.weights[v]
        return out

    def _replace(self, e: int, j: int, err, on_give_up) -> None:
        """Explorer ``j`` died (or failed) on batch ``e``: roll back its shards from ``e`` on, start a new
        actor from its cursor and re-issue those shards with their scheduled weights."""
        why, fatal = _died_of(err)
        limit = self.cfg.pipeline.explorer_restarts
        if fatal or self.restarts >= limit:
            on_give_up()
            more = "" if fatal else f" (restarted {self.restarts} time(s); pipeline.explorer_restarts={limit})"
            raise ExplorerDied(f"explorer {j} failed on batch {e}: {why}{more}", fatal=fatal) from None
        ray = self.ray
        ray.kill(self.actors[j], no_restart=True)
        _wait_dead(ray, self.actors[j])  # no more puts from it once its rows are rolled back
        self.buffer.sample(0, _RollBackShards(e, j, self.n), now_version=e)
        self.restarts += 1
        print(f"batch {e}: explorer {j} died ({why}); restarting it ({self.restarts}/{limit}), regenerating "
              f"from batch {e}", file=sys.stderr, flush=True)
        self.actors[j] = self._create(j)
        self.pids[j] = ray.get(self.actors[j].setup.remote(self.buffer, str(self.ctx.run_dir), self.cursor[j]))
        self.sent[j] = None
        for b in range(e, self.next_batch):
            self._call(b, j)

    def stop(self) -> None:
        ray = self.ray
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        except Exception:  # a dead actor has nothing to close
            pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.weights.clear()


def _wait_dead(ray, actor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=1.0)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ trainer group


def _optimizer_steps(optimizer) -> int:
    """Optimiser steps taken so far (AdamW's per-parameter counter)."""
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def _lrs(optimizer) -> list[float]:
    """The learning rates rank 0's schedule has set (the group trains at them)."""
    return [g["lr"] for g in optimizer.param_groups]


def view_optimizer_state(optimizer, gather) -> None:
    """FSDP2: make rank 0's (empty) ``optimizer`` answer ``state_dict()`` with ``gather()``, the state of the
    shards it stands for, so every checkpoint (whichever runner writes it) holds the trained state."""
    optimizer.state_dict = gather


class TrainerGroup:
    """Rank 0 (this process) plus ``train.workers - 1`` :class:`TrainerWorker` actors in one
    ``torch.distributed`` group; :meth:`train_step` is TrainLoop's ``step_fn``."""

    def __init__(self, ray, ctx, workers: int):
        from offpolicy.pipeline.context import make_optimizer
        from offpolicy.rollout.model import trainable_state
        from offpolicy.train.distributed import backend_for, free_address, join

        cfg = ctx.cfg
        self.ray = ray
        gpus = 1 if cfg.model.device.startswith("cuda") else 0
        cls = ray.remote(num_cpus=cfg.pipeline.explorer_cpus, num_gpus=gpus, max_restarts=0)(TrainerWorker)
        self.workers = [cls.remote(cfg.model_dump_json(), cfg.train.threads or 1) for _ in range(workers - 1)]
        address, port = free_address()
        backend = backend_for(cfg.model.device)
        joined = [w.join.remote(address, port, r, workers, backend) for r, w in enumerate(self.workers, start=1)]
        self.dp = join(address, port, 0, workers, parallel=cfg.train.parallel, backend=backend)
        ray.get(joined)
        synced = [w.sync_state.remote() for w in self.workers]
        self.dp.broadcast_state({k: v.detach().cpu() for k, v in trainable_state(ctx.model).items()},
                                ctx.optimizer.state_dict())
        self.dp.prepare(ctx.model, ctx.optimizer, lambda m: make_optimizer(cfg, m)[0])
        ray.get(synced)
        if self.dp.parallel == "fsdp2":
            view_optimizer_state(ctx.optimizer, lambda: self._optimizer_state(ctx.model))
        self.broken: str | None = None

    def _optimizer_state(self, full) -> dict:
        if self.broken:  # the dead rank's shard is gone
            raise TrainerDied(f"{self.broken}; its shard of the optimiser state is lost", intact=False)
        futures = [w.optimizer_state.remote() for w in self.workers]
        state = self.dp.optimizer_state(full)
        self.ray.get(futures)
        return state

    @property
    def _recoverable(self) -> bool:
        """Whether rank 0 alone holds the whole trained state after a rank died (not under FSDP2: the dead
        rank's shard of the optimiser state is gone, the last periodic checkpoint stands)."""
        return self.dp.parallel == "ddp"

    def train_step(self, model, optimizer, batch, algo, plan, **kw) -> dict:
        """:func:`~offpolicy.train.step.train_step` on every rank (each its share of the rows; ``model`` and
        ``optimizer`` are rank 0's, which the group trains). Raises TrainerDied: ``intact`` when this
        rank's state is that of the last completed step (the failure came before any optimiser step of
        this batch; every collective precedes ``optimizer.step``)."""
        if self.broken:
            raise TrainerDied(self.broken, intact=self._recoverable)
        lrs = _lrs(optimizer)
        batch, kw = with_rank0_logprobs(batch, plan, **kw)
        futures = [w.train.remote(batch, algo, plan, lrs, kw) for w in self.workers]
        before = _optimizer_steps(self.dp.optimizer)
        try:
            stats = self.dp.train(batch, algo, plan, lrs=lrs, full=model, **kw)
        except Exception as err:
            raise TrainerDied(f"the data-parallel step failed: {err}", intact=self._recoverable
                              and _optimizer_steps(self.dp.optimizer) == before) from None
        try:
            self.ray.get(futures)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as err:
            # this rank completed the step (every collective had all ranks): the next one stops the run
            self.broken = f"a trainer worker died: {_died_of(err)[0]}"
        return stats

    def close(self) -> None:
        ray = self.ray
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=30)
        except Exception:
            pass
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.dp.close()


# ------------------------------------------------------------------------------------------------ runner


def run_ray(cfg: Config, *, run_dir: Path | None = None, resume: bool = False, progress=None,
            log=print) -> RunResult:
    """Train up to ``cfg.train.steps`` steps with explorer actors and a trainer group on Ray (see the module
    docstring). Checkpoints hold every explorer's cursor; a resume rolls back the shards written after the
    checkpoint and regenerates them, as the async runner does."""
    cfg = apply_preset_defaults(cfg)
    p = cfg.pipeline
    runlog = RunLog(progress, cfg, run_dir, resume=resume)  # run.log opens as soon as the run directory exists
    if cfg.rollout.prompts_per_step < p.explorers:
        raise ConfigError(f"pipeline.explorers={p.explorers} is more than rollout.prompts_per_step="
                          f"{cfg.rollout.prompts_per_step}: every explorer generates a share of each batch")
    check_run(cfg)
    ray, started = start_ray(cfg, log)
    opened: list = []  # closed last first
    try:
        fleet = ExplorerFleet(ray, cfg)  # the actors load their models while the trainer builds its context
        opened.append(fleet)
        ctx = build_context(cfg, run_dir, resume=resume, log=log, on_run_dir=runlog.open)
        if cfg.train.threads is None:  # the explorers on this machine take theirs
            from offpolicy.threads import available_cpus

            torch.set_num_threads(max(1, available_cpus() - p.explorers * fleet.threads))
        log(f"run directory: {ctx.run_dir}")
        log(ctx.plan.describe())
        buffer = open_run_buffer(cfg, ctx.run_dir)
        opened.append(buffer)
        strategy = sample_strategy(cfg)
        state, batch, cursors = None, 0, [None] * p.explorers
        if resume:
            state = restore_run(ctx, strategy=strategy, buffer=buffer)
            batch = state["step"]
            cursors = [_decode_cursor(c) for c in state.get("explorers", [None] * p.explorers)]
            if len(cursors) != p.explorers:
                raise ConfigError(f"pipeline.explorers={p.explorers}: the run was checkpointed with "
                                  f"{len(cursors)} explorers; resume it with that many")
            log(f"resuming from step {state['step']} ({state['path']}); the explorers continue at batch {batch}")
        group = None
        if cfg.train.workers > 1:
            group = TrainerGroup(ray, ctx, cfg.train.workers)
            opened.append(group)
        fleet.start(ctx, buffer, batch=batch, cursors=cursors)
        loop = TrainLoop(ctx, strategy, progress=runlog.handed_on(), resumed=state,
                         step_fn=group.train_step if group else train_step)
        opened.append(loop)
        if resume:
            ctx.write_config()
        return _train(ctx, fleet, buffer, strategy, loop, first=batch)
    finally:
        for obj in reversed(opened):
            obj.stop() if isinstance(obj, ExplorerFleet) else obj.close()
        if started:
            ray.shutdown()


def _train(ctx, fleet: ExplorerFleet, buffer, strategy, loop: TrainLoop, *, first: int) -> RunResult:
    """The trainer side: take each batch once all its shards are in, train, publish when due."""
    cfg, p = ctx.cfg, ctx.cfg.pipeline
    last_needed = weights_version(cfg.train.steps - 1, sync_offset=p.sync_offset, sync_interval=p.sync_interval)

    def save(step: int, eval_after: dict | None = None, cursor: list | None = None) -> None:
        """``cursor``: the explorers' cursors after batch ``step - 1`` (default: the fleet's, after the last
        batch whose reports are in)."""
        cursor = fleet.cursor if cursor is None else cursor
        checkpoint_run(ctx, step, explorer_state=cursor[0], strategy=strategy,
                       trainer_state={**loop.state_dict(), "explorers": [_encode_cursor(c) for c in cursor]},
                       next_batch=step * fleet.n, eval_after=eval_after, frozen=loop.frozen_models())

    with StopRequest() as stop:
        t0 = time.perf_counter()
        for step in range(first + 1, cfg.train.steps + 1):
            e = step - 1
            t_wait = time.perf_counter()
            give_up = (lambda: save(e)) if step > first + 1 else (lambda: None)
            before = list(fleet.cursor)  # after batch e - 1: what a checkpoint of step e holds
            reports = fleet.reports(e, on_give_up=give_up)
            exps = buffer.sample(loop.rows, _InBatch(e, fleet.n, strategy), now_version=e)
            if not exps:
                raise RuntimeError(f"batch {e} is not in the buffer although its explorers reported it")
            idle_s = time.perf_counter() - t_wait
            timings = {k: max(r[k] for r in reports)
                       for k in ("gen_s", "explorer_idle_s", "weight_load_s", "buffer_put_s", "explore_s")}
            timings.update({f"explorer_count/{r['explorer']}": r["rows"] for r in reports})
            if fleet.restarts:
                timings["explorer_restarts"] = fleet.restarts

            def publish(step=step) -> dict:
                due = step % p.sync_interval == 0 and step <= last_needed
                return {"publish_s": fleet.publish(ctx.model, step) if due else 0.0}

            try:
                loop.step(step, exps, t0, {**timings, "trainer_idle_s": idle_s}, save=save, stop=stop,
                          after_train=publish)
            except TrainerDied as err:
                if err.intact and step > first + 1:
                    save(step - 1, cursor=before)
                raise
            t0 = time.perf_counter()
        result = loop.finish()
        save(cfg.train.steps, result.eval_after)
        return result
