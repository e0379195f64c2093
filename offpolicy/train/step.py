"""One training step: batch -> log-probs -> advantages -> loss + regularisers -> aggregate -> backward -> step.

The algorithm arrives as bound callables (:class:`~offpolicy.train.algorithm.Algorithm`) and the sources
of its log-probs as a :class:`~offpolicy.train.plan.StepPlan`; this file never looks at an algorithm's
name. The batch it is given is not modified. Stats come back as plain floats for logging.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields, replace

import torch

from offpolicy.algos import LossInputs, entropy_from_logits
from offpolicy.data.experience import Batch
from offpolicy.rollout.lean import is_lean
from offpolicy.train.algorithm import Algorithm
from offpolicy.train.plan import StepPlan
from offpolicy.train.sums import DeviceSums

__all__ = ["Algorithm", "StepPlan", "compile_forward", "response_logp", "train_step"]


def response_logp(model, batch: Batch, *, temperature: float = 1.0, with_entropy: bool = False,
                  share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens under ``model`` (and the entropy if asked), in float32
    whatever the model's dtype (the log-softmax of bf16 logits would lose the ratio's precision).

    Logits are divided by the sampling temperature so that they match ``behav_logp``. With
    ``share_prefix`` and rows that repeat a prompt (the K responses of a group), each distinct
    prompt is run once and its KV cache is indexed out to its rows; gradients flow back through the
    shared prompt computation, so values and gradients equal those of one full forward per row
    (up to float rounding) while the prompt's FLOPs are paid once per group instead of K times.
    """
    prompts_BP = batch.input_ids_BL[:, : batch.prompt_len]
    seg_B = torch.cat([torch.zeros(1, dtype=torch.long, device=prompts_BP.device),
                       (prompts_BP[1:] != prompts_BP[:-1]).any(-1).long()]).cumsum(0)
    n_prompts = int(seg_B[-1]) + 1
    # under gradient checkpointing transformers drops the KV cache of a forward that will be replayed
    checkpointed = model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if (share_prefix and n_prompts < len(batch) and not checkpointed
            and hasattr(_cache_type(), "batch_select_indices")):
        logits_BTV = _shared_prefix_logits(model, batch, seg_B)
    else:
        # the last token predicts nothing we read: it is not run; of the rest, only the T last
        # positions reach the output head (the prompt's own logits are never read either)
        ids, attn = batch.input_ids_BL[:, :-1], batch.attn_BL[:, :-1]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        T = batch.input_ids_BL.shape[1] - batch.prompt_len
        logits_BTV = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                           logits_to_keep=T).logits
    logits_BTV = logits_BTV.float()
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    logp_BT = logits_BTV.log_softmax(-1).gather(-1, batch.response_ids_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = entropy_from_logits(logits_BTV) if with_entropy else None
    return logp_BT, entropy_BT


def compile_forward(model) -> None:
    """Run ``model``'s forward through ``torch.compile`` with dynamic shapes (the prompt and response lengths
    of a batch vary, so a static compile would recompile on every new length). The forward is replaced on
    the instance as a bound method over the compiled function, on top of whatever forward it had (mixed
    precision's autocast wrapper included), so ``copy.deepcopy`` (the KL reference, pi_{k-1}) rebinds it to
    the copy. The rollout engine runs such a forward eagerly (its decode shapes would recompile it)."""
    import types

    current = model.forward
    fn = current.__func__ if isinstance(current, types.MethodType) else type(model).forward
    model.forward = types.MethodType(torch.compile(fn, dynamic=True), model)


def _cache_type():
    from transformers import DynamicCache

    return DynamicCache


def _shared_prefix_logits(model, batch: Batch, seg_B: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) predicting each response token, running each distinct prompt once."""
    from offpolicy.rollout.engine import _cache_keyword

    P = batch.prompt_len
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=seg_B.device), seg_B[1:] != seg_B[:-1]])
    ids_GP, attn_GP = batch.input_ids_BL[first, :P], batch.attn_BL[first, :P]
    pos_GP = (attn_GP.cumsum(-1) - 1).clamp(min=0)
    inner = _unwrapped(model)
    cache = _cache_type()(config=inner.config)
    kw = _cache_keyword(inner)
    lean = is_lean(inner)  # it can skip positions: the prompts' left padding, each response's last token
    out = model(input_ids=ids_GP, attention_mask=attn_GP, position_ids=pos_GP, use_cache=True, logits_to_keep=1,
                **{kw: cache}, **({"run_mask": attn_GP.bool()} if lean else {}))
    cache = getattr(out, kw)
    first_BV = out.logits[:, -1:][seg_B]  # the last prompt position predicts response token 0
    if batch.response_ids_BT.shape[1] == 1:
        return first_BV
    _select_rows(cache, seg_B)  # (G, ...) -> (B, ...) by indexing: differentiable
    # response tokens 0..T-2 predict tokens 1..T-1; the last one predicts nothing we read and is not run
    attn_BL = batch.attn_BL[:, :-1]
    attn_BT = attn_BL[:, P:]
    pos_BT = attn_GP.sum(-1)[seg_B].unsqueeze(-1) + attn_BT.cumsum(-1) - 1
    # token t is needed only if token t + 1 is real (its logits predict it); responses are right-padded, so no
    # later token of the row runs after a skipped one
    run = {"run_mask": batch.attn_BL[:, P + 1:].bool()} if lean else {}
    resp = model(input_ids=batch.response_ids_BT[:, :-1], attention_mask=attn_BL, position_ids=pos_BT.clamp(min=0),
                 use_cache=True, **{kw: cache}, **run)
    return torch.cat([first_BV, resp.logits], dim=1)


def _select_rows(cache, rows: torch.Tensor) -> None:
    """Index the cache's batch dimension with ``rows`` (repeats allowed). On plain dynamic layers with
    ``index_select``, whose backward (index_add) is several times cheaper on CPU than that of ``t[rows]``
    (an accumulating index_put), which ``batch_select_indices`` uses."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
                      for layer in layers):
        for layer in layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    else:
        cache.batch_select_indices(rows)


def _unwrapped(model):
    """The policy inside a ``DistributedDataParallel`` wrapper (which runs its forward but hides its
    attributes), or ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if torch.is_tensor(getattr(batch, f.name))})


def _stat(x) -> float:
    return float(x.detach().float()) if torch.is_tensor(x) else float(x)


def step_logprobs(model, batch: Batch, plan: StepPlan, *, ref_model=None, prev_model=None) -> dict[str, torch.Tensor]:
    """The (B, T) log-probs the plan computes once per batch, before any update: ``old_logp`` /
    ``center_logp`` ('recompute': the step-start policy; 'behav': the batch's behav_logp), ``ref_logp``
    (the reference) and ``prev_logp`` (pi_{k-1}); each of the last two kept if the batch already carries it
    (a data-parallel rank receives them from rank 0)."""
    out: dict[str, torch.Tensor] = {}
    T = plan.temperature
    with torch.no_grad():
        if plan.ref_logp != "unused":
            out["ref_logp"] = (batch.ref_logp_BT if batch.ref_logp_BT is not None
                               else response_logp(ref_model, batch, temperature=T)[0])
        if plan.prev_logp != "unused":
            out["prev_logp"] = (batch.prev_logp_BT if batch.prev_logp_BT is not None
                                else response_logp(prev_model, batch, temperature=T)[0])
        if "recompute" in (plan.old_logp, plan.center_logp):
            start_BT = response_logp(model, batch, temperature=T)[0]
            out.update({k: start_BT for k in ("old_logp", "center_logp") if getattr(plan, k) == "recompute"})
        if plan.old_logp == "behav":
            out["old_logp"] = batch.behav_logp_BT
    return out


def _rank_logprobs(model, batch: Batch, plan: StepPlan, dp, **models) -> dict[str, torch.Tensor]:
    """:func:`step_logprobs` of the rows this rank trains on (data-parallel: its share of every mini-batch),
    placed at their batch rows (zeros elsewhere, never read), so no rank recomputes another rank's rows."""
    if dp is None or dp.world == 1:
        return step_logprobs(model, batch, plan, **models)
    mine = torch.cat([rows[dp.rows(len(rows))] for rows in torch.arange(len(batch)).tensor_split(plan.mini_batches)])
    part = step_logprobs(model, batch.select(mine.to(batch.input_ids_BL.device)), plan, **models)
    full = {}
    for k, v in part.items():
        full[k] = v.new_zeros((len(batch), *v.shape[1:]))
        full[k][mine.to(v.device)] = v
    return full


def _optimizer_step(model, optimizer, batch: Batch, adv_B: torch.Tensor, given: dict[str, torch.Tensor],
                    algo: Algorithm, plan: StepPlan, *, step: int, sums: DeviceSums,
                    first: bool, loss_weight: float = 1.0, dp=None) -> None:
    """Accumulate gradients over micro-batches (normalised by this mini-batch's totals), then step.

    ``given``: the plan's per-batch log-probs for these rows. ``first``: the first optimiser step of the
    batch (the weights are still those at the step start), where the engine mismatch is measured. The
    statistics stay on the device until one transfer before the step (with the finiteness check)."""
    mixed = algo.pair_fn is not None and batch.pair_B is not None  # samples and pairs: two losses
    policy_mask_BT = batch.mask_BT * ~batch.pair_B[:, None] if mixed else batch.mask_BT
    n_tokens = policy_mask_BT.sum().clamp(min=1)
    n_seqs = (policy_mask_BT.sum(-1) > 0).sum()  # rows with no trainable token count for nothing (a tensor: no sync)
    n_pair_rows = int(((batch.mask_BT * batch.pair_B[:, None]).sum(-1) > 0).sum()) if mixed else 0
    optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    before = dict(sums.done)  # data-parallel: what this optimiser step adds is summed over the ranks
    add = sums.add

    def agg(x_BT, m_BT):
        return algo.agg_fn(x_BT, m_BT, num_tokens=n_tokens, num_seqs=n_seqs)

    parts = (torch.arange(len(batch)) if dp is None else dp.rows(len(batch))).tensor_split(plan.micro_batches)
    for i, idx in enumerate(parts):
        with contextlib.nullcontext() if dp is None else dp.sync_grads(last=i == len(parts) - 1):
            mb = batch.select(idx)
            logp_BT, entropy_BT = response_logp(model, mb, temperature=plan.temperature, with_entropy=True)
            current = {k: logp_BT.detach() for k in ("old_logp", "center_logp") if getattr(plan, k) == "current"}
            inputs = LossInputs(adv=adv_B[idx], mask=mb.mask_BT, behav_logp=mb.behav_logp_BT, entropy=entropy_BT,
                                step=step, weights=mb.weights_BT, **{k: v[idx] for k, v in given.items()}, **current)
            pair_loss = None
            if mixed:  # the policy loss and the regularisers see the samples only; the DPO term the pairs
                pair_loss = _pair_term(algo, logp_BT, inputs, mb.pair_B, n_pair_rows)
                inputs = inputs._replace(mask=mb.mask_BT * ~mb.pair_B[:, None])
            out = algo.loss_fn(logp_BT, inputs)
            loss = agg(out.loss_BT, inputs.mask)
            w = len(idx) / len(batch)  # stats are per-micro-batch means: weight by share of rows
            if pair_loss is not None:
                term, pair_stats = pair_loss
                loss = loss + algo.pair_coef * term
                add("pair/loss", term)
                for k, v in pair_stats.items():
                    add(f"pair/{k}", v, w)
            for reg in algo.regularizers:
                reg_out = reg(logp_BT, inputs)
                term = agg(reg_out.loss_BT, inputs.mask)
                loss = loss + term
                add(f"reg/{reg.func.__name__}", term)
                for k, v in reg_out.stats.items():
                    add(k, v, w)
            (loss * loss_weight if loss_weight != 1.0 else loss).backward()
        losses.append(loss.detach())
        add("loss", loss)
        add("entropy", agg(entropy_BT.detach(), mb.mask_BT))
        if inputs.old_logp is not None:  # k1 estimate of KL(behav || old) under the behaviour samples
            add("kl_behav_old", ((mb.behav_logp_BT - inputs.old_logp) * mb.mask_BT).sum() / n_tokens)
        if first:
            _engine_mismatch(mb, logp_BT.detach(), step, sums)
        for k, v in out.stats.items():
            add(f"loss/{k}", v, w)
    finite = torch.stack([torch.isfinite(l) for l in losses]).all()
    if dp is not None:  # the gradients were summed by the last backward; the statistics are summed here
        finite = torch.tensor(dp.reduce_stats(sums.done, since=before, finite=bool(sums.flush(finite)[0]),
                                              device=next(model.parameters()).device))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the global norm, as a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    add("grad_norm", grad_norm)
    (ok,) = sums.flush(torch.isfinite(grad_norm) & finite.to(grad_norm.device))  # the step's one host transfer
    if not ok:
        optimizer.zero_grad(set_to_none=True)  # a non-finite loss or gradient: skip, weights untouched
        add("skipped", 1)
        return
    optimizer.step()


def _pair_term(algo: Algorithm, logp_BT: torch.Tensor, inputs: LossInputs, pair_B: torch.Tensor,
               n_pair_rows: int) -> tuple[torch.Tensor, dict] | None:
    """The DPO term on the pair rows of a mixed micro-batch: the sum of the pairwise loss over them,
    divided by the live pair rows of the whole mini-batch (``seq_mean_token_sum``, so the mean over pairs)."""
    rows = pair_B.nonzero().squeeze(-1)
    if not len(rows):
        return None
    sub = inputs._replace(**{k: v[rows] for k, v in inputs._asdict().items() if torch.is_tensor(v) and v.dim()})
    out = algo.pair_fn(logp_BT[rows], sub)
    return out.loss_BT.sum() / max(n_pair_rows, 1), out.stats


def _engine_mismatch(mb: Batch, logp_BT: torch.Tensor, step: int, sums: DeviceSums) -> None:
    """Engine vs trainer on the rows sampled with the weights the trainer holds now (version step - 1):
    the untruncated engine log-prob against the trainer's. Accumulates the sum and count of
    ``engine - trainer`` (a k1 estimate of KL(engine || trainer)) and the max |difference|."""
    engine_BT = getattr(mb, "engine_logp_BT", None)
    engine_BT = mb.behav_logp_BT if engine_BT is None else engine_BT
    m_BT = mb.mask_BT.bool() & (mb.versions_B == step - 1)[:, None]
    diff_BT = torch.where(m_BT, engine_BT - logp_BT, torch.zeros_like(logp_BT))
    sums.add("_engine_sum", diff_BT.sum())
    sums.add("_engine_n", m_BT.sum())
    sums.max("_engine_max", diff_BT.abs().max() if diff_BT.numel() else torch.zeros((), device=diff_BT.device))


def train_step(model, optimizer, batch: Batch, algo: Algorithm, plan: StepPlan, *, ref_model=None,
               prev_model=None, step: int = 1, loss_weight: float = 1.0, dp=None) -> dict[str, float]:
    """Train on one batch: ``plan.updates_per_batch`` passes, each of ``plan.mini_batches`` optimiser steps.

    Advantages are computed once per batch, and so are the log-probs the plan lists (see
    :func:`step_logprobs`); ``batch`` is left as it was. ``ref_model`` (the reference) and ``prev_model``
    (pi_{k-1}, kept one step behind by the caller) are needed when the plan reads them. ``step``: the
    trainer step (1-based; the batch's fresh rows were sampled with version ``step - 1``). ``loss_weight``
    scales the loss that is backpropagated (SPEAR's self-imitation weight; the logged loss is unscaled). Statistics are
    means over the optimiser steps. An optimiser step whose loss or gradient norm is not finite is
    skipped (gradients dropped, weights and optimiser state untouched) and counted in ``skipped_steps``.
    ``dp``: this process's place in a data-parallel trainer group (:mod:`offpolicy.train.distributed`):
    every rank passes the same batch and trains its share of the rows of each micro-batch.
    """
    model.train()
    device = next(model.parameters()).device
    if batch.input_ids_BL.device != device:
        batch = _to_device(batch, device)
    adv_B = algo.adv_fn(batch.rewards_B, batch.group_ids_B)
    given = _rank_logprobs(model, batch, plan, dp, ref_model=ref_model, prev_model=prev_model)
    running = DeviceSums()
    n_steps = 0
    for _ in range(plan.updates_per_batch):
        for rows in torch.arange(len(batch)).tensor_split(plan.mini_batches):
            _optimizer_step(model, optimizer, batch.select(rows), adv_B[rows], {k: v[rows] for k, v in given.items()},
                            algo, plan, step=step, sums=running, first=n_steps == 0, loss_weight=loss_weight, dp=dp)
            n_steps += 1
    sums = running.done
    skipped = sums.pop("skipped", 0.0)
    engine = {k: sums.pop(f"_engine_{k}") for k in ("sum", "n", "max")}
    stats = {k: v / n_steps for k, v in sums.items()}
    if engine["n"]:  # fresh rows in this batch: the engine's numerics against the trainer's
        stats["engine_kl"] = engine["sum"] / engine["n"]
        stats["engine_max_abs_diff"] = engine["max"]
    stats["adv_abs_mean"] = _stat(adv_B.abs().mean())
    stats["optimizer_steps"] = n_steps
    stats["skipped_steps"] = int(skipped)
    return stats
