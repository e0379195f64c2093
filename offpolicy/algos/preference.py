"""Preference losses on a training batch of pairs: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023).

A batch of P pairs is laid out as 2P consecutive rows, ``(chosen, rejected)`` for each pair (the ``pairs``
workflow emits them so; micro-batches split on pair boundaries). With ``delta = logp - ref_logp`` on a
response's tokens:

- ``sigmoid`` (DPO): ``l = -log sigmoid(beta * (sum_t delta_c - sum_t delta_r))``, optional label smoothing;
- ``ipo``: ``l = (mean_t delta_c - mean_t delta_r - 1 / (2 beta))**2``.

The per-pair loss is written on both of its rows, spread evenly over each row's tokens, so the
``seq_mean_token_sum`` aggregation (sum over tokens / number of rows) gives the mean over pairs; the
gradient flows through both rows' log-probs. At initialisation (policy = reference) every DPO term is log 2.

Token weights (OPA-DPO, arXiv 2501.09695: heavier revised spans): when ``LossInputs.weights`` is given,
``delta_t = w_t * (logp_t - ref_logp_t)`` in both sums (and in IPO's means, still divided by the token
count), as :func:`offpolicy.algos.dpo.dpo_loss` with ``reduction="sequence_sum"``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .dpo import _smoothed_nll, weighted_delta
from .registry import builtin
from .types import LossInputs, LossOut, finish, require


@builtin("policy_loss", "dpo", reads=("ref_logp",))
def dpo(logp_BT: Tensor, inputs: LossInputs, *, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0, nll_coef: float = 0.0) -> LossOut:
    """DPO / IPO per-token loss over rows ``(chosen, rejected)`` pairs (see the module docstring).

    ``nll_coef`` > 0 adds ``nll_coef x`` the chosen response's negative log-likelihood per token (its mean
    over the response) to each pair's loss: RPO (Pang et al. 2024, arXiv 2404.19733; TRL's ``rpo_alpha``,
    which averages over the batch's chosen tokens instead), which keeps the chosen answer likely while the
    margin grows; stat ``nll_chosen``.

    Stats, over the live pairs (an inert pair's rows have no trainable token; see
    :mod:`offpolicy.rollout.online_pairs`): ``preference_accuracy`` (share of pairs whose implicit reward
    margin is > 0), ``reward_margin``,
    ``reward_chosen`` / ``reward_rejected`` (beta x sequence log-ratio; IPO: beta x mean log-ratio),
    ``logp_chosen`` / ``logp_rejected`` (mean sequence log-prob under the policy); ``pairs_live``: the
    share of pairs that are live.
    """
    if logp_BT.shape[0] % 2:
        raise ValueError(f"dpo: a batch of pairs has an even number of rows, got {logp_BT.shape[0]}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo: label_smoothing={label_smoothing} applies to loss_type='sigmoid' only (IPO's squared "
                         f"loss has no smoothing term), got loss_type={loss_type!r}; set label_smoothing=0")
    m_BT = inputs.mask.bool()
    delta_BT = weighted_delta(logp_BT, require(inputs, "ref_logp", "dpo"), inputs.mask, inputs.weights)
    n_B = m_BT.sum(-1).clamp(min=1).to(logp_BT.dtype)
    seq_B = delta_BT.sum(-1) if loss_type == "sigmoid" else delta_BT.sum(-1) / n_B
    margin_P = seq_B[0::2] - seq_B[1::2]
    if loss_type == "sigmoid":
        loss_P = _smoothed_nll(beta * margin_P, label_smoothing)
    else:
        loss_P = (margin_P - 1.0 / (2.0 * beta)) ** 2
    nll_P = -torch.where(m_BT[0::2], logp_BT[0::2], torch.zeros_like(logp_BT[0::2])).sum(-1) / n_B[0::2]
    if nll_coef:
        loss_P = loss_P + nll_coef * nll_P
    loss_BT = loss_P.repeat_interleave(2)[:, None] * m_BT / n_B[:, None]
    logp_B = torch.where(m_BT, logp_BT, torch.zeros_like(logp_BT)).sum(-1).detach()
    rewards_B = beta * seq_B.detach()
    live_P = m_BT[0::2].any(-1) | m_BT[1::2].any(-1)  # an inert pair (no trainable token) is not counted

    def mean(x_P: Tensor) -> Tensor:
        return x_P[live_P].mean() if bool(live_P.any()) else torch.zeros((), dtype=x_P.dtype)

    stats = {"preference_accuracy": mean((margin_P.detach() > 0).float()),
             "reward_margin": mean(rewards_B[0::2] - rewards_B[1::2]),
             "reward_chosen": mean(rewards_B[0::2]), "reward_rejected": mean(rewards_B[1::2]),
             "logp_chosen": mean(logp_B[0::2]), "logp_rejected": mean(logp_B[1::2]),
             "pairs_live": live_P.float().mean(), "nll_chosen": mean(nll_P.detach())}
    return finish(loss_BT, m_BT, stats)


dpo.pairwise = True  # trains on rows laid out as (chosen, rejected) pairs: the ``pairs`` workflow
