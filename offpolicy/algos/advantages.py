"""Sequence-level advantages computed within groups of responses to the same prompt.

Every estimator has the signature ``fn(rewards_N, group_ids_N, **params) -> adv_N``. Group labels are
arbitrary integers (not necessarily sorted or contiguous). A group of one response gets baseline 0 and
std 1, so it never produces NaN (its advantage is its reward).

- ``group_mean``: ``A_i = r_i - mean(r)``  (Dr. GRPO, arXiv 2503.20783; REC, arXiv 2509.24203).
- ``grpo``: ``(r_i - mean) / (std + 1e-6)``  (DeepSeekMath, arXiv 2402.03300).
- ``rloo``: ``r_i - mean_{j != i} r_j``  (Ahmadian et al. 2024).
- ``opmd_baseline``: ``r_i - mean`` or ``r_i - tau * log mean exp(r / tau)``  (Kimi k1.5 OPMD).
- ``asymre``: ``r_i - (mean + shift)``, a lowered baseline  (AsymRE, Arnal et al. 2025).
- RED-Drop (``drop="balance"`` on ``group_mean`` and ``grpo``; REC paper, arXiv 2509.24203): surplus
  negatives are dropped at random, dropped samples get A = 0 and the statistics use the kept ones.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .registry import builtin

GRPO_EPS = 1e-6
Drop = Literal["none", "balance"]


def group_index(group_ids_N: Tensor) -> tuple[Tensor, int]:
    """Dense group index in ``[0, G)`` for each sample and the number of groups G."""
    labels_G, idx_N = torch.unique(group_ids_N, return_inverse=True)
    return idx_N, labels_G.numel()


def group_sum(x_N: Tensor, idx_N: Tensor, num_groups: int) -> Tensor:
    """Per-group sums, shape (G,)."""
    return torch.zeros(num_groups, dtype=x_N.dtype, device=x_N.device).index_add_(0, idx_N, x_N)


def group_stats(r_N: Tensor, group_ids_N: Tensor, keep_N: Tensor | None = None,
                unbiased: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group mean, std and group size over the kept samples (all by default).

    Groups with one kept sample get mean 0 and std 1 (so the advantage of a singleton is its reward).
    """
    idx_N, g = group_index(group_ids_N)
    w_N = torch.ones_like(r_N) if keep_N is None else keep_N.to(r_N.dtype)
    n_G = group_sum(w_N, idx_N, g)
    mean_G = group_sum(w_N * r_N, idx_N, g) / n_G.clamp(min=1)
    sq_G = group_sum(w_N * (r_N - mean_G[idx_N]) ** 2, idx_N, g)
    var_G = sq_G / (n_G - 1 if unbiased else n_G).clamp(min=1)
    single_G = n_G <= 1
    mean_G = torch.where(single_G, torch.zeros_like(mean_G), mean_G)
    std_G = torch.where(single_G, torch.ones_like(var_G), var_G.sqrt())
    return mean_G[idx_N], std_G[idx_N], n_G[idx_N]


def red_drop_keep(rewards_N: Tensor, group_ids_N: Tensor,
                  generator: torch.Generator | None = None) -> Tensor:
    """RED-Drop: a bool (N,) mask of samples kept after balancing each group.

    ``r_i >= mean`` is positive; when negatives outnumber positives, ``#neg - #pos`` negatives chosen
    uniformly at random are dropped. Vectorised: negatives are ranked within their group by a random key.
    """
    idx_N, g = group_index(group_ids_N)
    mean_N = group_stats(rewards_N, group_ids_N)[0]
    pos_N = (rewards_N >= mean_N) | (group_sum(torch.ones_like(rewards_N), idx_N, g)[idx_N] <= 1)
    n_pos_G = group_sum(pos_N.to(rewards_N.dtype), idx_N, g)
    n_neg_G = group_sum((~pos_N).to(rewards_N.dtype), idx_N, g)
    surplus_N = (n_neg_G - n_pos_G).clamp(min=0)[idx_N]
    device = rewards_N.device if generator is None else generator.device  # a generator draws on its device
    u_N = torch.rand(rewards_N.shape, generator=generator, dtype=torch.float64, device=device).to(rewards_N.device)
    key_N = idx_N.double() * 3 + torch.where(pos_N, torch.full_like(u_N, 2.0), u_N)
    order_N = torch.argsort(key_N)
    rank_sorted = torch.arange(len(order_N), device=order_N.device)
    first_G = torch.cumsum(n_pos_G + n_neg_G, 0) - (n_pos_G + n_neg_G)
    rank_N = torch.empty_like(order_N)
    rank_N[order_N] = rank_sorted - first_G.long()[idx_N[order_N]]
    return pos_N | (rank_N >= surplus_N)


@builtin("advantage", "group_mean")
def group_mean(rewards_N: Tensor, group_ids_N: Tensor, *, drop: Drop = "none",
               generator: torch.Generator | None = None) -> Tensor:
    """``A_i = r_i - mean_group(r)``, (N,) -> (N,). ``drop="balance"`` applies RED-Drop first."""
    keep_N = _keep(rewards_N, group_ids_N, drop, generator)
    mean_N = group_stats(rewards_N, group_ids_N, keep_N)[0]
    return torch.where(keep_N, rewards_N - mean_N, torch.zeros_like(rewards_N))


@builtin("advantage", "grpo")
def grpo(rewards_N: Tensor, group_ids_N: Tensor, *, unbiased_std: bool = True, drop: Drop = "none",
         generator: torch.Generator | None = None) -> Tensor:
    """``A_i = (r_i - mean) / (std + 1e-6)``, (N,) -> (N,).

    ``unbiased_std=True`` (DeepSeekMath/TRL); the REC official code uses the population std (False).
    """
    keep_N = _keep(rewards_N, group_ids_N, drop, generator)
    mean_N, std_N, _ = group_stats(rewards_N, group_ids_N, keep_N, unbiased=unbiased_std)
    adv_N = (rewards_N - mean_N) / (std_N + GRPO_EPS)
    return torch.where(keep_N, adv_N, torch.zeros_like(adv_N))


def _keep(rewards_N: Tensor, group_ids_N: Tensor, drop: Drop,
          generator: torch.Generator | None) -> Tensor:
    if drop == "balance":
        return red_drop_keep(rewards_N, group_ids_N, generator)
    if drop == "none":
        return torch.ones_like(rewards_N, dtype=torch.bool)
    raise ValueError(f"drop must be 'none' or 'balance', got {drop!r}")


@builtin("advantage", "rloo")
def rloo(rewards_N: Tensor, group_ids_N: Tensor) -> Tensor:
    """Leave-one-out baseline ``A_i = r_i - mean_{j != i} r_j = K/(K-1) (r_i - mean)``; singleton: r_i."""
    mean_N, _, n_N = group_stats(rewards_N, group_ids_N)
    scale_N = n_N / (n_N - 1).clamp(min=1)
    return torch.where(n_N > 1, scale_N * (rewards_N - mean_N), rewards_N)


@builtin("advantage", "opmd_baseline")
def opmd_baseline(rewards_N: Tensor, group_ids_N: Tensor, *, baseline: Literal["mean", "logavgexp"] = "mean",
                  tau: float = 1.0) -> Tensor:
    """Kimi k1.5 OPMD baseline: ``b = mean(r)`` or ``b = tau * log((1/K) sum_j exp(r_j / tau))``.

    Follows Trinity-RFT's ``opmd`` advantage; a singleton group gets b = 0.
    """
    mean_N, _, n_N = group_stats(rewards_N, group_ids_N)
    if baseline == "mean":
        return rewards_N - mean_N
    if baseline != "logavgexp":
        raise ValueError(f"baseline must be 'mean' or 'logavgexp', got {baseline!r}")
    idx_N, g = group_index(group_ids_N)
    z_N = rewards_N / tau
    max_G = torch.full((g,), -math.inf, dtype=z_N.dtype, device=z_N.device)
    max_G = max_G.scatter_reduce(0, idx_N, z_N, reduce="amax")
    lse_N = group_sum((z_N - max_G[idx_N]).exp(), idx_N, g).log()[idx_N] + max_G[idx_N]
    b_N = tau * (lse_N - n_N.log())
    return torch.where(n_N > 1, rewards_N - b_N, rewards_N)


@builtin("advantage", "asymre")
def asymre(rewards_N: Tensor, group_ids_N: Tensor, *, shift: float = -0.1) -> Tensor:
    """AsymRE: ``A_i = r_i - (mean + shift)``; a negative shift lowers the baseline (Arnal et al. 2025).

    A singleton group has mean 0, so its advantage is ``r_i - shift``.
    """
    mean_N = group_stats(rewards_N, group_ids_N)[0]
    return rewards_N - (mean_N + shift)


@builtin("advantage", "identity")
def identity(rewards_N: Tensor, group_ids_N: Tensor) -> Tensor:
    """``A_i = r_i``: the "rewards" already are advantages (SPEAR's recalibrated replay items)."""
    return rewards_N.clone()
