"""Preference losses on a training batch of pairs: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023).

A batch of P pairs is laid out as 2P consecutive rows, ``(chosen, rejected)`` for each pair (the ``pairs``
workflow emits them so; micro-batches split on pair boundaries). With ``delta = logp - ref_logp`` on a
response's tokens:

- ``sigmoid`` (DPO): ``l = -log sigmoid(beta * (sum_t delta_c - sum_t delta_r))``, optional label smoothing;
- ``ipo``: ``l = (mean_t delta_c - mean_t delta_r - 1 / (2 beta))**2``.

The per-pair loss is written on both of its rows, spread evenly over each row's tokens, so the
``seq_mean_token_sum`` aggregation (sum over tokens / number of rows) gives the mean over pairs; the
gradient flows through both rows' log-probs. At initialisation (policy = reference) every DPO term is log 2.
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
        label_smoothing: float = 0.0) -> LossOut:
    """DPO / IPO per-token loss over rows ``(chosen, rejected)`` pairs (see the module docstring).

    Stats: ``preference_accuracy`` (share of pairs whose implicit reward margin is > 0), ``reward_margin``,
    ``reward_chosen`` / ``reward_rejected`` (beta x sequence log-ratio; IPO: beta x mean log-ratio),
    ``logp_chosen`` / ``logp_rejected`` (mean sequence log-prob under the policy).
    """
    if logp_BT.shape[0] % 2:
        raise ValueError(f"dpo: a batch of pairs has an even number of rows, got {logp_BT.shape[0]}")
    m_BT = inputs.mask.bool()
    delta_BT = weighted_delta(logp_BT, require(inputs, "ref_logp", "dpo"), inputs.mask, None)
    n_B = m_BT.sum(-1).clamp(min=1).to(logp_BT.dtype)
    seq_B = delta_BT.sum(-1) if loss_type == "sigmoid" else delta_BT.sum(-1) / n_B
    margin_P = seq_B[0::2] - seq_B[1::2]
    if loss_type == "sigmoid":
        loss_P = _smoothed_nll(beta * margin_P, label_smoothing)
    else:
        loss_P = (margin_P - 1.0 / (2.0 * beta)) ** 2
    loss_BT = loss_P.repeat_interleave(2)[:, None] * m_BT / n_B[:, None]
    logp_B = torch.where(m_BT, logp_BT, torch.zeros_like(logp_BT)).sum(-1).detach()
    rewards_B = beta * seq_B.detach()
    stats = {"preference_accuracy": (margin_P.detach() > 0).float().mean(),
             "reward_margin": (rewards_B[0::2] - rewards_B[1::2]).mean(),
             "reward_chosen": rewards_B[0::2].mean(), "reward_rejected": rewards_B[1::2].mean(),
             "logp_chosen": logp_B[0::2].mean(), "logp_rejected": logp_B[1::2].mean()}
    return finish(loss_BT, m_BT, stats)


dpo.pairwise = True  # trains on rows laid out as (chosen, rejected) pairs: the ``pairs`` workflow
