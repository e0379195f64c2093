"""ReMix: mix-policy proximal policy gradient with KL-Convex regularisation (arXiv 2507.06892).

The official training code is not public; these follow the paper's descriptions.

- Mix-PPG: for a sample drawn from an older policy ``pi_{k-i}`` (its ``behav_logp``), the ratio is
  ``r = pi_theta / pi_{k-i}`` and the clip window is centred at ``c = pi_k / pi_{k-i}`` (``center_logp`` =
  log pi_k; falls back to the step's ``old_logp``): ``l = -min(r*A, clip(r, c - eps, c + eps)*A)``. Fresh data
  (``behav_logp == center_logp``) has c = 1: plain PPO.
- KL-Convex: ``beta * [lambda * KL(pi||pi_base) + (1 - lambda) * KL(pi||pi_{k-1})]`` with
  ``lambda(t) = max(1 - drop * ceil(max(t - start, 0) / every), floor)`` (:func:`kl_convex_lambda`).
"""

from __future__ import annotations

import math

from torch import Tensor

from .losses_pg import clip_stats, clipped_surrogate
from .registry import builtin
from .types import LossInputs, LossOut, finish, log_ratio, prepare, ratio_of, ratio_stats, require


@builtin("policy_loss", "mix_ppg", reads=("behav_logp", "center_logp"))
def mix_ppg(logp_BT: Tensor, inputs: LossInputs, *, eps: float = 0.2, dual_clip: float | None = None) -> LossOut:
    """Mix-PPG per-token loss; needs ``behav_logp`` (pi_{k-i}) and ``center_logp`` (pi_k); without
    ``center_logp`` the step's ``old_logp`` is pi_k (docs/algorithms.md).

    Stats: the usual clip fractions and ratio stats, plus ``center_*`` stats of c (``center_is_one`` = 1
    on fresh data).
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    behav_BT = require(inputs, "behav_logp", "mix_ppg")
    center_BT = inputs.center_logp if inputs.center_logp is not None else inputs.old_logp
    if center_BT is None:
        raise ValueError("policy loss 'mix_ppg' needs LossInputs.center_logp or LossInputs.old_logp (the policy pi_k "
                         "that centres the clip window), both are None")
    center_lr_BT = log_ratio(center_BT.detach(), behav_BT, m_BT)
    lr_BT = log_ratio(logp_BT, behav_BT, m_BT)
    c_BT = ratio_of(center_lr_BT)
    loss_BT, flags = clipped_surrogate(ratio_of(lr_BT), adv_BT, c_BT - eps, c_BT + eps, dual_clip)
    stats = {**clip_stats(flags, m_BT), **ratio_stats(lr_BT, m_BT), **ratio_stats(center_lr_BT, m_BT, "center")}
    return finish(loss_BT, m_BT, stats)


def kl_convex_lambda(step: int, *, start: int = 50, every: int = 10, drop: float = 0.1,
                     floor: float = 0.5) -> float:
    """KL-Convex weight on the base policy: 1.0 for ``step <= 50``, 0.9 for 51-60, ..., 0.5 from 91 on."""
    decrements = math.ceil(max(step - start, 0) / every)
    return max(round(1.0 - drop * decrements, 12), floor)


def kl_convex(kl_base_BT: Tensor, kl_prev_BT: Tensor, step: int, **schedule: float) -> Tensor:
    """``lambda(step) * KL(pi||pi_base) + (1 - lambda(step)) * KL(pi||pi_{k-1})`` per token (beta not applied)."""
    lam = kl_convex_lambda(step, **schedule)
    return lam * kl_base_BT + (1.0 - lam) * kl_prev_BT
