"""One training step: batch -> log-probs -> advantages -> loss -> aggregate -> backward -> step.

The algorithm arrives as bound callables (see :class:`Algorithm`); this file never looks at an
algorithm's name. Stats come back as plain floats for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from offpolicy.algos import LossInputs, entropy_from_logits
from offpolicy.data.experience import Batch


@dataclass
class Algorithm:
    """The bound pieces of one preset plus the regularisers the trainer adds on top."""

    adv_fn: Callable
    loss_fn: Callable
    agg_fn: Callable
    kl_fn: Callable | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    kl_convex: dict | None = None  # ReMix KL-Convex lambda schedule (kl_convex_lambda's parameters), or None
    extra: dict | None = None  # the preset's extra settings with the config's overrides

    def kl_lambda(self, step: int) -> float:
        """Weight of KL(pi || base) at trainer step ``step``: 1 without KL-Convex (plain KL to the reference)."""
        from offpolicy.algos import kl_convex_lambda

        return kl_convex_lambda(step, **self.kl_convex) if self.kl_convex is not None else 1.0

    @classmethod
    def from_config(cls, algo_cfg, *, max_len: int | None = None) -> "Algorithm":
        """Bind the preset named in ``algo_cfg`` with its overrides (names are checked here).

        ``max_len`` (the generation limit) fills an aggregation's ``max_len`` parameter when neither
        the preset nor the overrides set it, so Dr. GRPO's constant normaliser is the real L_max.
        """
        import inspect

        from offpolicy.algos import AGGREGATIONS, bind, resolve_preset
        from offpolicy.algos.registry import lookup

        preset = lookup("preset", algo_cfg.preset)
        agg_params = dict(algo_cfg.aggregation_params)
        agg_name, preset_agg_params = preset.aggregation
        if (max_len is not None and "max_len" in inspect.signature(AGGREGATIONS[agg_name]).parameters
                and "max_len" not in {**preset_agg_params, **agg_params}):
            agg_params["max_len"] = max_len
        adv_fn, loss_fn, agg_fn = resolve_preset(algo_cfg.preset, algo_cfg.advantage_params,
                                                 algo_cfg.loss_params, agg_params)
        kl_coef = preset.kl_coef if algo_cfg.kl_coef is None else algo_cfg.kl_coef
        kl_fn = bind("kl", algo_cfg.kl_estimator or preset.kl_estimator) if kl_coef > 0 else None
        extra = preset_extra(preset, algo_cfg)
        convex = extra.get("kl_convex_schedule") if extra.get("kl_convex") and kl_fn is not None else None
        return cls(adv_fn, loss_fn, agg_fn, kl_fn, kl_coef, algo_cfg.entropy_coef, convex, extra)


def preset_extra(preset, algo_cfg) -> dict:
    """The preset's extra settings with ``algorithm.extra_params`` merged in; unknown names are errors."""
    import difflib

    base = dict(preset.extra or {})
    for key in algo_cfg.extra_params:
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"algorithm.extra_params: preset {algo_cfg.preset!r} has no extra setting "
                             f"{key!r}{hint}; its settings: {sorted(base) or 'none'}")
    return {**base, **algo_cfg.extra_params}


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
    cache = _cache_type()(config=model.config)
    kw = _cache_keyword(model)
    out = model(input_ids=ids_GP, attention_mask=attn_GP, position_ids=pos_GP, use_cache=True, logits_to_keep=1,
                **{kw: cache})
    cache = getattr(out, kw)
    first_BV = out.logits[:, -1:][seg_B]  # the last prompt position predicts response token 0
    if batch.response_ids_BT.shape[1] == 1:
        return first_BV
    cache.batch_select_indices(seg_B)  # (G, ...) -> (B, ...) by indexing: differentiable, memory is shared
    # response tokens 0..T-2 predict tokens 1..T-1; the last one predicts nothing we read and is not run
    attn_BL = batch.attn_BL[:, :-1]
    attn_BT = attn_BL[:, P:]
    pos_BT = attn_GP.sum(-1)[seg_B].unsqueeze(-1) + attn_BT.cumsum(-1) - 1
    resp = model(input_ids=batch.response_ids_BT[:, :-1], attention_mask=attn_BL, position_ids=pos_BT.clamp(min=0),
                 use_cache=True, **{kw: cache})
    return torch.cat([first_BV, resp.logits], dim=1)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if torch.is_tensor(getattr(batch, f.name))})


def _stat(x) -> float:
    return float(x.detach().float()) if torch.is_tensor(x) else float(x)


def needs_input(loss_fn: Callable, field: str, *, available: tuple[str, ...] = ("behav_logp",)) -> bool:
    """Whether ``loss_fn`` needs ``LossInputs.<field>`` when only ``available`` fields are given.

    Probes the loss once on a 1x1 dummy (a loss raises a ValueError naming a missing field), so user
    losses registered with ``offpolicy.algos.register`` are covered without any declaration.
    """
    z = torch.zeros(1, 1)
    kw = {f: (z if f in available else None) for f in ("old_logp", "behav_logp", "ref_logp", "center_logp")}
    kw[field] = None
    try:
        loss_fn(z.clone().requires_grad_(), LossInputs(adv=torch.ones(1), mask=torch.ones(1, 1), **kw))
    except ValueError as e:
        return f"LossInputs.{field}" in str(e)
    return False


def _optimizer_step(model, optimizer, batch: Batch, adv_B: torch.Tensor, algo: Algorithm, *, grad_clip: float,
                    micro_batches: int, temperature: float, sums: dict[str, float], kl_lambda: float = 1.0) -> None:
    """Accumulate gradients over micro-batches (normalised by this mini-batch's totals), then step."""
    n_tokens = batch.mask_BT.sum().clamp(min=1)
    n_seqs = len(batch)
    optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []

    def add(key: str, value) -> None:
        sums[key] = sums.get(key, 0.0) + _stat(value)

    for idx in torch.arange(n_seqs).tensor_split(micro_batches):
        mb = batch.select(idx)
        logp_BT, entropy_BT = response_logp(model, mb, temperature=temperature, with_entropy=True)
        old = mb.old_logp_BT if mb.old_logp_BT is not None else logp_BT.detach()
        out = algo.loss_fn(logp_BT, LossInputs(adv=adv_B[idx], mask=mb.mask_BT, old_logp=old,
                                                behav_logp=mb.behav_logp_BT, ref_logp=mb.ref_logp_BT))
        loss = algo.agg_fn(out.loss_BT, mb.mask_BT, num_tokens=n_tokens, num_seqs=n_seqs)
        if algo.kl_fn is not None:
            kl_BT = algo.kl_fn(logp_BT, mb.ref_logp_BT)
            if mb.prev_logp_BT is not None:  # KL-Convex: lambda KL(pi||base) + (1 - lambda) KL(pi||pi_{k-1})
                kl_BT = kl_lambda * kl_BT + (1.0 - kl_lambda) * algo.kl_fn(logp_BT, mb.prev_logp_BT)
            kl = algo.agg_fn(kl_BT * mb.mask_BT, mb.mask_BT, num_tokens=n_tokens, num_seqs=n_seqs)
            loss = loss + algo.kl_coef * kl
            add("kl_ref", kl)
        ent = algo.agg_fn(entropy_BT * mb.mask_BT, mb.mask_BT, num_tokens=n_tokens, num_seqs=n_seqs)
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * ent
        loss.backward()
        losses.append(loss.detach())
        add("loss", loss)
        add("entropy", ent)
        # k1 estimate of KL(behav || old) under the behaviour samples: mean of behav_logp - old_logp
        add("kl_behav_old", ((mb.behav_logp_BT - old) * mb.mask_BT).sum() / n_tokens)
        w = len(idx) / n_seqs  # loss stats are per-micro-batch means: weight by share of rows
        for k, v in out.stats.items():
            add(f"loss/{k}", w * _stat(v))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    add("grad_norm", grad_norm)
    if not (torch.isfinite(grad_norm) and all(torch.isfinite(torch.as_tensor(l)) for l in losses)):
        optimizer.zero_grad(set_to_none=True)  # a non-finite loss or gradient: skip, weights untouched
        add("skipped", 1)
        return
    optimizer.step()


def train_step(model, optimizer, batch: Batch, algo: Algorithm, *, grad_clip: float = 1.0,
               micro_batches: int = 1, mini_batches: int = 1, updates_per_batch: int = 1,
               temperature: float = 1.0, ref_model=None, scheduler=None,
               needs_old: bool = True, old_from_behav: bool = False, step: int = 0,
               prev_model=None) -> dict[str, float]:
    """Train on one batch: ``updates_per_batch`` passes, each of ``mini_batches`` optimiser steps.

    Advantages are computed once per batch. ``old_logp`` (the proximal policy) is recomputed at the
    start, with one no-grad forward, only when the batch is reused (several optimiser steps) and the
    loss reads it (``needs_old``, see :func:`needs_input`); with a single optimiser step the detached
    current log-probs are exact, because the weights do not change before that step. ``ref_logp`` is
    computed only when the algorithm has a KL term. With ReMix's KL-Convex (``algo.kl_convex``) and
    lambda(step) < 1, ``prev_model`` (the previous step's policy pi_{k-1}) gives the second KL term;
    the caller keeps it one step behind. ``old_from_behav``: ``old_logp`` is the batch's ``behav_logp``
    (PPO's pi_old as the policy that sampled the data; ``train.old_logp``), no recompute. Statistics
    are means over the optimiser steps.
    An optimiser step whose loss or gradient norm is not finite is skipped (gradients dropped,
    weights and optimiser state untouched) and counted in ``skipped_steps``.
    """
    model.train()
    device = next(model.parameters()).device
    if batch.input_ids_BL.device != device:
        batch = _to_device(batch, device)
    adv_B = algo.adv_fn(batch.rewards_B, batch.group_ids_B)
    reused = updates_per_batch * mini_batches > 1
    with torch.no_grad():
        if algo.kl_fn is not None and batch.ref_logp_BT is None:
            batch.ref_logp_BT, _ = response_logp(ref_model, batch, temperature=temperature)
        kl_lambda = algo.kl_lambda(step)
        if kl_lambda < 1.0 and algo.kl_fn is not None and prev_model is not None and batch.prev_logp_BT is None:
            batch.prev_logp_BT, _ = response_logp(prev_model, batch, temperature=temperature)
        if old_from_behav and batch.old_logp_BT is None:
            batch.old_logp_BT = batch.behav_logp_BT
        if reused and needs_old and batch.old_logp_BT is None:
            batch.old_logp_BT, _ = response_logp(model, batch, temperature=temperature)
    sums: dict[str, float] = {}
    n_steps = 0
    for _ in range(updates_per_batch):
        for rows in torch.arange(len(batch)).tensor_split(mini_batches):
            _optimizer_step(model, optimizer, batch.select(rows), adv_B[rows], algo, grad_clip=grad_clip,
                            micro_batches=micro_batches, temperature=temperature, sums=sums,
                            kl_lambda=kl_lambda)
            n_steps += 1
    if scheduler is not None:
        scheduler.step()
    skipped = sums.pop("skipped", 0.0)
    stats = {k: v / n_steps for k, v in sums.items()}
    stats["adv_abs_mean"] = _stat(adv_B.abs().mean())
    stats["optimizer_steps"] = n_steps
    stats["skipped_steps"] = int(skipped)
    if algo.kl_convex is not None:
        stats["kl_convex_lambda"] = kl_lambda
    return stats
