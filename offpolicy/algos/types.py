"""Shared types and small tensor helpers for the policy losses.

Shape suffixes: ``B`` sequences, ``T`` response positions, ``N`` flat samples.
``LossInputs`` carries everything a policy loss may read besides the current ``logp_BT``;
``LossOut`` is what every policy loss returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LossInputs(NamedTuple):
    """Inputs of a policy loss or regulariser. ``adv`` is (B,) (broadcast over T) or (B, T); ``mask`` is (B, T).

    ``old_logp``: PPO's pi_old (the proximal policy, or the sampling policy; the step plan says which);
    ``behav_logp``: recorded by the rollout engine under the distribution it sampled from;
    ``ref_logp``: frozen reference; ``center_logp``: the policy that centres the ReMix clip window
    (pi_k); ``prev_logp``: the previous step's policy pi_{k-1} (KL-Convex); ``entropy``: the current
    policy's per-token entropy (carries the gradient). Each optional tensor is (B, T) or None.
    ``step``: the trainer step (1-based), for scheduled terms. ``weights``: optional (B, T) per-token
    weights of a token-weighted loss (OPA-DPO's revised spans, read by ``dpo``); None = 1.
    """

    adv: Tensor
    mask: Tensor
    old_logp: Tensor | None = None
    behav_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    center_logp: Tensor | None = None
    prev_logp: Tensor | None = None
    entropy: Tensor | None = None
    step: int = 0
    weights: Tensor | None = None


class LossOut(NamedTuple):
    """``loss_BT``: per-token loss on the graph, exactly 0 on masked positions.
    ``stats``: detached 0-dim tensors (fractions are over masked-in tokens)."""

    loss_BT: Tensor
    stats: dict[str, Tensor]


def require(inputs: LossInputs, field: str, loss: str) -> Tensor:
    """Return ``inputs.<field>`` or raise a ValueError naming the field and the loss."""
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"policy loss {loss!r} needs LossInputs.{field}, which is None")
    return value


def clean(x_BT: Tensor, m_BT: Tensor) -> Tensor:
    """Zero the masked-out positions with ``where`` so junk there (inf/nan) never reaches the math."""
    return torch.where(m_BT, x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))


def prepare(logp_BT: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean mask, sanitised ``logp_BT`` and sanitised (B, T) advantages."""
    m_BT = inputs.mask.bool()
    adv = inputs.adv
    adv_BT = adv.unsqueeze(-1).expand_as(logp_BT) if adv.dim() == 1 else adv
    return m_BT, clean(logp_BT, m_BT), clean(adv_BT.to(logp_BT.dtype), m_BT).detach()


def log_ratio(logp_BT: Tensor, denom_BT: Tensor, m_BT: Tensor) -> Tensor:
    """``logp - denom`` on the mask, 0 elsewhere (so ``exp`` of it is 1 there); keeps logp's graph."""
    return clean(logp_BT - clean(denom_BT.to(logp_BT.dtype), m_BT), m_BT)


MAX_LOG_RATIO = 20.0


def ratio_of(log_ratio_BT: Tensor) -> Tensor:
    """``exp(log_ratio)`` with the log-ratio clamped to [-20, 20] (as verl does): an extreme ratio would
    otherwise give ``0 * inf = nan`` in the backward pass of a clipped token. Changes nothing below e^20."""
    return log_ratio_BT.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


def masked_frac(flag_BT: Tensor, m_BT: Tensor) -> Tensor:
    """Fraction of masked-in tokens where ``flag_BT`` holds (0 for an empty mask); detached."""
    n = m_BT.sum().clamp(min=1)
    return ((flag_BT & m_BT).sum() / n).detach().float()


def ratio_stats(log_ratio_BT: Tensor, m_BT: Tensor, prefix: str = "ratio") -> dict[str, Tensor]:
    """Mean / min / max of ``exp(log_ratio)`` over the mask and whether it is identically 1 there."""
    lr = log_ratio_BT.detach().float()
    r = lr.exp()
    n = m_BT.sum()
    empty = n == 0
    one = torch.ones((), dtype=r.dtype, device=r.device)
    mean = torch.where(m_BT, r, 0.0).sum() / n.clamp(min=1)
    rmin = torch.where(m_BT, r, torch.inf).amin() if r.numel() else one
    rmax = torch.where(m_BT, r, -torch.inf).amax() if r.numel() else one
    return {
        f"{prefix}_mean": torch.where(empty, one, mean),
        f"{prefix}_min": torch.where(empty, one, rmin),
        f"{prefix}_max": torch.where(empty, one, rmax),
        f"{prefix}_is_one": ((lr == 0.0) | ~m_BT).all().float(),
    }


def finish(loss_BT: Tensor, m_BT: Tensor, stats: dict[str, Tensor]) -> LossOut:
    """Zero the masked positions of the loss once more (exact 0, no gradient) and pack the result."""
    return LossOut(clean(loss_BT, m_BT), {k: v.detach() for k, v in stats.items()})
