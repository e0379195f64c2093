"""``train.workers=W`` under ``torchrun``: the sync or async runner with a data-parallel trainer group.

    torchrun --nproc_per_node=W -m offpolicy.cli train train.workers=W [pipeline.mode=async] ...

Every process runs the same command. Rank 0 runs the pipeline as without torchrun (explorer, buffer,
evaluation, metrics, checkpoints); at each training step it broadcasts the batch to the group and trains
its share of the rows (:mod:`offpolicy.train.distributed`, ``train.parallel``: DDP or FSDP2), at the
learning rates of its schedule. Ranks 1..W-1 only train: they build the policy and optimiser from the
config, take rank 0's weights and optimiser state with the first batch (fresh or resumed alike), and serve
steps until rank 0 says the run is over. ``pipeline.mode=ray``
starts its own group of Ray actors instead (:mod:`.ray_runner`).

A rank that dies ends the run (rank 0's collective fails; torchrun tears the group down); resume from the
last periodic checkpoint (``checkpoint.every``) with the same command and ``--resume``.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from offpolicy.config import Config, ConfigError
from offpolicy.train.step import train_step


def world_size() -> int:
    """Processes in this launch (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    """This process's rank in a torchrun launch (RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def check_launch(cfg: Config) -> None:
    """``train.workers > 1`` outside ray mode needs a torchrun launch of exactly that many processes."""
    w = cfg.train.workers
    if cfg.pipeline.mode == "ray":
        if world_size() > 1:
            raise ConfigError("pipeline.mode=ray starts its own trainer group (train.workers); run it without torchrun")
        return
    if w > 1 and world_size() != w:
        raise ConfigError(f"train.workers={w} with pipeline.mode={cfg.pipeline.mode} needs a torchrun launch of {w} "
                          f"processes (torchrun --nproc_per_node={w} -m offpolicy.cli train ...; this launch has "
                          f"{world_size()}), or pipeline.mode=ray")
    if w == 1 and world_size() > 1:
        raise ConfigError(f"launched with {world_size()} processes (WORLD_SIZE) but train.workers=1; set "
                          f"train.workers={world_size()}")


def bind_local_device(device: str) -> None:
    """Each rank of a torchrun launch on GPUs takes its own: ``model.device=cuda`` (no index) means the
    current CUDA device, so this sets it to ``cuda:LOCAL_RANK`` before anything is built (the policy, NCCL's
    communicator). An explicit index would put every rank on one GPU: a ConfigError. Nothing to do on a CPU
    or without torchrun."""
    if world_size() == 1 or not str(device).startswith("cuda"):
        return
    if str(device) != "cuda":
        raise ConfigError(f"model.device={device} under torchrun puts all {world_size()} ranks on one GPU; use "
                          "model.device=cuda (each rank takes cuda:LOCAL_RANK)")
    import torch

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


class TorchrunGroup:
    """Rank 0's side: :meth:`train_step` is the runner's ``step_fn``; :meth:`close` releases the workers.

    Messages to the workers (one ``broadcast_object_list`` each): a step (the batch with the reference /
    pi_{k-1} log-probs on it, the algorithm and plan of the pass, its keywords, rank 0's learning rates, and
    with the first one rank 0's weights and optimiser state), ``"optimizer_state"``
    (FSDP2: join the gathering of the sharded optimiser state for a checkpoint), or None (the run is over)."""

    def __init__(self, cfg: Config):
        from offpolicy.train.distributed import backend_for, join_from_env

        bind_local_device(cfg.model.device)
        self.cfg = cfg
        self.dp = join_from_env(parallel=cfg.train.parallel, backend=backend_for(cfg.model.device))
        self.messages = _message_group()
        self.started = False

    def train_step(self, model, optimizer, batch, algo, plan, **kw) -> dict:
        from offpolicy.rollout.model import trainable_state
        from offpolicy.train.distributed import with_rank0_logprobs

        state = None
        if not self.started:  # the first step: the workers take this rank's weights and optimiser state
            state = ({k: v.detach().cpu() for k, v in trainable_state(model).items()}, optimizer.state_dict())
        lrs = [g["lr"] for g in optimizer.param_groups]
        batch, kw = with_rank0_logprobs(batch, plan, **kw)
        _send({"batch": batch, "algo": algo, "plan": plan, "kw": kw, "lrs": lrs, "state": state}, self.messages)
        if not self.started:
            self._start(model, optimizer)
        return self.dp.train(batch, algo, plan, lrs=lrs, full=model, **kw)

    def _start(self, model, optimizer) -> None:
        from offpolicy.pipeline.context import make_optimizer
        from offpolicy.pipeline.ray_runner import view_optimizer_state

        self.dp.prepare(model, optimizer, lambda m: make_optimizer(self.cfg, m)[0])
        if self.dp.parallel == "fsdp2":
            view_optimizer_state(optimizer, lambda: self._optimizer_state(model))
        self.started = True

    def _optimizer_state(self, full) -> dict:
        _send("optimizer_state", self.messages)
        return self.dp.optimizer_state(full)

    def close(self) -> None:
        try:
            _send(None, self.messages)  # the run is over
        finally:
            self.dp.close()


# How long ranks 1..W-1 wait for rank 0's next message: rank 0 generates, evaluates and checkpoints alone between
# steps, for longer than the collective timeout of the training group at times. A rank that dies still ends
# the wait at once (gloo sees the connection close; torchrun stops the other ranks).
MESSAGE_TIMEOUT = datetime.timedelta(days=1)


def _message_group():
    """The group rank 0's messages travel in (every rank calls it once, right after joining): gloo, the objects
    are on the CPU, with :data:`MESSAGE_TIMEOUT` instead of the training group's timeout."""
    return dist.new_group(backend="gloo", timeout=MESSAGE_TIMEOUT)


def _send(message, group) -> None:
    dist.broadcast_object_list([message], src=0, group=group)


def serve(cfg: Config) -> int:
    """Ranks >= 1: train the share of every batch rank 0 broadcasts, until it ends the run. Exit code 0."""
    from offpolicy.pipeline.ray_runner import TrainerWorker

    check_launch(cfg)
    from offpolicy.train.distributed import backend_for, join_from_env

    bind_local_device(cfg.model.device)
    worker = TrainerWorker(cfg.model_dump_json(), cfg.train.threads or 1)
    worker.dp = join_from_env(parallel=cfg.train.parallel, backend=backend_for(cfg.model.device))
    messages = _message_group()
    try:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=messages)
            msg = box[0]
            if msg is None:
                return 0
            if msg == "optimizer_state":
                worker.optimizer_state()
                continue
            if msg["state"] is not None:
                worker.start(*msg["state"])
            worker.train(msg["batch"], msg["algo"], msg["plan"], msg["lrs"], msg["kw"])
    finally:
        worker.close()
