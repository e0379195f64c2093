"""Data-parallel training: one optimiser step computed by W processes, equal to the one-process step.

Every rank receives the whole batch (a few MB of token ids), computes the advantages and the plan's
per-batch log-probs on it, and takes rows ``arange(n).tensor_split(W)[rank]`` of every mini-batch for its
forward/backward. The loss of each micro-batch is aggregated with the token / sequence counts of the
whole mini-batch (the ``num_tokens`` / ``num_seqs`` the aggregation functions take, see
:mod:`offpolicy.algos.aggregation`), so each rank's loss is its share of a sum and the **sum** of the
ranks' gradients is the one-process gradient. That sum is one all-reduce over a flat copy of the
gradients (what DDP's buckets do), before clipping, so every rank clips the same global norm and applies
the same update: the ranks' weights stay identical without a broadcast.

The step's statistics are summed the same way (each is a share of the one-process value: the loss terms
by the global counts, per-micro-batch means by their share of the batch's rows); maxima are maxed. They
travel in the same collective as the "every loss was finite" flag, before ``optimizer.step``, so a
rank that dies is noticed before any rank has changed its weights.

``torch.distributed`` with gloo on CPU, NCCL on CUDA; ranks are joined by :func:`join` (TCP rendezvous)
from Ray actors (:mod:`offpolicy.pipeline.ray_runner`) or by :func:`join_from_env` under torchrun
(:mod:`offpolicy.pipeline.torchrun`).
Numerics: the ranks' partial sums are added in another order than one process adds them, so W=2 equals
W=1 to float rounding (about 1e-7 relative in float32), not bit for bit.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

# statistics (keys of train_step's running sums) combined by max instead of sum
MAX_STATS = frozenset({"_engine_max"})


def backend_for(device: str) -> str:
    """NCCL for CUDA tensors, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def free_address() -> tuple[str, int]:
    """(this host's address as other machines see it, a free TCP port) for the rendezvous."""
    try:
        import ray

        host = ray.util.get_node_ip_address()
    except Exception:  # no Ray: a one-machine group
        host = "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def join(address: str, port: int, rank: int, world: int, *, backend: str = "gloo",
         timeout_s: float = 300.0) -> "DataParallel":
    """Join the trainer group (blocks until all ``world`` ranks have joined)."""
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(rank, world)


def join_from_env(*, backend: str = "gloo", timeout_s: float = 300.0) -> "DataParallel":
    """Join from the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; its agent's store)."""
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(dist.get_rank(), dist.get_world_size())


class DataParallel:
    """This process's place in a data-parallel trainer group (``torch.distributed`` already initialised)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def rows(self, n: int) -> torch.Tensor:
        """This rank's row indices of a mini-batch of ``n`` rows (contiguous, sizes differ by at most 1)."""
        return torch.arange(n).tensor_split(self.world)[self.rank]

    def broadcast_state(self, *objects) -> list:
        """Rank 0's ``objects`` (any picklable values, e.g. state dicts) on every rank."""
        box = list(objects)
        dist.broadcast_object_list(box, src=0)
        return box

    def all_reduce(self, model: torch.nn.Module, sums: dict[str, float], *, since: dict[str, float],
                   finite: bool) -> bool:
        """Sum the gradients of ``model`` over the group, and the statistics added to ``sums`` since
        ``since`` (a copy taken at the start of this optimiser step; :data:`MAX_STATS` are maxed).
        Returns whether every rank's losses were finite."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter no row reached on this rank still takes part in the sum
                p.grad = torch.zeros_like(p)
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_kind.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        # the statistics: ranks may have added different keys (e.g. a term only some rows have)
        keys = [None] * self.world
        dist.all_gather_object(keys, sorted(sums))
        names = sorted(set().union(*keys))
        device = params[0].device if params else torch.device("cpu")
        summed = [k for k in names if k not in MAX_STATS]
        maxed = [k for k in names if k in MAX_STATS]
        delta = torch.tensor([sums.get(k, 0.0) - since.get(k, 0.0) for k in summed] + [0.0 if finite else 1.0],
                             dtype=torch.float64, device=device)
        dist.all_reduce(delta)
        for k, v in zip(summed, delta[:-1].tolist()):
            sums[k] = since.get(k, 0.0) + v
        if maxed:
            peak = torch.tensor([sums.get(k, float("-inf")) for k in maxed], dtype=torch.float64, device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            sums.update(zip(maxed, peak.tolist()))
        return float(delta[-1]) == 0.0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
