"""BAPO: balanced policy optimisation with adaptive clipping (arXiv 2510.18927, official repo
WooooDyy/BAPO ``recipe/bapo/policy_loss.py``).

PPO surrogate ``-min(rho*A, clip(rho, c_low, c_high)*A)`` with *absolute* bounds, rho against ``old_logp``.
Before each update the bounds are searched so that positive-advantage tokens keep at least a fraction
``rho0`` of the loss contribution ``eff = A * (A >= 0 ? min(rho, c_high) : max(rho, c_low))`` on the mask.

- ``search="paper"`` (Algorithm 1): from ``(a-, a+)``, while ``frac < rho0`` and ``c_low + step_low <= b-``:
  raise ``c_high`` by ``step_high`` if it stays ``<= b+``, else raise ``c_low`` by ``step_low``.
- ``search="code"`` (official code): target ``pos / (neg + 1e-8) >= rho0 / (1 - rho0)``; raise ``c_low``
  (capped at ``b-``) first, then ``c_high`` (capped at ``b+``).

The search path is a fixed list of candidate bounds, so all candidates are scored and the first one that
meets the target is picked with tensor ops (no host sync). Bounds are reset at every call.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .losses_pg import RatioTo, clip_stats, clipped_surrogate, denominator, reads_denominator
from .registry import builtin
from .types import LossInputs, LossOut, finish, log_ratio, prepare, ratio_of, ratio_stats

_TOL = 1e-9  # float slack when comparing accumulated steps with the range ends
CODE_EPS = 1e-8


def bapo_contributions(ratio_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, c_low: float,
                       c_high: float) -> tuple[Tensor, Tensor]:
    """``(pos, neg)``: summed positive and negative parts of ``eff`` over the mask (0-dim tensors)."""
    eff_ratio_BT = torch.where(adv_BT >= 0, ratio_BT.clamp(max=c_high), ratio_BT.clamp(min=c_low))
    eff_BT = torch.where(mask_BT.bool(), eff_ratio_BT * adv_BT, torch.zeros_like(ratio_BT))
    return eff_BT.clamp(min=0).sum(), -eff_BT.clamp(max=0).sum()


def bapo_search_path(low_range: tuple[float, float], high_range: tuple[float, float], step_low: float,
                     step_high: float, search: str) -> list[tuple[float, float]]:
    """Candidate ``(c_low, c_high)`` in the order the search visits them (plain floats)."""
    (a_lo, b_lo), (a_hi, b_hi) = low_range, high_range
    path = [(a_lo, a_hi)]
    if search == "paper":
        i = j = 0
        while a_lo + (j + 1) * step_low <= b_lo + _TOL:
            if step_high > 0 and a_hi + (i + 1) * step_high <= b_hi + _TOL:
                i += 1
            elif step_low > 0:
                j += 1
            else:
                break
            path.append((a_lo + j * step_low, a_hi + i * step_high))
        return path
    if search != "code":
        raise ValueError(f"bapo: search must be 'paper' or 'code', got {search!r}")
    c_lo, c_hi = a_lo, a_hi
    while step_low > 0 and c_lo < b_lo:
        c_lo = min(c_lo + step_low, b_lo)
        path.append((c_lo, c_hi))
    while step_high > 0 and c_hi < b_hi:
        c_hi = min(c_hi + step_high, b_hi)
        path.append((c_lo, c_hi))
    return path


def bapo_bounds(ratio_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, rho0: float = 0.4,
                low_range: tuple[float, float] = (0.6, 0.9), high_range: tuple[float, float] = (1.2, 3.0),
                step_low: float = 0.02, step_high: float = 0.05,
                search: str = "paper") -> tuple[Tensor, Tensor, Tensor]:
    """Search the clip bounds; returns 0-dim tensors ``(c_low, c_high, frac)``, ``frac = pos/(pos+neg)``.

    ``ratio_BT`` is treated as a constant. ``adv_BT`` is (B, T) (or (B,), broadcast).
    """
    ratio_BT = ratio_BT.detach()
    adv_BT = adv_BT.unsqueeze(-1).expand_as(ratio_BT) if adv_BT.dim() == 1 else adv_BT
    path = bapo_search_path(low_range, high_range, step_low, step_high, search)
    pos_K, neg_K = (torch.stack(t) for t in zip(*(bapo_contributions(ratio_BT, adv_BT, mask_BT, lo, hi)
                                                  for lo, hi in path)))
    total_K = pos_K + neg_K
    frac_K = torch.where(total_K > 0, pos_K / torch.where(total_K > 0, total_K, 1.0), 1.0)
    if search == "paper":
        ok_K = frac_K >= rho0
    else:
        target = rho0 / (1 - rho0) if rho0 < 1 else float("inf")
        ok_K = (neg_K <= 0) | (pos_K / (neg_K + CODE_EPS) >= target)
    last = torch.tensor(len(path) - 1, device=ratio_BT.device)
    k = torch.where(ok_K.any(), ok_K.int().argmax(), last)
    lows_K = torch.tensor([p[0] for p in path], dtype=ratio_BT.dtype, device=ratio_BT.device)
    highs_K = torch.tensor([p[1] for p in path], dtype=ratio_BT.dtype, device=ratio_BT.device)
    return lows_K[k], highs_K[k], frac_K[k]


@builtin("policy_loss", "bapo", reads=reads_denominator)
def bapo(logp_BT: Tensor, inputs: LossInputs, *, rho0: float = 0.4,
         low_range: tuple[float, float] = (0.6, 0.9), high_range: tuple[float, float] = (1.2, 3.0),
         step_low: float = 0.02, step_high: float = 0.05, search: Literal["paper", "code"] = "paper",
         dual_clip: float | None = None, ratio_to: RatioTo = "old") -> LossOut:
    """BAPO per-token loss; stats carry the chosen ``bapo_c_low``, ``bapo_c_high`` and ``bapo_frac``.

    The official code also applies a dual clip with c = 3 (pass ``dual_clip=3.0`` to match); the paper
    does not, so the default is off.
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    lr_BT = log_ratio(logp_BT, denominator(inputs, ratio_to, "bapo"), m_BT)
    ratio_BT = ratio_of(lr_BT)
    c_low, c_high, frac = bapo_bounds(ratio_BT, adv_BT, m_BT, rho0=rho0, low_range=low_range,
                                      high_range=high_range, step_low=step_low, step_high=step_high,
                                      search=search)
    loss_BT, flags = clipped_surrogate(ratio_BT, adv_BT, c_low, c_high, dual_clip)
    stats = {**clip_stats(flags, m_BT), **ratio_stats(lr_BT, m_BT),
             "bapo_c_low": c_low, "bapo_c_high": c_high, "bapo_frac": frac}
    return finish(loss_BT, m_BT, stats)
