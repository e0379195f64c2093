"""Data-parallel training: one optimiser step computed by W processes, equal to the one-process step.

Every rank receives the whole batch (a few MB of token ids), computes the advantages on it (they are
group-wise), and takes rows ``arange(n).tensor_split(W)[rank]`` of every mini-batch for its
forward/backward; the plan's per-batch log-probs (recomputed pi_old, reference, pi_{k-1}) it computes for
those rows only. The loss of each micro-batch is aggregated with the token / sequence counts of the
whole mini-batch (the ``num_tokens`` / ``num_seqs`` the aggregation functions take, see
:mod:`offpolicy.algos.aggregation`), so each rank's loss is its share of a sum and the **sum** of the
ranks' gradients is the one-process gradient. ``train.parallel`` says how that sum is made:

- ``ddp``: ``DistributedDataParallel`` (bucketed all-reduce overlapped with the backward pass) with a
  communication hook that sums instead of averaging; every rank holds the whole model and optimiser.
- ``fsdp2``: ``fully_shard`` on every decoder layer and the root: each rank holds 1/W of the parameters,
  gradients (reduce-scattered, summed) and AdamW state. Rank 0 runs the pipeline (generation, evaluation,
  checkpoints, weight publishing) on a full, unsharded copy of the policy that it trains through a sharded
  copy: after each step the group gathers the full weights into it, and its optimiser's state, when asked
  for (a checkpoint), is gathered from the shards (:meth:`DataParallel.optimizer_state`).

Gradient accumulation over micro-batches communicates once, on the last one (``no_sync`` /
``set_requires_gradient_sync``). Clipping sees the global norm (DDP: replicated gradients; FSDP2:
``clip_grad_norm_`` over DTensor shards). The step's statistics are summed the same way (each is a share
of the one-process value: the loss terms by the global counts, per-micro-batch means by their share of
the batch's rows); maxima are maxed. They travel in the same collective as the "every loss was finite"
flag, before ``optimizer.step``, so a rank that dies is noticed before any rank has changed its weights.

``torch.distributed`` with gloo on CPU, NCCL on CUDA; ranks are joined by :func:`join` (TCP rendezvous)
from Ray actors (:mod:`offpolicy.pipeline.ray_runner`) or by :func:`join_from_env` under torchrun
(:mod:`offpolicy.pipeline.torchrun`).
Numerics: the ranks' partial sums are added in another order than one process adds them, so W=2 equals
W=1 to float rounding (about 1e-7 relative in float32), not bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import socket
import time

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


def join(address: str, port: int, rank: int, world: int, *, parallel: str = "ddp", backend: str = "gloo",
         timeout_s: float = 300.0) -> "DataParallel":
    """Join the trainer group (blocks until all ``world`` ranks have joined)."""
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(rank, world, parallel)


def join_from_env(*, parallel: str = "ddp", backend: str = "gloo", timeout_s: float = 300.0) -> "DataParallel":
    """Join from the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; its agent's store)."""
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(dist.get_rank(), dist.get_world_size(), parallel)


def with_rank0_logprobs(batch, plan, *, ref_model=None, prev_model=None, **step_kw):
    """Rank 0, before a step goes to the group: ``(batch, step_kw)`` where the batch carries, for all its
    rows, the log-probs of the models only rank 0 holds, the reference (``ref_logp_BT``) and pi_{k-1}
    (``prev_logp_BT``, KL-Convex), as the plan reads them; the other ranks read them off the batch. Costs
    rank 0 one no-grad forward of the batch per such model (the others hold no copy)."""
    from dataclasses import replace

    from offpolicy.train.step import _to_device, response_logp

    add = {}
    wanted_by = (("ref_logp_BT", ref_model, plan.ref_logp), ("prev_logp_BT", prev_model, plan.prev_logp))
    for field, model, wanted in wanted_by:
        if wanted == "unused" or getattr(batch, field) is not None:
            continue
        device = next(model.parameters()).device
        with torch.no_grad():
            logp = response_logp(model, _to_device(batch, device), temperature=plan.temperature)[0]
        add[field] = logp.to(batch.input_ids_BL.device)
    return (replace(batch, **add) if add else batch), step_kw


def _sum_hook(state, bucket):
    """DDP communication hook: all-reduce SUM (DDP's default divides by W; the losses are already shares
    of the one-process sum, so the gradients must be added, not averaged)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers names as never to be split across devices (``_no_split_modules``: the
    decoder layers), the units FSDP2 shards and gathers one at a time."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"train.parallel=fsdp2: {type(model).__name__} names no decoder layers "
                         "(_no_split_modules) to shard")
    return layers


def shard(model: torch.nn.Module) -> None:
    """FSDP2 in place: every decoder layer, then the root (embeddings, final norm, head). Gradients are
    reduce-scattered as plain sums (divide factor 1, see :func:`_sum_hook`; forced SUM, since in float32 /
    bfloat16 FSDP2 would otherwise scale by the factor inside the collective, with PREMUL_SUM, which gloo
    does not have)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from offpolicy.rollout.lean import is_lean

    if is_lean(model):  # the config refuses the pair; this catches a model prepared by hand
        raise ValueError("train.parallel=fsdp2 needs model.forward_impl=transformers: fully_shard gathers each "
                         "layer's weights in that layer's forward, which the lean forward does not call")
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


class DataParallel:
    """This process's place in a data-parallel trainer group (``torch.distributed`` already initialised)
    and, after :meth:`prepare`, the module and optimiser it trains."""

    def __init__(self, rank: int, world: int, parallel: str = "ddp"):
        if parallel not in ("ddp", "fsdp2"):
            raise ValueError(f"train.parallel={parallel}: expected ddp or fsdp2")
        self.rank, self.world, self.parallel = rank, world, parallel
        self.model = self.optimizer = None

    def rows(self, n: int) -> torch.Tensor:
        """This rank's row indices of a mini-batch of ``n`` rows (contiguous, sizes differ by at most 1)."""
        return torch.arange(n).tensor_split(self.world)[self.rank]

    def broadcast_state(self, *objects) -> list:
        """Rank 0's ``objects`` (any picklable values, e.g. state dicts) on every rank."""
        box = list(objects)
        dist.broadcast_object_list(box, src=0)
        return box

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, new_optimizer) -> None:
        """Build what this rank trains from ``model`` and ``optimizer`` (every rank holding rank 0's weights
        and optimiser state; a collective). ``new_optimizer(module)``: an optimiser like ``optimizer`` over
        another module's parameters (FSDP2's shards). Rank 0's ``model`` stays a plain module it may run
        alone: DDP wraps it (same parameters); FSDP2 shards a copy of it and leaves ``optimizer`` empty
        (its state lives in the shards), and each :meth:`train` gathers the new weights back into it."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model, forward_sync_buffers=False)  # buffers are constants
            self.model.register_comm_hook(None, _sum_hook)
            self.optimizer = optimizer
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, \
            set_optimizer_state_dict

        # a fresh optimiser has no state (asking for it would initialise it: AdamW's step count would be off)
        state = (get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
                 if optimizer.state else None)
        if self.rank == 0:
            model = copy.deepcopy(model)
            optimizer.state.clear()
        shard(model)
        self.model, self.optimizer = model, new_optimizer(model)
        if state is not None:
            set_optimizer_state_dict(model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def train(self, batch, algo, plan, *, lrs: list[float], full: torch.nn.Module | None = None, **kw) -> dict:
        """:func:`~offpolicy.train.step.train_step` on this rank's rows, at rank 0's learning rates ``lrs``
        (its schedule is the group's). FSDP2: then gather the new weights into rank 0's ``full`` model."""
        from offpolicy.train.step import train_step

        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._take_rank0_rng()
        stats = train_step(self.model, self.optimizer, batch, algo, plan, dp=self, **kw)
        if self.parallel == "fsdp2":
            self._gather_weights(full)
        return stats

    def _take_rank0_rng(self) -> None:
        """Every rank continues from rank 0's torch RNG state (and its CUDA device's): a step's random draws over
        the whole batch (RED-Drop's dropped negatives) must be the same on every rank, as one process makes
        them once; after a resume rank 0 holds the checkpoint's state and the others their seed's."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda_state = torch.cuda.get_rng_state() if cuda else None
        cpu_state, cuda_state = self.broadcast_state(torch.get_rng_state(), cuda_state)
        torch.set_rng_state(cpu_state)
        if cuda and cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)

    def _gather_weights(self, full: torch.nn.Module | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from offpolicy.rollout.model import load_trainable_state

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(self.model, options=options)  # rank 0's alone; empty elsewhere
        if self.rank == 0:
            load_trainable_state(full, state)

    def optimizer_state(self, full: torch.nn.Module | None = None) -> dict | None:
        """FSDP2: the full optimiser state gathered from the shards (every rank calls it), on rank 0 in the
        format of ``torch.optim.Optimizer.state_dict`` for the plain ``full`` model (parameters numbered
        in its order), so that a checkpoint resumes with any ``train.parallel`` or ``train.workers``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.rank != 0:
            return None
        index = {n: i for i, (n, p) in enumerate((n, p) for n, p in full.named_parameters() if p.requires_grad)}
        return {"state": {index[k]: v for k, v in state["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]}

    def sync_grads(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are communicated on the ``last``
        micro-batch of an optimiser step only (the earlier ones accumulate locally)."""
        if self.parallel == "fsdp2":
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.model.no_sync()

    def reduce_stats(self, sums: dict[str, float], *, since: dict[str, float], finite: bool,
                     device: torch.device) -> bool:
        """Sum over the group the statistics added to ``sums`` since ``since`` (a copy taken at the start of
        this optimiser step; :data:`MAX_STATS` are maxed). Returns whether every rank's losses were finite."""
        keys = [None] * self.world  # ranks may have added different keys (e.g. a term only some rows have)
        dist.all_gather_object(keys, sorted(sums))
        names = sorted(set().union(*keys))
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
        # The group's destructor joins gloo's worker threads while holding the GIL; a worker still dropping the
        # tensors of the last collective waits for the GIL: a deadlock (seen in a torchrun rank 1, its DDP
        # reducer freed as serve() returned: ~ProcessGroupGloo in std::thread::join, the worker in
        # gil_scoped_acquire), or at interpreter exit an abort ("terminate called without an active exception").
        # So: free DDP's reducer (a holder of the group) now, and let the workers take the GIL (a sleep releases
        # it) before the group goes.
        self.model = self.optimizer = None
        gc.collect()
        time.sleep(0.05)
        if dist.is_initialized():
            dist.destroy_process_group()
