"""PPO-style losses (docs/algorithms.md, "PPO-style losses"): hand values for ppo_clip, dual clip, GSPO, CISPO,
decoupled PPO, SFT, REINFORCE and OPMD-legacy."""

import math

import pytest
import torch

from offpolicy.algos import AGGREGATIONS, POLICY_LOSSES, LossInputs

F64 = torch.float64


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def run(name, rho, adv, denom="old_logp", **params):
    """Per-token loss and d(sum loss)/d logp at logp = log(rho), denominator 0."""
    rho = torch.as_tensor(rho, dtype=F64)
    logp = rho.log().clone().requires_grad_(True)
    inputs = LossInputs(adv=torch.as_tensor(adv, dtype=F64), mask=torch.ones_like(rho),
                        **{denom: torch.zeros_like(rho)})
    out = POLICY_LOSSES[name](logp, inputs, **params)
    out.loss_BT.sum().backward()
    return out, logp.grad


def test_ppo_clip_hand():
    rho = [[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]]
    out, g = run("ppo_clip", rho, [1.0, -1.0])
    # A=+1: -min(rho, clip(rho, .8, 1.2)) = -[.5, .9, 1.1, 1.2]; A=-1: max(rho, clip) = [.8, .9, 1.1, 1.5]
    close(out.loss_BT, [[-0.5, -0.9, -1.1, -1.2], [0.8, 0.9, 1.1, 1.5]])
    # gradient -A * rho * 1[not clipped]
    close(g, [[-0.5, -0.9, -1.1, 0.0], [0.0, 0.9, 1.1, 1.5]])
    close(out.stats["clip_frac"], 2 / 8)
    close(out.stats["clip_high_frac"], 1 / 8)
    close(out.stats["clip_low_frac"], 1 / 8)
    close(out.stats["ratio_mean"], (0.5 + 0.9 + 1.1 + 1.5) / 4)
    close(out.stats["ratio_min"], 0.5)
    close(out.stats["ratio_max"], 1.5)
    assert out.stats["ratio_is_one"] == 0


def test_ppo_clip_asymmetric_and_bypass():
    # DAPO clip-higher: upper bound 1.28, so rho 1.25 is not clipped for A > 0
    out, g = run("ppo_clip", [[1.25, 1.3]], [2.0], eps_high=0.28)
    close(out.loss_BT, [[-2 * 1.25, -2 * 1.28]])
    close(g, [[-2 * 1.25, 0.0]])
    out, _ = run("ppo_clip", [[1.25]], [1.0], denom="behav_logp", ratio_to="behav")
    close(out.loss_BT, [[-1.2]])
    with pytest.raises(ValueError, match="old_logp"):
        run("ppo_clip", [[1.0]], [1.0], denom="behav_logp")


def test_ppo_dual_clip_hand():
    # A = -1, c = 3: loss = min(max(rho, clip(rho)), 3) -> rho 4 capped at 3 (no grad), rho 2 kept
    out, g = run("ppo_clip", [[4.0, 2.0, 0.5]], [-1.0], dual_clip=3.0)
    close(out.loss_BT, [[3.0, 2.0, 0.8]])
    close(g, [[0.0, 2.0, 0.0]])
    close(out.stats["dual_clip_frac"], 1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        run("ppo_clip", [[1.0]], [1.0], dual_clip=0.5)


def test_ratio_is_one_on_policy():
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64)
    out = POLICY_LOSSES["ppo_clip"](logp, LossInputs(torch.ones(1, dtype=F64), torch.ones(1, 2), old_logp=logp))
    assert out.stats["ratio_is_one"] == 1 and out.stats["clip_frac"] == 0


def test_gspo_hand():
    # log-ratios [0.1, -0.3, 0.5]: mean 0.1, s = e^0.1 = 1.10517 (> 1 + 4e-4)
    rho = torch.tensor([[0.1, -0.3, 0.5], [0.1, -0.3, 0.5]], dtype=F64).exp()
    out, g = run("gspo", rho, [1.0, -1.0])
    s = math.exp(0.1)
    # A = +1: clipped at 1.0004 on every token, no gradient; A = -1: loss s on every token, grad s
    close(out.loss_BT, [[-1.0004] * 3, [s] * 3])
    close(g, [[0.0] * 3, [s] * 3])


def test_gspo_token_form_matches_sequence_gradient():
    gen = torch.Generator().manual_seed(7)
    B, T = 6, 5
    logp = (-torch.rand(B, T, generator=gen, dtype=F64)).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=gen, dtype=F64)
    adv = torch.randn(B, generator=gen, dtype=F64)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    eps = 0.01
    out = POLICY_LOSSES["gspo"](logp, LossInputs(adv, mask, old_logp=old), eps_low=eps, eps_high=eps)
    (g_tok,) = torch.autograd.grad(AGGREGATIONS["seq_mean_token_mean"](out.loss_BT, mask), logp)
    # sequence form: s_i = exp(mean_t (logp - old)), loss_i = -min(s A, clip(s) A), mean over i
    s = ((logp - old) * mask).sum(-1).div(mask.sum(-1)).exp()
    seq = torch.maximum(-adv * s, -adv * s.clamp(1 - eps, 1 + eps)).mean()
    (g_seq,) = torch.autograd.grad(seq, logp)
    assert out.stats["clip_frac"] > 0 and out.stats["clip_frac"] < 1
    close(g_tok, g_seq, atol=1e-12)


def test_cispo_hand():
    # w = sg(clip(rho, 0, 1.28)): rho 0.5 -> 0.5, rho 1.5 -> 1.28; loss = -w * A * logp
    out, g = run("cispo", [[0.5, 1.5]], [2.0])
    close(out.loss_BT, [[-0.5 * 2 * math.log(0.5), -1.28 * 2 * math.log(1.5)]])
    close(g, [[-1.0, -2.56]])
    close(out.stats["trunc_high_frac"], 0.5)


def test_decoupled_ppo_hand():
    # behaviour weight exp(old - behav) = [5, 2] -> truncate at 3: [3, 2]; ratio vs old = [1.1, 1.5]
    logp = torch.tensor([[math.log(1.1), math.log(1.5)]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=F64)
    behav = -torch.tensor([[math.log(5.0), math.log(2.0)]], dtype=F64)
    inputs = LossInputs(torch.ones(1, dtype=F64), torch.ones(1, 2), old_logp=old, behav_logp=behav)
    out = POLICY_LOSSES["decoupled_ppo"](logp, inputs)
    # A = +1: ppo term -[1.1, 1.2]; times [3, 2]
    close(out.loss_BT, [[-3.3, -2.4]])
    close(torch.autograd.grad(out.loss_BT.sum(), logp)[0], [[-3.3, 0.0]])
    close(out.stats["behav_weight_truncate_frac"], 0.5)
    out = POLICY_LOSSES["decoupled_ppo"](logp, inputs, mode="mask")
    close(out.loss_BT, [[0.0, -2.4]])
    # sequence level: exp(log 5 + log 2) = 10 > 3 -> truncate 3 on both tokens
    out = POLICY_LOSSES["decoupled_ppo"](logp, inputs, level="sequence")
    close(out.loss_BT, [[-3.3, -3.6]])
    # cap above the weight: plain weighted PPO, weight 2 * 5... (sequence weight 10, cap 20)
    out = POLICY_LOSSES["decoupled_ppo"](logp, inputs, level="sequence", cap=20.0)
    close(out.loss_BT, [[-11.0, -12.0]])


def test_decoupled_ppo_at_zero_staleness_is_ppo():
    gen = torch.Generator().manual_seed(8)
    logp = -torch.rand(3, 4, generator=gen, dtype=F64)
    old = logp + 0.3 * torch.randn(3, 4, generator=gen, dtype=F64)
    inputs = LossInputs(torch.randn(3, generator=gen, dtype=F64), torch.ones(3, 4), old_logp=old, behav_logp=old)
    close(POLICY_LOSSES["decoupled_ppo"](logp, inputs).loss_BT, POLICY_LOSSES["ppo_clip"](logp, inputs).loss_BT)


def test_sft_reinforce_opmd_legacy_hand():
    logp = torch.tensor([[-0.5, -2.0]], dtype=F64)
    inputs = LossInputs(torch.tensor([3.0], dtype=F64), torch.ones(1, 2))
    close(POLICY_LOSSES["sft"](logp, inputs).loss_BT, [[0.5, 2.0]])
    close(POLICY_LOSSES["reinforce"](logp, inputs).loss_BT, [[1.5, 6.0]])
    # -A logp / (1 + tau), tau = 1
    close(POLICY_LOSSES["opmd_legacy"](logp, inputs).loss_BT, [[0.75, 3.0]])


def test_token_level_advantages_accepted():
    logp = torch.tensor([[-0.5, -2.0]], dtype=F64)
    adv_BT = torch.tensor([[1.0, -2.0]], dtype=F64)
    close(POLICY_LOSSES["reinforce"](logp, LossInputs(adv_BT, torch.ones(1, 2))).loss_BT, [[0.5, -4.0]])


def test_gspo_sequence_past_cap_gets_no_gradient():
    # verl clamps the whole token log-ratio logp - sg(logp) + sg(seq_lr) at 10.
    # seq 0: log-ratios [11, 11], mean 11 > 10 -> value e^10 on both tokens, gradient exactly 0
    #        (capping only the detached term would leave a gradient e^10 * |A| = 22026 per token);
    # seq 1: log-ratios [0.3, -0.1], mean 0.1 -> s = e^0.1 > 1 + 4e-4, A = -2 is not clipped:
    #        loss -A*s = 2s per token, d/dlogp_t = 2s.
    rho = torch.tensor([[11.0, 11.0], [0.3, -0.1]], dtype=F64).exp()
    out, g = run("gspo", rho, [-1.0, -2.0])
    s = math.exp(0.1)
    close(out.loss_BT, [[math.exp(10.0)] * 2, [2 * s] * 2], atol=1e-9)
    close(g, [[0.0, 0.0], [2 * s, 2 * s]], atol=1e-12)
    close(out.stats["seq_cap_frac"], 0.5)
    close(out.stats["ratio_max"], math.exp(10.0), atol=1e-6)


def test_gspo_cap_with_positive_advantage_and_padding():
    # A = +1 past the cap: clipped at 1 + 4e-4 anyway (value -1.0004, no gradient); the padded position
    # holds junk (inf) and stays out of the sequence mean: log-ratios [12, 12 | pad] -> mean 12, not 8.
    logp = torch.tensor([[12.0, 12.0, float("inf")]], dtype=F64, requires_grad=True)
    inputs = LossInputs(torch.tensor([1.0], dtype=F64), torch.tensor([[1, 1, 0]]),
                        old_logp=torch.zeros(1, 3, dtype=F64))
    out = POLICY_LOSSES["gspo"](logp, inputs)
    close(out.loss_BT, [[-1.0004, -1.0004, 0.0]])
    close(torch.autograd.grad(out.loss_BT.sum(), logp)[0], [[0.0, 0.0, 0.0]])
    close(out.stats["seq_cap_frac"], 1.0)
