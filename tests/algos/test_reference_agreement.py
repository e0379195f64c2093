"""Agreement with the reference implementations on random batches (seeded, several shapes, padded masks).

Each reference formula is re-derived below in a few lines of torch, from reading the cited function:
verl = volcengine/verl ``verl/trainer/ppo/core_algos.py`` (commit b178a3c, 2026-01) and its
``verl/utils/torch_functional.py`` masked helpers; Trinity = Trinity-RFT ``trinity/algorithm/``: the REC
loss ``policy_loss_fn/rec_policy_loss.py`` (agentscope-ai/Trinity-RFT 1d7fae4), the OPMD loss, advantages
``advantage_fn/{rec,opmd,asymre}_advantage.py`` and masked helpers ``utils.py`` (modelscope/Trinity-RFT).
Where we differ on purpose the test pins the documented difference (docs/algorithms.md, "Where we differ
from verl / Trinity-RFT"). Tolerance: 1e-6 absolute; verl and Trinity add 1e-8 to the counts of their
masked means, so comparisons of large values allow a relative 1e-7 on top.
"""

import itertools

import pytest
import torch

from offpolicy.algos import (ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, LossInputs, clip_cov_mask,
                             red_drop_keep)

F64 = torch.float64
SHAPES = [(1, 1), (4, 7), (16, 33)]
AGG_MODES = {"token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
             "seq_mean_token_sum": "seq-mean-token-sum", "seq_mean_token_sum_norm": "seq-mean-token-sum-norm"}


def close(a, b, atol=1e-6, rtol=0.0):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=rtol)


def batch(shape, seed, lr_scale=0.8, adv_scale=1.0):
    """Random ``logp`` (leaf), denominator ``old``, sequence advantages and a right-padded mask.

    Lengths are uniform in [1, T]; with B > 1 the second row is fully masked (no trainable token).
    """
    B, T = shape
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=F64) * 3
    old = logp - lr_scale * torch.randn(B, T, generator=gen, dtype=F64)
    adv = adv_scale * torch.randn(B, generator=gen, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    if B > 1:
        lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return logp.requires_grad_(True), old, adv, mask


# --- the reference formulas, restated -------------------------------------------------------------------

def verl_agg(loss, mask, mode, scale=None):
    """verl ``agg_loss``: token sums over the mask; the sequence means skip rows whose mask is empty;
    seq-mean-token-mean adds 1e-8 to each row's count; seq-mean-token-sum-norm divides the total by
    ``loss_scale_factor`` (default T) only."""
    m = mask.to(loss.dtype)
    tok_sum_B, n_B = (loss * m).sum(-1), m.sum(-1)
    rows = n_B > 0
    if mode == "token-mean":
        return tok_sum_B.sum() / n_B.sum()
    if mode == "seq-mean-token-sum":
        return tok_sum_B[rows].sum() / rows.sum()
    if mode == "seq-mean-token-mean":
        return (tok_sum_B / (n_B + 1e-8))[rows].sum() / rows.sum()
    return tok_sum_B.sum() / (mask.shape[-1] if scale is None else scale)


def verl_ppo_vanilla(logp, old, adv_BT, eps_low, eps_high, c=3.0):
    """verl ``compute_policy_loss_vanilla``: ratio from the log-ratio clamped to [-20, 20], the max of the
    unclipped and clipped losses, then for A < 0 the min with the dual-clip cap ``-A*c``."""
    ratio = (logp - old).clamp(-20, 20).exp()
    unclipped, clipped = -adv_BT * ratio, -adv_BT * ratio.clamp(1 - eps_low, 1 + eps_high)
    ppo = torch.maximum(unclipped, clipped)
    loss = torch.where(adv_BT < 0, torch.minimum(ppo, -adv_BT * c), ppo)
    clipfrac_BT = clipped > unclipped
    lower_BT = (ppo > -adv_BT * c) & (adv_BT < 0)
    return loss, clipfrac_BT, lower_BT


def verl_gspo(logp, old, adv_BT, mask, eps_low, eps_high):
    """verl ``compute_policy_loss_gspo``: token log-ratio ``logp - sg(logp) + sg(mean_t(logp - old))`` with
    the mean over the mask (length clamped at 1), clamped at max 10, then PPO-clip on its exp."""
    m = mask.to(logp.dtype)
    seq_B = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = (logp - logp.detach() + seq_B.detach()[:, None]).clamp(max=10.0)
    s = log_s.exp()
    return torch.maximum(-adv_BT * s, -adv_BT * s.clamp(1 - eps_low, 1 + eps_high))


def verl_cispo(logp, old, adv_BT, eps_low, eps_high):
    """verl ``compute_policy_loss_cispo``: ``-sg(clamp(ratio, 1-eps_low, 1+eps_high)) * A * logp``, ratio
    from the log-ratio clamped to [-20, 20]; clip fraction = share of tokens where the clamp acts."""
    ratio = (logp - old).clamp(-20, 20).exp()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    return -weight.detach() * adv_BT * logp, ratio != weight


def verl_clip_cov_candidates(logp, old, adv_BT, mask, eps, lb, ub):
    """verl ``compute_policy_loss_clip_cov``: tokens eligible for the random gradient cut (on the mask,
    not clipped by PPO, ``lb < (A - mean A)(logp - mean logp) < ub`` with masked means), the PPO loss
    (ratio not clamped) and the number cut, ``max(int(ratio * #mask), 1)`` capped by the candidates."""
    m = mask.bool()
    ratio = (logp - old).exp()
    unclipped, clipped = -adv_BT * ratio, -adv_BT * ratio.clamp(1 - eps, 1 + eps)
    mean = lambda x: (x * m).sum() / (m.sum() + 1e-8)  # noqa: E731
    cov = (adv_BT - mean(adv_BT)) * (logp.detach() - mean(logp.detach()))
    cand = m & ~(clipped > unclipped) & (cov > lb) & (cov < ub)
    return cand, torch.maximum(unclipped, clipped)


def verl_kl(logp, ref, name):
    """verl ``kl_penalty_forward``: k1 = logp - ref; k2 = (logp - ref)^2 / 2; "k3" and "low_var_kl" are the
    same: with kl = clamp(ref - logp, -20, 20), ``exp(kl) - kl - 1`` clamped to [-10, 10]."""
    if name == "k1":
        return logp - ref
    if name == "k2":
        return 0.5 * (logp - ref) ** 2
    kl = (ref - logp).clamp(-20, 20)
    return (kl.exp() - kl - 1).clamp(-10, 10)


def per_group(rewards, ids, fn):
    """Apply ``fn(group_rewards) -> group_advantages`` group by group (the references loop over uids)."""
    out = torch.empty_like(rewards)
    for g in ids.unique():
        sel = ids == g
        out[sel] = fn(rewards[sel])
    return out


def verl_grpo(rewards, ids, norm_by_std=True, eps=1e-6):
    """verl ``compute_grpo_outcome_advantage``: mean and unbiased std per uid (a group of one: 0 and 1);
    ``(r - mean) / (std + eps)``, or ``r - mean`` without std normalisation (Dr. GRPO)."""
    def fn(r):
        mean, std = (r.mean(), r.std()) if r.numel() > 1 else (0.0, 1.0)
        return (r - mean) / (std + eps) if norm_by_std else r - mean
    return per_group(rewards, ids, fn)


def verl_rloo(rewards, ids):
    """verl ``compute_rloo_outcome_advantage``: ``(r * n - mean * n) / (n - 1)``; a group of one keeps r."""
    return per_group(rewards, ids, lambda r: r if r.numel() == 1 else (r - r.mean()) * r.numel() / (r.numel() - 1))


def trinity_rec(logp, old, adv_BT, mask, clip_mode, weight, regularizer, eps=0.2, eps_prime=(0.6, 2.0),
                coef=0.1, temp=1.0):
    """Trinity ``RECPolicyLossFn`` then ``masked_mean`` (token mean, +1e-8): ratio = exp(logp - old) detached;
    in-range mask per clip mode; the advantage times sg(ratio) (IS) or exp(A/temp) (advantage);
    ``-A' * logp * in_range``, minus ``coef*logp`` (forward-kl) or plus ``coef*(logp - old)^2`` (k2)."""
    ratio = (logp - old).exp().detach()
    inside = (ratio >= 1 - eps) & (ratio <= 1 + eps)
    in_range = {"none": torch.ones_like(inside),
                "one_side": ((adv_BT >= 0) & (ratio <= 1 + eps)) | ((adv_BT <= 0) & (ratio >= 1 - eps)),
                "two_side": inside,
                "ring": inside | ((adv_BT >= 0) & (ratio <= 1 - eps_prime[0]))
                | ((adv_BT <= 0) & (ratio >= 1 + eps_prime[1]))}[clip_mode]
    adv_w = {"none": adv_BT, "importance_sampling": adv_BT * ratio,
             "advantage": adv_BT * torch.exp(adv_BT / temp)}[weight]
    loss = -adv_w * logp * in_range
    loss = {"none": loss, "forward_kl": loss - coef * logp, "k2": loss + coef * (logp - old) ** 2}[regularizer]
    m = mask.to(loss.dtype)
    return (loss * m).sum() / (m.sum() + 1e-8), in_range


def trinity_group_baseline(rewards, ids, baseline, tau=1.0, shift=-0.1):
    """Trinity ``opmd`` / ``asymre`` advantages: ``r - b`` with b = mean, ``tau*(logsumexp(r/tau) - log n)``
    or ``mean + shift``; a group of one has b = 0 (no shift)."""
    def fn(r):
        if r.numel() == 1:
            return r
        b = {"mean": r.mean(), "logavgexp": tau * (torch.logsumexp(r / tau, 0) - torch.log(torch.tensor(
            float(r.numel()), dtype=r.dtype))), "asymre": r.mean() + shift}[baseline]
        return r - b
    return per_group(rewards, ids, fn)


def trinity_rec_advantage(rewards, ids, keep, std_normalize):
    """Trinity ``RECGroupedAdvantage`` given the kept samples: mean and *population* std over the kept ones
    (one kept or fewer: 0 and 1), ``r - mean`` or ``(r - mean) / (std + 1e-6)``; dropped samples get 0."""
    out = torch.zeros_like(rewards)
    for g in ids.unique():
        sel = (ids == g) & keep
        r = rewards[sel]
        mean, std = (r.mean(), r.std(unbiased=False)) if r.numel() > 1 else (0.0, 1.0)
        out[sel] = (r - mean) / (std + 1e-6) if std_normalize else r - mean
    return out


# --- aggregation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_aggregation_matches_verl(shape, name):
    logp, _, _, mask = batch(shape, seed=10)
    ours, theirs = AGGREGATIONS[name](logp, mask), verl_agg(logp, mask, AGG_MODES[name])
    close(ours, theirs)
    close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])


@pytest.mark.parametrize("name", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_sequence_means_vs_trinity_count_every_row(name):
    # Trinity ``masked_loss``: the per-row token mean (count + 1e-8) or sum, then ``.mean()`` over *all*
    # rows, the fully masked one included: ours * (rows with a token) / (all rows) == Trinity's.
    logp, _, _, mask = batch((4, 7), seed=12)
    m = mask.to(F64)
    per_row = (logp * m).sum(-1) / ((m.sum(-1) + 1e-8) if name == "seq_mean_token_mean" else 1.0)
    rows = (mask.sum(-1) > 0).sum()
    assert rows == 3
    close(AGGREGATIONS[name](logp, mask) * rows / 4, per_row.mean())


@pytest.mark.parametrize("shape", SHAPES)
def test_dr_grpo_normaliser_is_verl_over_num_seqs(shape):
    # verl's seq-mean-token-sum-norm is sum(m*l) / T; ours also divides by the number of sequences
    # (rows with a trainable token): ours * num_seqs == verl, for the default T and for a constant 64.
    logp, _, _, mask = batch(shape, seed=11)
    num_seqs = (mask.sum(-1) > 0).sum()
    for max_len in (None, 64):
        params = {} if max_len is None else {"max_len": max_len}
        ours = AGGREGATIONS["seq_mean_token_sum_norm"](logp, mask, **params)
        close(ours * num_seqs, verl_agg(logp, mask, "seq-mean-token-sum-norm", scale=max_len))
    if shape[0] > 1:
        assert num_seqs < shape[0]  # the fully masked row is not counted


# --- verl policy losses -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_dual_clip_matches_verl_vanilla(shape, seed):
    logp, old, adv, mask = batch(shape, seed, lr_scale=0.9)
    adv_BT = adv[:, None].expand_as(logp)
    out = POLICY_LOSSES["ppo_clip"](logp, LossInputs(adv, mask, old_logp=old), eps_low=0.2, eps_high=0.28,
                                    dual_clip=3.0)
    ref, clipfrac_BT, lower_BT = verl_ppo_vanilla(logp, old, adv_BT, 0.2, 0.28)
    close(out.loss_BT, ref * mask)
    ours, theirs = AGGREGATIONS["token_mean"](out.loss_BT, mask), verl_agg(ref, mask, "token-mean")
    close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])
    frac = lambda f: (f & mask.bool()).sum() / mask.sum()  # noqa: E731
    close(out.stats["clip_high_frac"] + out.stats["clip_low_frac"], frac(clipfrac_BT).float())
    close(out.stats["dual_clip_frac"], frac(lower_BT).float())


def test_ppo_dual_clip_sample_covers_every_regime():
    # the random batches above are not vacuous: the largest one hits both clips and the dual clip
    logp, old, adv, mask = batch(SHAPES[-1], 0, lr_scale=0.9)
    out = POLICY_LOSSES["ppo_clip"](logp, LossInputs(adv, mask, old_logp=old), eps_high=0.28, dual_clip=3.0)
    for key in ("clip_high_frac", "clip_low_frac", "dual_clip_frac"):
        assert out.stats[key] > 0, key
    assert out.stats["clip_frac"] < 0.9


@pytest.mark.parametrize("shape", SHAPES)
def test_gspo_matches_verl(shape):
    logp, old, adv, mask = batch(shape, seed=4, lr_scale=0.1)
    old = old.clone()
    old[0] = logp[0].detach() - 11.0  # the first sequence is past the cap (mean log-ratio 11 > 10)
    adv[0] = -abs(adv[0]) - 0.5  # with A < 0 the ratio is not clipped: only the cap stops its gradient
    adv_BT = adv[:, None].expand_as(logp)
    out = POLICY_LOSSES["gspo"](logp, LossInputs(adv, mask, old_logp=old), eps_low=0.01, eps_high=0.01)
    ref = verl_gspo(logp, old, adv_BT, mask, 0.01, 0.01)
    close(out.loss_BT, ref * mask, rtol=1e-7)
    ours = AGGREGATIONS["seq_mean_token_mean"](out.loss_BT, mask)
    theirs = verl_agg(ref, mask, "seq-mean-token-mean")
    close(ours, theirs, rtol=1e-7)
    g_ours, g_theirs = torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0]
    close(g_ours, g_theirs)
    assert (g_ours[0] == 0).all() and out.stats["seq_cap_frac"] > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps_low", [1.0, 0.2])
def test_cispo_matches_verl(shape, eps_low):
    logp, old, adv, mask = batch(shape, seed=5)
    out = POLICY_LOSSES["cispo"](logp, LossInputs(adv, mask, old_logp=old), eps_low=eps_low, eps_high=0.28)
    ref, clipped_BT = verl_cispo(logp, old, adv[:, None].expand_as(logp), eps_low, 0.28)
    close(out.loss_BT, ref * mask)
    ours, theirs = AGGREGATIONS["token_mean"](out.loss_BT, mask), verl_agg(ref, mask, "token-mean")
    close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])
    frac = (clipped_BT & mask.bool()).sum() / mask.sum()
    close(out.stats["trunc_high_frac"] + out.stats["trunc_low_frac"], frac.float())


@pytest.mark.parametrize("shape", [(4, 7), (16, 33)])
def test_clip_cov_matches_verl(shape):
    logp, old, adv, mask = batch(shape, seed=6, adv_scale=2.0)
    logp = (logp * 2).detach().requires_grad_(True)  # spread logp so that many covariances land in (1, 5)
    adv_BT = adv[:, None].expand_as(logp)
    cand, ref = verl_clip_cov_candidates(logp, old, adv_BT, mask, 0.2, 1.0, 5.0)
    assert cand.any()
    # cov_ratio = 1 cuts every candidate (verl: min(int(#mask), #candidates)): the loss is deterministic
    out = POLICY_LOSSES["sil"](logp, LossInputs(adv, mask, old_logp=old), ratio_to="old", cov_ratio=1.0)
    close(out.loss_BT, torch.where(cand, 0.0, ref) * mask)
    ours = AGGREGATIONS["token_mean"](out.loss_BT, mask)
    theirs = verl_agg(torch.where(cand, 0.0, ref), mask, "token-mean")
    close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])
    # a small ratio cuts max(int(ratio * #mask), 1) of the candidates, chosen at random
    clipped = ref.detach() > (-adv_BT * (logp - old).exp()).detach()
    for ratio in (0.02, 0.2):
        cut = clip_cov_mask(logp, adv_BT, mask, clipped & mask.bool(), cov_ratio=ratio,
                            generator=torch.Generator().manual_seed(0))
        assert not (cut & ~cand).any()
        assert cut.sum() == min(max(int(ratio * mask.sum()), 1), int(cand.sum()))


@pytest.mark.parametrize("name", ["k1", "k2", "low_var_kl"])
def test_kl_estimators_match_verl(name):
    gen = torch.Generator().manual_seed(7)
    logp = torch.randn(8, 50, generator=gen, dtype=F64) * 4
    ref = torch.randn(8, 50, generator=gen, dtype=F64) * 4
    close(KL_ESTIMATORS[name](logp, ref), verl_kl(logp, ref, name))


def test_k3_is_verl_k3_without_its_clamp():
    # verl's "k3" is its low_var_kl (clamped to [-10, 10]); our k3 is the plain estimator. Hand values:
    # delta = logp - ref = -3: exp(3) - 1 - 3 = 16.0855 (verl 10); delta = 25: exp(-25) - 1 + 25 = 24.0 (verl:
    # delta clamped to 20 -> 19 -> 10); delta = 0.5: exp(-0.5) - 1 + 0.5 = 0.106531 (both).
    logp, ref = torch.tensor([-3.0, 25.0, 0.5], dtype=F64), torch.zeros(3, dtype=F64)
    close(KL_ESTIMATORS["k3"](logp, ref), [16.085537, 24.0, 0.106531])
    close(verl_kl(logp, ref, "k3"), [10.0, 10.0, 0.106531])
    close(KL_ESTIMATORS["low_var_kl"](logp, ref), verl_kl(logp, ref, "k3"))
    gen = torch.Generator().manual_seed(8)
    logp, ref = torch.randn(200, generator=gen, dtype=F64) * 3, torch.zeros(200, dtype=F64)
    ours, theirs = KL_ESTIMATORS["k3"](logp, ref), verl_kl(logp, ref, "k3")
    inside = ours.abs() < 10
    assert (~inside).any() and inside.any()
    close(ours[inside], theirs[inside])
    assert (ours[~inside] > theirs[~inside]).all()


# --- advantages ---------------------------------------------------------------------------------------

def groups(seed, binary):
    """Rewards in unsorted, non-contiguous groups of sizes 1 (twice), 2, 5 and 8, some with equal rewards."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {17: 1, 3: 5, 42: 2, 9: 8, 5: 1}
    ids = torch.tensor([g for g, n in sizes.items() for _ in range(n)])
    ids = ids[torch.randperm(len(ids), generator=gen)]
    rewards = torch.randn(len(ids), generator=gen, dtype=F64)
    rewards = (rewards > 0).to(F64) if binary else rewards
    rewards[ids == 42] = 0.7  # a group with zero spread
    return rewards, ids


@pytest.mark.parametrize("seed,binary", [(0, True), (1, False), (2, True)])
def test_group_advantages_match_verl(seed, binary):
    rewards, ids = groups(seed, binary)
    close(ADVANTAGES["grpo"](rewards, ids), verl_grpo(rewards, ids))
    close(ADVANTAGES["group_mean"](rewards, ids), verl_grpo(rewards, ids, norm_by_std=False))
    close(ADVANTAGES["rloo"](rewards, ids), verl_rloo(rewards, ids))


@pytest.mark.parametrize("seed,binary", [(0, True), (1, False)])
def test_opmd_baselines_match_trinity(seed, binary):
    rewards, ids = groups(seed, binary)
    close(ADVANTAGES["opmd_baseline"](rewards, ids), trinity_group_baseline(rewards, ids, "mean"))
    for tau in (1.0, 0.5):
        close(ADVANTAGES["opmd_baseline"](rewards, ids, baseline="logavgexp", tau=tau),
              trinity_group_baseline(rewards, ids, "logavgexp", tau=tau))


def test_asymre_advantage_matches_trinity_except_groups_of_one():
    # Trinity's asymre advantage gives a group of one baseline 0 with no shift (A = r); ours keeps the
    # shift (A = r - shift = r + 0.1), as the forward-KL form of the REC code does for every sample.
    rewards, ids = groups(3, False)
    ours, theirs = ADVANTAGES["asymre"](rewards, ids), trinity_group_baseline(rewards, ids, "asymre")
    single = (ids == 17) | (ids == 5)
    close(ours[~single], theirs[~single])
    close(ours[single] - theirs[single], torch.full((2,), 0.1, dtype=F64))


@pytest.mark.parametrize("seed", [0, 4, 5])  # seeds whose groups have surplus negatives
def test_rec_and_red_drop_advantages_match_trinity(seed):
    # Trinity's REC advantage (std_normalize False / True = population std), with RED-Drop given the same
    # kept samples (the choice among surplus negatives is random in both; the kept set fixes the rest).
    rewards, ids = groups(seed, True)
    multi = (ids != 17) & (ids != 5)  # Trinity's REC advantage does not handle a group of one (see docs)
    everyone = torch.ones_like(ids, dtype=torch.bool)
    close(ADVANTAGES["group_mean"](rewards, ids)[multi], trinity_rec_advantage(rewards, ids, everyone, False)[multi])
    close(ADVANTAGES["grpo"](rewards, ids, unbiased_std=False)[multi],
          trinity_rec_advantage(rewards, ids, everyone, True)[multi])
    keep = red_drop_keep_seeded(rewards, ids, seed)
    assert (~keep).any()
    ours = ADVANTAGES["group_mean"](rewards, ids, drop="balance", generator=torch.Generator().manual_seed(seed))
    close(ours[multi], trinity_rec_advantage(rewards, ids, keep, False)[multi])


def red_drop_keep_seeded(rewards, ids, seed):
    """Our RED-Drop kept set, checked against Trinity's rule: only negatives (r < mean) are dropped, exactly
    ``max(#neg - #pos, 0)`` of them per group."""
    keep = red_drop_keep(rewards, ids, torch.Generator().manual_seed(seed))
    for g in ids.unique():
        sel = ids == g
        r = rewards[sel]
        neg = r < r.mean()
        assert not (~keep[sel] & ~neg).any()
        assert (~keep[sel]).sum() == max(int(neg.sum()) - int((~neg).sum()), 0)
    return keep


# --- Trinity REC family -------------------------------------------------------------------------------

REC_COMBOS = list(itertools.product(["none", "one_side", "two_side", "ring"],
                                    ["none", "importance_sampling", "advantage"],
                                    ["none", "forward_kl", "k2"]))


@pytest.mark.parametrize("clip_mode,weight,regularizer", REC_COMBOS)
def test_rec_matches_trinity(clip_mode, weight, regularizer):
    for shape, seed in zip(SHAPES, (20, 21, 22)):
        logp, behav, adv, mask = batch(shape, seed, lr_scale=0.9)
        out = POLICY_LOSSES["rec"](logp, LossInputs(adv, mask, behav_logp=behav), clip_mode=clip_mode,
                                   weight=weight, regularizer=regularizer, reg_coef=0.1, eps_low=0.2,
                                   eps_high=0.2, eps_low_outer=0.6, eps_high_outer=2.0, temp=1.0)
        ours = AGGREGATIONS["token_mean"](out.loss_BT, mask)
        theirs, in_range = trinity_rec(logp, behav, adv[:, None].expand_as(logp), mask, clip_mode, weight,
                                       regularizer)
        close(ours, theirs)
        close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])
        close(out.stats["clip_frac"], ((~in_range & mask.bool()).sum() / mask.sum()).float())


def test_rec_sample_covers_every_mask_region():
    # ratios of the largest batch fall in the ring's outer parts, inside the window and in between
    logp, behav, adv, mask = batch(SHAPES[-1], 22, lr_scale=0.9)
    rho = (logp - behav).exp()[mask.bool()]
    for region in (rho <= 0.4, (rho > 0.4) & (rho < 0.8), (rho >= 0.8) & (rho <= 1.2), (rho > 1.2) & (rho < 3),
                   rho >= 3):
        assert region.any()


def test_opmd_legacy_matches_trinity():
    # Trinity OPMDPolicyLossFn: masked_mean(-A * logp) / (1 + tau), tau = 1
    logp, _, adv, mask = batch((16, 33), 23)
    out = POLICY_LOSSES["opmd_legacy"](logp, LossInputs(adv, mask), tau=1.0)
    m = mask.to(F64)
    theirs = (-adv[:, None] * logp * m).sum() / (m.sum() + 1e-8) / 2.0
    ours = AGGREGATIONS["token_mean"](out.loss_BT, mask)
    close(ours, theirs)
    close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0])
