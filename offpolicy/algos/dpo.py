"""DPO (Rafailov et al. 2023) with token weights, as used by OPA-DPO (arXiv 2501.09695).

``Delta(y) = sum_t w_t * (logp - ref_logp)`` (``w`` defaults to the mask), and per pair
``l = -log sigmoid(beta * (Delta(y_c) - Delta(y_r)))``, optionally label-smoothed (cDPO):
``-(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)``.

``reduction="per_position"`` follows the OPA-DPO code, which applies the sigmoid position by position:
``z_t = beta * (w_c,t * delta_c,t - w_r,t * delta_r,t)`` on positions aligned by index (chosen and rejected
padded to the same T), averaged over the positions where either mask is on. At initialisation
(policy = reference) each term is log 2 and its gradient is ``-beta * w / 2``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DPOOut(NamedTuple):
    """``loss``: scalar, mean over pairs; ``stats``: detached 0-dim tensors."""

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
