"""Policy-gradient losses: REINFORCE, PPO-clip (GRPO/DAPO), GSPO, CISPO, decoupled PPO, SFT.

Signature ``fn(logp_BT, inputs: LossInputs, **params) -> LossOut``. ``logp_BT`` carries the gradient;
every other tensor is treated as a constant. Masked positions are sanitised with ``torch.where`` before
any nonlinearity, so junk there never reaches a value or a gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .registry import builtin
from .types import (LossInputs, LossOut, clean, finish, log_ratio, masked_frac, prepare, ratio_of, ratio_stats,
                    require)

_DENOMS = {"old": "old_logp", "behav": "behav_logp"}
RatioTo = Literal["old", "behav"]


def reads_denominator(params: dict) -> tuple[str, ...]:
    """Declared input of a loss whose ratio is taken against ``_DENOMS[ratio_to]``."""
    return (_DENOMS[params["ratio_to"]],)


def denominator(inputs: LossInputs, ratio_to: str, loss: str) -> Tensor:
    """The denominator log-probs: ``old_logp`` (``ratio_to="old"``) or ``behav_logp`` ("bypass" mode)."""
    if ratio_to not in _DENOMS:
        raise ValueError(f"{loss}: ratio_to must be one of {sorted(_DENOMS)}, got {ratio_to!r}")
    return require(inputs, _DENOMS[ratio_to], loss)


def clipped_surrogate(ratio_BT: Tensor, adv_BT: Tensor, low: float | Tensor, high: float | Tensor,
                      dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``-min(rho*A, clip(rho, low, high)*A)`` with absolute bounds (floats or (B, T) tensors).

    With ``dual_clip = c > 1`` (Ye et al. 2020), negative-advantage tokens are capped at ``-c*A``.
    Returns the per-token loss and bool (B, T) flags of the tokens whose gradient is clipped away.
    """
    low_t = torch.as_tensor(low, dtype=ratio_BT.dtype, device=ratio_BT.device)
    high_t = torch.as_tensor(high, dtype=ratio_BT.dtype, device=ratio_BT.device)
    clipped_BT = torch.minimum(torch.maximum(ratio_BT, low_t), high_t)
    loss_BT = torch.maximum(-adv_BT * ratio_BT, -adv_BT * clipped_BT)
    flags = {"clip_high": (adv_BT > 0) & (ratio_BT > high_t), "clip_low": (adv_BT < 0) & (ratio_BT < low_t)}
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be None or > 1, got {dual_clip}")
        cap_BT = -adv_BT * dual_clip
        flags["dual_clip"] = (adv_BT < 0) & (loss_BT > cap_BT)
        loss_BT = torch.where(adv_BT < 0, torch.minimum(loss_BT, cap_BT), loss_BT)
    return loss_BT, flags


def clip_stats(flags: dict[str, Tensor], m_BT: Tensor) -> dict[str, Tensor]:
    """``<reason>_frac`` for each flag and the total ``clip_frac`` (any reason), over the mask."""
    stats = {f"{k}_frac": masked_frac(v, m_BT) for k, v in flags.items()}
    any_BT = torch.zeros_like(m_BT)
    for v in flags.values():
        any_BT = any_BT | v
    stats["clip_frac"] = masked_frac(any_BT, m_BT)
    return stats


@builtin("policy_loss", "reinforce", reads=("behav_logp",))
def reinforce(logp_BT: Tensor, inputs: LossInputs) -> LossOut:
    """REINFORCE ``-A * logp`` (on-policy, no ratio). Logs ratio stats vs ``behav_logp`` if present."""
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    stats = {}
    if inputs.behav_logp is not None:
        stats = ratio_stats(log_ratio(logp_BT, inputs.behav_logp, m_BT), m_BT)
    return finish(-adv_BT * logp_BT, m_BT, stats)


@builtin("policy_loss", "ppo_clip", reads=reads_denominator)
def ppo_clip(logp_BT: Tensor, inputs: LossInputs, *, eps_low: float = 0.2, eps_high: float = 0.2,
             dual_clip: float | None = None, ratio_to: RatioTo = "old") -> LossOut:
    """PPO-clip ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``, rho = exp(logp - denom) differentiable.

    GRPO (eps 0.2) and DAPO (clip-higher, eps_high 0.28; arXiv 2503.14476) differ only in eps and in the
    aggregation. ``ratio_to="old"`` uses ``old_logp``; ``"behav"`` is the bypass mode (``behav_logp``).
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    lr_BT = log_ratio(logp_BT, denominator(inputs, ratio_to, "ppo_clip"), m_BT)
    loss_BT, flags = clipped_surrogate(ratio_of(lr_BT), adv_BT, 1 - eps_low, 1 + eps_high, dual_clip)
    return finish(loss_BT, m_BT, {**clip_stats(flags, m_BT), **ratio_stats(lr_BT, m_BT)})


@builtin("policy_loss", "gspo", reads=reads_denominator)
def gspo(logp_BT: Tensor, inputs: LossInputs, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
         ratio_to: RatioTo = "old") -> LossOut:
    """GSPO (arXiv 2507.18071), sequence ratio ``s_i = exp(mean_t(logp - denom))`` clipped at 1 -/+ eps.

    Implemented as the paper's GSPO-token form ``log s_{i,t} = logp - sg[logp] + sg[log s_i]``: the value
    is ``s_i`` on every token and, aggregated with ``seq_mean_token_mean``, the gradient is exactly the
    sequence one. Shapes: ``logp_BT`` and the (B, T) inputs -> ``loss_BT`` (B, T).

    Departure from the paper, as in verl (``compute_policy_loss_gspo``): the whole token log-ratio
    ``log s_{i,t}`` is clamped at 10, so a sequence whose mean log-ratio exceeds 10 has the value ``e^10``
    and *no* gradient (counted in ``seq_cap_frac``). Capping only the detached term would leave it a
    gradient of weight ``e^10 * |A|``.
    """
    max_log_ratio = 10.0  # verl's cap
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    lr_BT = log_ratio(logp_BT, denominator(inputs, ratio_to, "gspo"), m_BT)
    seq_lr_B = lr_BT.detach().sum(-1) / m_BT.sum(-1).clamp(min=1)
    seq_lr_BT = clean(seq_lr_B.unsqueeze(-1).expand_as(lr_BT), m_BT)
    log_s_BT = (logp_BT - logp_BT.detach() + seq_lr_BT).clamp(max=max_log_ratio)
    loss_BT, flags = clipped_surrogate(log_s_BT.exp(), adv_BT, 1 - eps_low, 1 + eps_high)
    flags["seq_cap"] = seq_lr_BT > max_log_ratio
    return finish(loss_BT, m_BT, {**clip_stats(flags, m_BT), **ratio_stats(log_s_BT, m_BT)})


@builtin("policy_loss", "cispo", reads=reads_denominator)
def cispo(logp_BT: Tensor, inputs: LossInputs, *, eps_low: float = 1.0, eps_high: float = 0.28,
          ratio_to: RatioTo = "old") -> LossOut:
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``-sg(clip(rho, 1-eps_low, 1+eps_high)) * A * logp``.

    The weight is truncated, never the gradient. Default ``eps_low = 1`` = no lower bound, as in the paper.
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    lr_BT = log_ratio(logp_BT, denominator(inputs, ratio_to, "cispo"), m_BT).detach()
    rho_BT = ratio_of(lr_BT)
    w_BT = rho_BT.clamp(1 - eps_low, 1 + eps_high)
    flags = {"trunc_high": rho_BT > 1 + eps_high, "trunc_low": rho_BT < 1 - eps_low}
    return finish(-w_BT * adv_BT * logp_BT, m_BT, {**clip_stats(flags, m_BT), **ratio_stats(lr_BT, m_BT)})


@builtin("policy_loss", "decoupled_ppo", reads=("old_logp", "behav_logp"))
def decoupled_ppo(logp_BT: Tensor, inputs: LossInputs, *, eps_low: float = 0.2, eps_high: float = 0.2,
                  cap: float = 3.0, level: Literal["token", "sequence"] = "token",
                  mode: Literal["truncate", "mask"] = "truncate",
                  dual_clip: float | None = None) -> LossOut:
    """Decoupled PPO (AReaL, arXiv 2505.24298): PPO-clip against ``old_logp`` (proximal policy), times
    the behaviour weight ``w = exp(old_logp - behav_logp)`` (sg), ``min(w, cap)`` (``mode="truncate"``)
    or ``w * 1[w <= cap]`` (``"mask"``). ``level="sequence"`` uses ``exp(sum_t(old - behav))`` per sequence.
    """
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    old_BT = require(inputs, "old_logp", "decoupled_ppo")
    behav_lr_BT = log_ratio(old_BT.detach(), require(inputs, "behav_logp", "decoupled_ppo"), m_BT)
    if level == "sequence":
        behav_lr_BT = clean(behav_lr_BT.sum(-1, keepdim=True).expand_as(behav_lr_BT), m_BT)
    elif level != "token":
        raise ValueError(f"decoupled_ppo: level must be 'token' or 'sequence', got {level!r}")
    w_BT = behav_lr_BT.clamp(max=80.0).exp()  # clamp only guards exp overflow; cap <= 1e34 unaffected
    over_BT = w_BT > cap
    if mode == "truncate":
        w_BT = w_BT.clamp(max=cap)
    elif mode == "mask":
        w_BT = torch.where(over_BT, torch.zeros_like(w_BT), w_BT)
    else:
        raise ValueError(f"decoupled_ppo: mode must be 'truncate' or 'mask', got {mode!r}")
    lr_BT = log_ratio(logp_BT, old_BT, m_BT)
    loss_BT, flags = clipped_surrogate(ratio_of(lr_BT), adv_BT, 1 - eps_low, 1 + eps_high, dual_clip)
    stats = {**clip_stats(flags, m_BT), **ratio_stats(lr_BT, m_BT), **ratio_stats(behav_lr_BT, m_BT, "behav_weight")}
    stats[f"behav_weight_{mode}_frac"] = masked_frac(over_BT, m_BT)
    return finish(w_BT * loss_BT, m_BT, stats)


@builtin("policy_loss", "sft", reads=())
def sft(logp_BT: Tensor, inputs: LossInputs) -> LossOut:
    """Supervised fine-tuning: negative log-likelihood ``-logp`` (the advantage is ignored)."""
    m_BT, logp_BT, _ = prepare(logp_BT, inputs)
    return finish(-logp_BT, m_BT, {})


@builtin("policy_loss", "opmd_legacy", reads=())
def opmd_legacy(logp_BT: Tensor, inputs: LossInputs, *, tau: float = 1.0) -> LossOut:
    """Trinity-RFT's older standalone OPMD loss ``-A * logp / (1 + tau)``; use with ``opmd_baseline``."""
    m_BT, logp_BT, adv_BT = prepare(logp_BT, inputs)
    return finish(-adv_BT * logp_BT / (1 + tau), m_BT, {})
