"""The REC family: group-relative REINFORCE made off-policy (arXiv 2509.24203, Trinity-RFT
``examples/rec_gsm8k``), plus AsymRE (Arnal et al. 2025), Kimi OPMD (k2 regulariser) and RED-Weight.

Per token ``l = -w * A * m * logp + R``, with ``rho = exp(logp - behav_logp)`` *detached*: rho only builds
the mask ``m`` (``clip_mode``) and the weight ``w`` (``weight``), so the gradient is ``-w*m*A*grad logp``.
The denominator is ``behav_logp`` (the rollout engine's log-probs), as in the official code.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .registry import REGULARIZERS, builtin
from .types import LossInputs, LossOut, finish, log_ratio, masked_frac, prepare, ratio_of, ratio_stats, require

ClipMode = Literal["none", "one_side", "two_side", "ring"]
Weight = Literal["none", "importance_sampling", "advantage"]
Regularizer = Literal["none", "forward_kl", "k2"]


def rec_keep(rho_BT: Tensor, adv_BT: Tensor, clip_mode: str, eps_low: float, eps_high: float,
             eps_low_outer: float, eps_high_outer: float) -> dict[str, Tensor]:
    """Bool (B, T) masks of *dropped* tokens per reason; ``m = 1`` where no reason holds.

    one_side keeps ``[A>=0, rho<=1+eps_high] or [A<=0, rho>=1-eps_low]`` (the tokens PPO-clip keeps);
    two_side keeps ``1-eps_low <= rho <= 1+eps_high``; ring also keeps ``[A>=0, rho<=1-eps_low_outer]``
    and ``[A<=0, rho>=1+eps_high_outer]``.
    """
    pos_BT, neg_BT = adv_BT >= 0, adv_BT <= 0
    above_BT, below_BT = rho_BT > 1 + eps_high, rho_BT < 1 - eps_low
    if clip_mode == "none":
        return {}
    if clip_mode == "one_side":
        kept_BT = (pos_BT & ~above_BT) | (neg_BT & ~below_BT)
        return {"clip_high": ~kept_BT & above_BT, "clip_low": ~kept_BT & ~above_BT}
    if clip_mode in ("two_side", "ring"):
        outer_BT = torch.zeros_like(pos_BT)
        if clip_mode == "ring":
            outer_BT = (pos_BT & (rho_BT <= 1 - eps_low_outer)) | (neg_BT & (rho_BT >= 1 + eps_high_outer))
        return {"clip_high": above_BT & ~outer_BT, "clip_low": below_BT & ~outer_BT}
    raise ValueError(f"rec: unknown clip_mode {clip_mode!r}")


def rec_weight(rho_BT: Tensor, adv_BT: Tensor, weight: str, temp: float) -> Tensor:
    """``w``: 1 (``none``, "NoIS"), ``sg[rho]`` (``importance_sampling``) or ``exp(A/temp)`` (``advantage``,
    RED-Weight)."""
    if weight == "none":
        return torch.ones_like(rho_BT)
    if weight == "importance_sampling":
        return rho_BT
    if weight == "advantage":
        return torch.exp(adv_BT / temp)
    raise ValueError(f"rec: unknown weight {weight!r}")


@builtin("policy_loss", "rec", reads=("behav_logp",))
def rec(logp_BT: Tensor, inputs: LossInputs, *, clip_mode: ClipMode = "one_side", weight: Weight = "none",
        eps_low: float = 0.2, eps_high: float = 0.2, eps_low_outer: float = 0.6, eps_high_outer: float = 2.0,
        regularizer: Regularizer = "none", reg_coef: float = 0.1, temp: float = 1.0) -> LossOut:
    """REC loss ``-w * A * m * logp + R`` per token (aggregate with ``token_mean``).

    Defaults are REC-OneSide-NoIS, the paper's default. ``behav_logp`` is needed only when a clip mode,
    the IS weight or the k2 regulariser reads the ratio; otherwise the ratio is never formed.
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    needs_ratio = clip_mode != "none" or weight == "importance_sampling" or regularizer == "k2"
    lr_BT = torch.zeros_like(logp_BT)
    if needs_ratio or inputs.behav_logp is not None:
        behav = require(inputs, "behav_logp", "rec") if needs_ratio else inputs.behav_logp
        lr_BT = log_ratio(logp_BT, behav, m_BT)
    rho_BT = ratio_of(lr_BT.detach())
    dropped = rec_keep(rho_BT, adv_BT, clip_mode, eps_low, eps_high, eps_low_outer, eps_high_outer)
    keep_BT = torch.ones_like(m_BT)
    for flag_BT in dropped.values():
        keep_BT = keep_BT & ~flag_BT
    w_BT = rec_weight(rho_BT, adv_BT, weight, temp)
    pg_BT = torch.where(keep_BT, -w_BT * adv_BT * logp_BT, torch.zeros_like(logp_BT))
    loss_BT = pg_BT
    if regularizer != "none":  # R: the regulariser family's forward_kl (AsymRE) or k2 (OPMD), per token
        loss_BT = loss_BT + REGULARIZERS[regularizer](logp_BT, inputs, coef=reg_coef).loss_BT
    stats = {f"{k}_frac": masked_frac(v, m_BT) for k, v in dropped.items()}
    stats["clip_frac"] = masked_frac(~keep_BT, m_BT)
    if needs_ratio or inputs.behav_logp is not None:
        stats.update(ratio_stats(lr_BT, m_BT))
    return finish(loss_BT, m_BT, stats)
