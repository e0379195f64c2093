"""Regularisers: per-token terms added to the policy loss and aggregated with it.

Signature ``fn(logp_BT, inputs: LossInputs, **params) -> LossOut`` (as a policy loss); each declares
the log-probs it reads. ``logp_BT`` carries the gradient; the loss is exactly 0 on masked positions.

- ``kl_ref``: ``coef * KL(pi || ref)`` with a KL estimator (``offpolicy.algos.KL_ESTIMATORS``; GRPO's
  loss-side KL, the RLHF anchor).
- ``kl_convex``: ReMix's KL-Convex (arXiv 2507.06892), ``coef * [lam(t) * KL(pi || base) +
  (1 - lam(t)) * KL(pi || pi_{k-1})]`` with ``lam(t) = max(1 - drop * ceil(max(t - start, 0) / every), floor)``.
- ``entropy_bonus``: ``-coef * H(pi)`` per token.
- ``forward_kl``: ``-coef * logp`` (AsymRE's regulariser; equals REINFORCE with ``A + coef``).
- ``k2``: ``coef * (logp - behav_logp)**2`` (Kimi OPMD; the 1/2 of k2 is folded into ``coef``).
"""

from __future__ import annotations

from torch import Tensor

from .registry import KL_ESTIMATORS, builtin
from .remix import kl_convex_lambda
from .types import LossInputs, LossOut, clean, finish, log_ratio, require


def _token_mean(x_BT: Tensor, m_BT: Tensor) -> Tensor:
    return (clean(x_BT, m_BT).sum() / m_BT.sum().clamp(min=1)).detach()


def _kl(estimator: str, logp_BT: Tensor, other_BT: Tensor, m_BT: Tensor) -> Tensor:
    return clean(KL_ESTIMATORS[estimator](logp_BT, clean(other_BT.to(logp_BT.dtype), m_BT)), m_BT)


@builtin("regularizer", "kl_ref", reads=("ref_logp",))
def kl_ref(logp_BT: Tensor, inputs: LossInputs, *, coef: float = 0.0, estimator: str = "low_var_kl") -> LossOut:
    """``coef * KL_est(logp, ref_logp)`` per token; stat ``kl_ref`` = token mean of the KL (without coef)."""
    m_BT = inputs.mask.bool()
    logp_BT = clean(logp_BT, m_BT)
    kl_BT = _kl(estimator, logp_BT, require(inputs, "ref_logp", "kl_ref"), m_BT)
    return finish(coef * kl_BT, m_BT, {"kl_ref": _token_mean(kl_BT, m_BT)})


@builtin("regularizer", "kl_convex", reads=("ref_logp", "prev_logp"))
def kl_convex(logp_BT: Tensor, inputs: LossInputs, *, coef: float = 0.0, estimator: str = "low_var_kl",
              start: int = 50, every: int = 10, drop: float = 0.1, floor: float = 0.5) -> LossOut:
    """KL-Convex at trainer step ``inputs.step``: ``coef * (lam KL(pi||base) + (1 - lam) KL(pi||pi_{k-1}))``.

    ``prev_logp`` (pi_{k-1}) is read only when ``lam < 1``. Stats: ``kl_ref`` (to the base),
    ``kl_prev`` (to pi_{k-1}, 0 while unread) and ``kl_convex_lambda``.
    """
    m_BT = inputs.mask.bool()
    logp_BT = clean(logp_BT, m_BT)
    lam = kl_convex_lambda(inputs.step, start=start, every=every, drop=drop, floor=floor)
    kl_base_BT = _kl(estimator, logp_BT, require(inputs, "ref_logp", "kl_convex"), m_BT)
    kl_prev_BT = kl_base_BT * 0.0
    if lam < 1.0:
        kl_prev_BT = _kl(estimator, logp_BT, require(inputs, "prev_logp", "kl_convex"), m_BT)
    stats = {"kl_ref": _token_mean(kl_base_BT, m_BT), "kl_prev": _token_mean(kl_prev_BT, m_BT),
             "kl_convex_lambda": logp_BT.new_tensor(lam)}
    return finish(coef * (lam * kl_base_BT + (1.0 - lam) * kl_prev_BT), m_BT, stats)


@builtin("regularizer", "entropy_bonus", reads=("entropy",))
def entropy_bonus(logp_BT: Tensor, inputs: LossInputs, *, coef: float = 0.0) -> LossOut:
    """``-coef * entropy`` per token (a positive ``coef`` rewards spread)."""
    m_BT = inputs.mask.bool()
    return finish(-coef * clean(require(inputs, "entropy", "entropy_bonus"), m_BT), m_BT, {})


@builtin("regularizer", "forward_kl", reads=())
def forward_kl(logp_BT: Tensor, inputs: LossInputs, *, coef: float = 0.1) -> LossOut:
    """``-coef * logp`` (AsymRE): pushes up the sampled tokens, the same as lowering the baseline by coef."""
    m_BT = inputs.mask.bool()
    return finish(-coef * clean(logp_BT, m_BT), m_BT, {})


@builtin("regularizer", "k2", reads=("behav_logp",))
def k2(logp_BT: Tensor, inputs: LossInputs, *, coef: float = 0.1) -> LossOut:
    """``coef * (logp - behav_logp)**2`` (Kimi OPMD's squared log-ratio to the sampling policy)."""
    m_BT = inputs.mask.bool()
    lr_BT = log_ratio(clean(logp_BT, m_BT), require(inputs, "behav_logp", "k2"), m_BT)
    return finish(coef * lr_BT ** 2, m_BT, {})
