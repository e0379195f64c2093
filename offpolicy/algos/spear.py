"""SPEAR: self-imitation with progressive exploration for agentic RL (arXiv 2509.22601).

- Curriculum weights: the intrinsic tool-call reward decays, ``w_tool(t) = (1 + cos(pi*min(t,T)/T)) / 2``;
  the self-imitation weight ramps up, ``w_sil(t) = (1 - cos(pi*min(t,T)/T)) / 2``.
- Replay: advantages of replayed items are recalibrated against the median of past group-mean rewards,
  ``A = R - P50(history)``, and only ``A > 0`` is kept; a replay round samples
  ``min(2**floor(log2 n), buffer_size)`` items.
- Loss (``sil``): PPO-clip against the stored ``behav_logp`` with covariance-based clipping (Clip-Cov,
  Cui et al. 2025, arXiv 2505.22617): a random fraction of the unclipped tokens whose
  ``cov = (A - mean A) * (logp - mean logp)`` lies in (lb, ub) get no gradient.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .losses_pg import RatioTo, clip_stats, clipped_surrogate, denominator, reads_denominator
from .registry import builtin
from .types import LossInputs, LossOut, finish, log_ratio, masked_frac, prepare, ratio_of, ratio_stats


def tool_call_reward_weight(step: int, horizon: int = 200) -> float:
    """``w_tool(t) = 0.5 * (1 + cos(pi * min(t, T) / T))``: 1 at t = 0, 0 from t = T on."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))


def sil_weight(step: int, horizon: int = 100) -> float:
    """``w_sil(t) = 0.5 * (1 - cos(pi * min(t, T) / T))``: 0 at t = 0, 1 from t = T on."""
    return 0.5 * (1.0 - math.cos(math.pi * min(step, horizon) / horizon))


def tool_call_reward(num_calls: int, step: int, horizon: int = 200, *, coef: float = 0.1,
                     max_calls: int = 10) -> float:
    """Intrinsic reward ``coef * min(num_calls, max_calls) * w_tool(step)``."""
    return coef * min(num_calls, max_calls) * tool_call_reward_weight(step, horizon)


def recalibrate_advantages(returns_N: Tensor, history_means: Sequence[float] | Tensor, *,
                           std_normalize: bool = False) -> Tensor:
    """``A = R - P50(history of group-mean rewards)`` (linear-interpolated median; 0 for no history).

    ``std_normalize`` also divides by ``std(history) + 1e-6`` (an option; the paper uses the plain
    difference). Keep only ``A > 0`` for replay.
    """
    hist = torch.as_tensor(history_means, dtype=returns_N.dtype, device=returns_N.device).flatten()
    if hist.numel() == 0:
        return returns_N.clone()
    adv_N = returns_N - torch.quantile(hist, 0.5)
    if std_normalize:
        std = hist.std() if hist.numel() > 1 else torch.ones((), dtype=hist.dtype, device=hist.device)
        adv_N = adv_N / (std + 1e-6)
    return adv_N


def replay_sample_size(num_candidates: int, buffer_size: int) -> int:
    """``min(2**floor(log2 n), buffer_size)`` (0 for n = 0): 37 with buffer 32 -> 32; 20 -> 16."""
    if num_candidates <= 0:
        return 0
    return min(1 << (int(num_candidates).bit_length() - 1), buffer_size)


def replay_ready(num_above_median: int, buffer_size: int, factor: float = 1.5) -> bool:
    """Replay once the entries with reward above the median of past group means exceed factor * size."""
    return num_above_median > factor * buffer_size


def clip_cov_mask(logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, clipped_BT: Tensor, *,
                  cov_ratio: float, lb: float = 1.0, ub: float = 5.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """Bool (B, T): tokens whose gradient Clip-Cov removes (follows verl's ``clip_cov``).

    Means of A and logp are over the mask; candidates are unclipped masked tokens with lb < cov < ub;
    ``max(floor(cov_ratio * #mask), 1)`` of them are chosen uniformly at random (``generator``).
    """
    m_BT = mask_BT.bool()
    n = m_BT.sum().clamp(min=1)
    logp_BT = logp_BT.detach()
    adv_c_BT = adv_BT - torch.where(m_BT, adv_BT, 0.0).sum() / n
    logp_c_BT = logp_BT - torch.where(m_BT, logp_BT, 0.0).sum() / n
    cov_BT = adv_c_BT * logp_c_BT
    cand_BT = m_BT & ~clipped_BT & (cov_BT > lb) & (cov_BT < ub)
    device = m_BT.device if generator is None else generator.device  # a generator draws on its device
    u_BT = torch.rand(m_BT.shape, generator=generator, dtype=torch.float64, device=device).to(m_BT.device)
    key = torch.where(cand_BT, u_BT, 2.0).flatten()
    rank = torch.empty_like(key, dtype=torch.long)
    rank[torch.argsort(key)] = torch.arange(key.numel(), device=key.device)
    num = torch.floor(cov_ratio * m_BT.sum()).clamp(min=1)
    return cand_BT & (rank.view(m_BT.shape) < num)


@builtin("policy_loss", "sil", reads=reads_denominator)
def sil(logp_BT: Tensor, inputs: LossInputs, *, eps_low: float = 0.2, eps_high: float = 0.2,
        cov_ratio: float = 0.02, cov_lb: float = 1.0, cov_ub: float = 5.0, ratio_to: RatioTo = "behav",
        generator: torch.Generator | None = None) -> LossOut:
    """SPEAR loss: PPO-clip with Clip-Cov. Replay (default): ratio to the stored ``behav_logp``,
    ``cov_ratio = 0.02``; on-policy: ``ratio_to="old"``, ``cov_ratio = 2e-4``. Aggregate with
    ``seq_mean_token_sum_norm``; scale the replay loss by :func:`sil_weight`.
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    lr_BT = log_ratio(logp_BT, denominator(inputs, ratio_to, "sil"), m_BT)
    loss_BT, flags = clipped_surrogate(ratio_of(lr_BT), adv_BT, 1 - eps_low, 1 + eps_high)
    clipped_BT = flags["clip_high"] | flags["clip_low"]
    cov_BT = clip_cov_mask(logp_BT, adv_BT, m_BT, clipped_BT, cov_ratio=cov_ratio, lb=cov_lb, ub=cov_ub,
                           generator=generator)
    loss_BT = torch.where(cov_BT, torch.zeros_like(loss_BT), loss_BT)
    stats = {**clip_stats(flags, m_BT), **ratio_stats(lr_BT, m_BT), "clip_cov_frac": masked_frac(cov_BT, m_BT)}
    return finish(loss_BT, m_BT, stats)
