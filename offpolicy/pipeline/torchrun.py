"""``train.workers=W`` under ``torchrun``: the sync or async runner with a data-parallel trainer group.

    torchrun --nproc_per_node=W -m offpolicy.cli train train.workers=W [pipeline.mode=async] ...

Every process runs the same command. Rank 0 runs the pipeline as without torchrun (explorer, buffer,
evaluation, metrics, checkpoints); at each training step it broadcasts the batch to the group and trains
its share of the rows (:mod:`offpolicy.train.distributed`). Ranks 1..W-1 only train: they build the
policy, optimiser and schedule from the config, take rank 0's weights and optimiser state with the first
batch (fresh or resumed alike), and serve steps until rank 0 says the run is over. ``pipeline.mode=ray``
starts its own group of Ray actors instead (:mod:`.ray_runner`).

A rank that dies ends the run (rank 0's collective fails; torchrun tears the group down); resume from the
last periodic checkpoint (``checkpoint.every``) with the same command and ``--resume``.
"""

from __future__ import annotations

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


class TorchrunGroup:
    """Rank 0's side: :meth:`train_step` is the runner's ``step_fn``; :meth:`close` releases the workers."""

    def __init__(self, cfg: Config):
        from offpolicy.train.distributed import backend_for, join_from_env

        self.dp = join_from_env(backend=backend_for(cfg.model.device))
        self.synced = False

    def train_step(self, model, optimizer, batch, algo, plan, **kw) -> dict:
        from offpolicy.rollout.model import trainable_state

        state = None
        if not self.synced:  # the first step: the workers take this rank's weights and optimiser state
            state = ({k: v.detach().cpu() for k, v in trainable_state(model).items()}, optimizer.state_dict())
        dist.broadcast_object_list([{"batch": batch, "step": kw.get("step", 1), "state": state}], src=0)
        self.synced = True
        return train_step(model, optimizer, batch, algo, plan, dp=self.dp, **kw)

    def close(self) -> None:
        try:
            dist.broadcast_object_list([None], src=0)  # the run is over
        finally:
            self.dp.close()


def serve(cfg: Config) -> int:
    """Ranks >= 1: train the share of every batch rank 0 broadcasts, until it ends the run. Exit code 0."""
    from offpolicy.pipeline.ray_runner import TrainerWorker

    check_launch(cfg)
    from offpolicy.rollout.model import load_trainable_state
    from offpolicy.train.distributed import backend_for, join_from_env

    worker = TrainerWorker(cfg.model_dump_json(), cfg.train.threads or 1)
    worker.dp = join_from_env(backend=backend_for(cfg.model.device))
    try:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            msg = box[0]
            if msg is None:
                return 0
            if msg["state"] is not None:
                weights, opt = msg["state"]
                load_trainable_state(worker.model, weights)
                worker.optimizer.load_state_dict(opt)
                for _ in range(msg["step"] - 1):  # the LR schedule where rank 0's is (a resumed run)
                    worker.scheduler.step()
            worker.train(msg["batch"], msg["step"])
    finally:
        worker.close()
