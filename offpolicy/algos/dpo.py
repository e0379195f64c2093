"""DPO (Rafailov et al. 2023) with token weights, as used by OPA-DPO (arXiv 2501.09695).

``Delta(y) = sum_t w_t * (logp - ref_logp)`` (``w`` defaults to the mask), and per pair
``l = -log sigmoid(beta * (Delta(y_c) - Delta(y_r)))``, optionally label-smoothed (cDPO):
``-(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)``.

``reduction="per_position"`` follows the OPA-DPO code, which applies the sigmoid position by position:
``z_t = beta * (w_c,t * delta_c,t - w_r,t * delta_r,t)`` on positions aligned by index (chosen and rejected
padded to the same T), averaged over the positions where either mask is on. At initialisation
(policy = reference) each term is log 2 and its gradient is ``-beta * w / 2``.

Also here: IPO (:func:`ipo_loss`), the Bradley-Terry reward-model loss (:func:`bradley_terry_loss`) and the
online-DPO pair rules that turn one scored group into preference pairs (:func:`best_vs_worst`,
:func:`all_pairs`; :data:`PAIR_BUILDERS`). None of these is a policy loss of the registry: they compare
two responses, so their call signature differs. docs/algorithms.md §8, §8b.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class DPOOut(NamedTuple):
    """``loss``: scalar, mean over pairs; ``stats``: detached 0-dim tensors (every preference loss here)."""

    loss: Tensor
    stats: dict[str, Tensor]


def weighted_delta(logp_BT: Tensor, ref_logp_BT: Tensor, mask_BT: Tensor, weights_BT: Tensor | None) -> Tensor:
    """``w * (logp - ref_logp)`` on the mask, exact 0 elsewhere (junk there cannot leak), (B, T)."""
    m_BT = mask_BT.bool()
    zero = torch.zeros((), dtype=logp_BT.dtype, device=logp_BT.device)
    w_BT = mask_BT.to(logp_BT.dtype) if weights_BT is None else torch.where(m_BT, weights_BT.to(logp_BT.dtype), zero)
    delta_BT = torch.where(m_BT, logp_BT, zero) - torch.where(m_BT, ref_logp_BT.to(logp_BT.dtype), zero)
    return w_BT * delta_BT


def dpo_loss(policy_chosen_logp_BT: Tensor, policy_rejected_logp_BT: Tensor, ref_chosen_logp_BT: Tensor,
             ref_rejected_logp_BT: Tensor, chosen_mask_BT: Tensor, rejected_mask_BT: Tensor, *,
             beta: float = 0.1, reduction: str = "sequence_sum", label_smoothing: float = 0.0,
             chosen_weights_BT: Tensor | None = None, rejected_weights_BT: Tensor | None = None) -> DPOOut:
    """Token-weighted DPO loss over B pairs; ``reduction`` is ``sequence_sum`` or ``per_position``."""
    dc_BT = weighted_delta(policy_chosen_logp_BT, ref_chosen_logp_BT, chosen_mask_BT, chosen_weights_BT)
    dr_BT = weighted_delta(policy_rejected_logp_BT, ref_rejected_logp_BT, rejected_mask_BT, rejected_weights_BT)
    if reduction == "sequence_sum":
        z_B = beta * (dc_BT.sum(-1) - dr_BT.sum(-1))
        loss_B = _smoothed_nll(z_B, label_smoothing)
    elif reduction == "per_position":
        if dc_BT.shape != dr_BT.shape:
            raise ValueError("dpo_loss per_position needs chosen and rejected padded to the same (B, T)")
        on_BT = chosen_mask_BT.bool() | rejected_mask_BT.bool()
        z_BT = beta * (dc_BT - dr_BT)
        nll_BT = torch.where(on_BT, _smoothed_nll(z_BT, label_smoothing), torch.zeros_like(z_BT))
        loss_B = nll_BT.sum(-1) / on_BT.sum(-1).clamp(min=1)
        z_B = beta * (dc_BT.sum(-1) - dr_BT.sum(-1))
    else:
        raise ValueError(f"dpo_loss: reduction must be 'sequence_sum' or 'per_position', got {reduction!r}")
    chosen_B, rejected_B = beta * dc_BT.sum(-1).detach(), beta * dr_BT.sum(-1).detach()
    stats = {
        "reward_chosen": chosen_B.mean(), "reward_rejected": rejected_B.mean(),
        "reward_margin": (chosen_B - rejected_B).mean(), "accuracy": (z_B.detach() > 0).float().mean(),
    }
    return DPOOut(loss_B.mean(), stats)


def _smoothed_nll(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(policy_chosen_logp_BT: Tensor, policy_rejected_logp_BT: Tensor, ref_chosen_logp_BT: Tensor,
             ref_rejected_logp_BT: Tensor, chosen_mask_BT: Tensor, rejected_mask_BT: Tensor, *,
             beta: float = 0.1, chosen_weights_BT: Tensor | None = None,
             rejected_weights_BT: Tensor | None = None) -> DPOOut:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17): ``l = (h - 1 / (2 * beta))**2`` per pair, mean over the B pairs.

    ``h = mean_t delta_c - mean_t delta_r`` with ``delta = w * (logp - ref_logp)`` and the mean over each
    response's own mask (as TRL's ``loss_type="ipo"``; the paper writes sequence log-ratios, the per-token
    mean keeps the target ``1/(2 beta)`` independent of length). Inputs (B, T) as :func:`dpo_loss`.
    Stats use the same names as DPO; the implicit rewards are ``beta * mean_t delta``.
    """
    dc_BT = weighted_delta(policy_chosen_logp_BT, ref_chosen_logp_BT, chosen_mask_BT, chosen_weights_BT)
    dr_BT = weighted_delta(policy_rejected_logp_BT, ref_rejected_logp_BT, rejected_mask_BT, rejected_weights_BT)
    mean_c_B = dc_BT.sum(-1) / chosen_mask_BT.sum(-1).clamp(min=1).to(dc_BT.dtype)
    mean_r_B = dr_BT.sum(-1) / rejected_mask_BT.sum(-1).clamp(min=1).to(dr_BT.dtype)
    h_B = mean_c_B - mean_r_B
    loss_B = (h_B - 1.0 / (2.0 * beta)) ** 2
    chosen_B, rejected_B = beta * mean_c_B.detach(), beta * mean_r_B.detach()
    stats = {
        "reward_chosen": chosen_B.mean(), "reward_rejected": rejected_B.mean(),
        "reward_margin": (chosen_B - rejected_B).mean(), "accuracy": (h_B.detach() > 0).float().mean(),
    }
    return DPOOut(loss_B.mean(), stats)


def bradley_terry_loss(rewards_chosen_B: Tensor, rewards_rejected_B: Tensor, *, margin_B: Tensor | None = None,
                       center_coef: float = 0.0) -> DPOOut:
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1):
    ``l = -log sigmoid(r_c - r_r - m)`` per pair, mean over the B pairs, plus ``center_coef *
    mean((r_c + r_r)**2)`` (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``), which pins the
    rewards' offset without changing their ranking.

    ``rewards_*_B``: scalar rewards (B,); ``margin_B``: an optional per-pair margin (B,) (Llama 2, Touvron et
    al. 2023, eq. 2), default 0. Stats: ``accuracy`` (share with r_c > r_r; the margin does not enter it),
    ``reward_margin`` (mean r_c - r_r), ``reward_chosen``, ``reward_rejected`` (means, detached).
    """
    diff_B = rewards_chosen_B - rewards_rejected_B
    z_B = diff_B if margin_B is None else diff_B - margin_B.to(diff_B.dtype)
    loss = -F.logsigmoid(z_B).mean()
    if center_coef:
        loss = loss + center_coef * ((rewards_chosen_B + rewards_rejected_B) ** 2).mean()
    stats = {
        "reward_chosen": rewards_chosen_B.detach().mean(), "reward_rejected": rewards_rejected_B.detach().mean(),
        "reward_margin": diff_B.detach().mean(), "accuracy": (diff_B.detach() > 0).float().mean(),
    }
    return DPOOut(loss, stats)


# ---------------------------------------------------------------------------- online DPO: pairs from a group


def _scored(rewards_K: Sequence[float | None]) -> list[tuple[int, float]]:
    """(index, reward) of the samples with a finite reward; faulted samples (None, NaN) take no part."""
    return [(i, float(r)) for i, r in enumerate(rewards_K) if r is not None and math.isfinite(r)]


def best_vs_worst(rewards_K: Sequence[float | None]) -> list[tuple[int, int]]:
    """One pair ``(chosen, rejected)`` of indices from a group of K scored samples (online DPO, Guo et al.
    2024; the "best vs worst" rule of Xu et al. 2023): the highest reward against the lowest, the first
    index winning ties; no pair when every reward is equal (or fewer than two are finite)."""
    scored = _scored(rewards_K)
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda ir: ir[1])  # max/min return the first of equal items
    worst = min(scored, key=lambda ir: ir[1])
    return [] if best[1] == worst[1] else [(best[0], worst[0])]


def all_pairs(rewards_K: Sequence[float | None]) -> list[tuple[int, int]]:
    """Every sample above the group median paired with every one below it, ``(chosen, rejected)`` indices
    in index order (with a 0/1 reward: every correct x every incorrect sample). Samples at the median
    take no part; the median of an even group is the mean of its two middle values."""
    scored = _scored(rewards_K)
    if len(scored) < 2:
        return []
    med = statistics.median(r for _, r in scored)
    above = [i for i, r in scored if r > med]
    below = [i for i, r in scored if r < med]
    return [(c, r) for c in above for r in below]


PAIR_BUILDERS = {"best_vs_worst": best_vs_worst, "all_pairs": all_pairs}
