"""KL estimators between the current policy and a reference, per token (Schulman 2020, "Approximating
KL divergence"), with ``delta = logp - ref_logp`` (samples from the current policy):

- ``k1 = delta``, ``k2 = delta**2 / 2``, ``k3 = exp(-delta) - 1 + delta``;
- ``low_var_kl`` = k3 clamped to [-10, 10] (verl; delta is also clamped to [-20, 20] first so exp cannot
  overflow, which changes nothing inside the final clamp range).

Signature ``fn(logp_BT, ref_logp_BT) -> kl_BT``; mask and aggregate the result like a loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import builtin


@builtin("kl", "k1")
def k1(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """``logp - ref_logp`` (unbiased, high variance, can be negative)."""
    return logp_BT - ref_logp_BT


@builtin("kl", "k2")
def k2(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """``(logp - ref_logp)**2 / 2``."""
    return 0.5 * (logp_BT - ref_logp_BT) ** 2


@builtin("kl", "k3")
def k3(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """``exp(-delta) - 1 + delta`` = ``r - 1 - log r`` with ``r = ref/pi``; unbiased and >= 0."""
    delta_BT = logp_BT - ref_logp_BT
    return torch.expm1(-delta_BT) + delta_BT


@builtin("kl", "low_var_kl")
def low_var_kl(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """k3 clamped to [-10, 10] (verl's ``low_var_kl``)."""
    delta_BT = (logp_BT - ref_logp_BT).clamp(-20.0, 20.0)
    return (torch.expm1(-delta_BT) + delta_BT).clamp(-10.0, 10.0)


def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis: ``logsumexp(z) - sum softmax(z) * z``, (B, T)."""
    p_BTV = torch.softmax(logits_BTV, dim=-1)
    live_BTV = p_BTV > 0
    # -inf logits: 0, not nan, in the value and in the gradient (the backward of p * (-inf) is nan even
    # where the outer ``where`` drops it), so the -inf is replaced before the product
    safe_BTV = torch.where(live_BTV, logits_BTV, torch.zeros_like(logits_BTV))
    p_logits_BTV = torch.where(live_BTV, p_BTV * safe_BTV, torch.zeros_like(p_BTV))
    return torch.logsumexp(logits_BTV, dim=-1) - p_logits_BTV.sum(-1)
