"""Every preset trains through the same pipeline step, and its characteristic quantity after one step
equals a value this test computes on its own (from the trainer's log-probs at the step start and the
batch's behaviour log-probs, with the formulas restated here); after the step, the preset's own loss
on the same batch is lower.

The batch is made stale on purpose: its behaviour log-probs are the engine's plus seeded noise, so
ratios are away from 1 and clip / weight statistics are not trivially 0 or 1. PPO-style presets take
pi_old = behav_logp (``train.old_logp=behav``, the sampling policy); decoupled PPO and ReMix read the
step-start policy as their proximal / centre policy.
"""

import copy
import math

import pytest
import torch

from offpolicy.algos import POLICY_LOSSES, PRESETS, LossInputs
from offpolicy.config import ConfigError, load_config
from offpolicy.data.experience import collate
from offpolicy.pipeline.context import build_context
from offpolicy.pipeline.explorer import Explorer
from offpolicy.pipeline.sync import run_sync
from offpolicy.train.metrics import read_metrics
from offpolicy.train.step import response_logp, step_logprobs, train_step

TINY = ["train.steps=2", "eval.every=0", "tasks.eval_size=8", "rollout.prompts_per_step=8", "rollout.group_size=4",
        "run.progress=false", "run.loggers=[]", "run.save_final=false", "train.lr=1e-3"]
OFF = ["algorithm.tool_reward.enabled=false"]  # spear's tool-call reward needs a multi-turn workflow


def _group_stats(r, g):
    mean = torch.stack([r[g == x].mean() for x in g])
    std = torch.stack([r[g == x].std() for x in g])
    n = torch.stack([(g == x).sum() for x in g]).float()
    return mean, std, n


def _adv(kind, r, g):
    mean, std, n = _group_stats(r, g)
    if kind == "grpo":
        return (r - mean) / (std + 1e-6)
    if kind == "rloo":
        return r - (mean * n - r) / (n - 1)
    return r - mean


def _token_mean(x, m):
    return float((x * m).sum() / m.sum())


def _frac(flag, m):
    return float((flag.float() * m).sum() / m.sum())


def _ppo_clip_frac(r, A, el, eh, dual=3.0):
    return ((A > 0) & (r > 1 + eh)) | ((A < 0) & (r < 1 - el)) | ((A < 0) & (torch.maximum(r, r.clamp(1 - el, 1 + eh)) > dual))


def _rec_dropped(r, A, mode):
    pos, neg = A >= 0, A <= 0
    if mode == "one_side":
        return ~((pos & (r <= 1.2)) | (neg & (r >= 0.8)))
    inside = (r >= 0.8) & (r <= 1.2)
    if mode == "two_side":
        return ~inside
    return ~(inside | (pos & (r <= 0.4)) | (neg & (r >= 3.0)))  # ring, eps' = (0.6, 2.0)


def _bapo_bounds(r, A, m, rho0=0.4):
    lo, hi = 0.6, 1.2
    while True:
        eff = m * A * torch.where(A >= 0, torch.minimum(r, torch.tensor(hi)), torch.maximum(r, torch.tensor(lo)))
        pos, neg = eff.clamp(min=0).sum(), (-eff).clamp(min=0).sum()
        if pos / (pos + neg) >= rho0 or lo + 0.02 > 0.9 + 1e-9:
            return lo, hi
        if hi + 0.05 <= 3.0 + 1e-9:
            hi += 0.05
        else:
            lo += 0.02


def expected(preset, logp, behav, m, A_kind, rewards, groups):
    """(metric key, value) of the preset's characteristic quantity, computed here."""
    A = _adv(A_kind, rewards, groups)[:, None].expand_as(logp)
    r_behav = torch.exp(logp - behav)
    if preset in ("grpo", "dr_grpo"):
        return "loss/clip_frac", _frac(_ppo_clip_frac(r_behav, A, 0.2, 0.2), m)
    if preset == "dapo":
        return "loss/clip_frac", _frac(_ppo_clip_frac(r_behav, A, 0.2, 0.28), m)
    if preset == "cispo":
        return "loss/trunc_high_frac", _frac(r_behav > 1.28, m)
    if preset == "gspo":
        seq = torch.exp(((logp - behav) * m).sum(-1) / m.sum(-1).clamp(min=1))[:, None].expand_as(logp)
        return "loss/clip_frac", _frac(((A > 0) & (seq > 1 + 4e-4)) | ((A < 0) & (seq < 1 - 3e-4)), m)
    if preset.startswith("rec_"):
        mode = {"rec_oneside_nois": "one_side", "rec_oneside_is": "one_side", "rec_twoside_is": "two_side",
                "rec_ring_nois": "ring"}[preset]
        return "loss/clip_frac", _frac(_rec_dropped(r_behav, A, mode), m)
    if preset == "reinforce":
        return "loss", _token_mean(-A * logp, m)
    if preset == "rloo":  # seq_mean_token_sum over the rows with a trainable token
        return "loss", float((-A * logp * m).sum() / (m.sum(-1) > 0).sum())
    if preset == "asymre":
        return "loss", _token_mean(-A * logp - 0.1 * logp, m)
    if preset == "opmd":
        return "loss", _token_mean(-A * logp + 0.1 * (logp - behav) ** 2, m)
    if preset == "red_weight":
        return "loss", _token_mean(-torch.exp(A) * A * logp, m)
    if preset == "red_drop":  # binary rewards: whichever surplus negatives are dropped, |A| is the same
        keep = torch.ones_like(rewards, dtype=torch.bool)
        for x in groups.unique():
            idx = (groups == x).nonzero().flatten()
            pos, neg = idx[rewards[idx] >= rewards[idx].mean()], idx[rewards[idx] < rewards[idx].mean()]
            keep[neg[: max(len(neg) - len(pos), 0)]] = False
        adv = torch.zeros_like(rewards)
        for x in groups.unique():
            k = (groups == x) & keep
            adv[k] = rewards[k] - rewards[k].mean()
        return "adv_abs_mean", float(adv.abs().mean())
    if preset == "decoupled_ppo":  # the behaviour weight exp(old - behav), old = the step-start policy
        return "loss/behav_weight_mean", _token_mean(r_behav, m)
    if preset == "bapo":
        return "loss/bapo_c_high", _bapo_bounds(r_behav, A, m)[1]
    if preset == "remix":  # the clip centre pi_k / pi_{k-i}, pi_k = the step-start policy
        return "loss/center_mean", _token_mean(r_behav, m)
    if preset == "spear":  # Clip-Cov removes max(floor(2e-4 n), 1) of its candidates (or all, if fewer)
        n = m.sum()
        mean_A, mean_lp = (A * m).sum() / n, (logp * m).sum() / n
        cov = (A - mean_A) * (logp - mean_lp)
        clipped = ((A > 0) & (r_behav > 1.2)) | ((A < 0) & (r_behav < 0.8))  # ratio_to=old = behav here
        cand = (m > 0) & ~clipped & (cov > 1.0) & (cov < 5.0)
        return "loss/clip_cov_frac", float(min(int(cand.sum()), max(int(math.floor(2e-4 * n)), 1)) / n)
    raise KeyError(preset)


OLD_IS_BEHAV = {"grpo", "dr_grpo", "dapo", "cispo", "gspo", "bapo", "spear"}
# presets that train on preference pairs (tasks.name=pairs) are tested in tests/e2e/test_dpo_run.py
RL_PRESETS = sorted(n for n, p in PRESETS.items() if not getattr(POLICY_LOSSES[p.loss[0]], "pairwise", False))


@pytest.fixture(scope="module")
def stale_batch(tmp_path_factory):
    """One batch from the bundled model, its behaviour log-probs shifted by seeded noise."""
    cfg = load_config(None, [*TINY, f"run.dir={tmp_path_factory.mktemp('b')}"])
    ctx = build_context(cfg)
    explorer = Explorer.from_context(ctx)
    try:
        exps, _ = explorer.explore(0, version=0)
    finally:
        explorer.close()
    g = torch.Generator().manual_seed(0)
    for e in exps:
        e.behav_logp = e.behav_logp + 0.4 * torch.randn(len(e.behav_logp), generator=g)
    return exps


@pytest.mark.parametrize("preset", RL_PRESETS)
def test_preset_quantity_after_one_step_and_its_loss_goes_down(preset, stale_batch, tmp_path):
    extra = ["train.old_logp=behav"] if preset in OLD_IS_BEHAV else []
    cfg = load_config(None, [*TINY, *OFF, *extra, f"algorithm.preset={preset}", f"run.dir={tmp_path}",
                             "train.updates_per_batch=1", "algorithm.kl_coef=0"])
    ctx = build_context(cfg)
    batch = collate(stale_batch, ctx.tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        logp = response_logp(ctx.model, batch)[0]
    A_kind = PRESETS[preset].advantage[0]
    key, value = expected(preset, logp, batch.behav_logp_BT, batch.mask_BT, A_kind, batch.rewards_B, batch.group_ids_B)

    is_weighted = PRESETS[preset].loss[1].get("weight") == "importance_sampling"

    def loss_now() -> float:  # the preset's own loss on this batch, pi_old / centre fixed at the step start
        with torch.no_grad():
            lp = response_logp(ctx.model, batch)[0]
            if is_weighted:  # -sg(rho) A logp has the gradient of -A rho (kept tokens): that is what descends
                keep = ~_rec_dropped(torch.exp(logp - batch.behav_logp_BT), adv[:, None].expand_as(lp),
                                     PRESETS[preset].loss[1]["clip_mode"])
                return _token_mean(-keep.float() * adv[:, None] * torch.exp(lp - batch.behav_logp_BT), batch.mask_BT)
            inputs = LossInputs(adv=adv, mask=batch.mask_BT,
                                behav_logp=batch.behav_logp_BT, **start, **{k: logp for k in ("old_logp", "center_logp")
                                                                           if getattr(ctx.plan, k) == "current"})
            torch.manual_seed(0)
            return float(ctx.algo.agg_fn(ctx.algo.loss_fn(lp, inputs).loss_BT, batch.mask_BT))

    start = step_logprobs(ctx.model, batch, ctx.plan)
    torch.manual_seed(0)
    adv = ctx.algo.adv_fn(batch.rewards_B, batch.group_ids_B)  # RED-Drop's draw: the one train_step makes
    before = loss_now()
    torch.manual_seed(0)
    # a small plain gradient step is a descent step (small enough that hardly a token crosses a clip bound,
    # which would make the loss jump: masks and weights are functions of the ratio)
    sgd = torch.optim.SGD(ctx.model.parameters(), lr=0.001)
    stats = train_step(ctx.model, sgd, batch, ctx.algo, ctx.plan, ref_model=ctx.ref_model, step=1)
    assert stats[key] == pytest.approx(value, abs=1e-5), key
    if key.endswith("frac") and preset not in ("red_drop",):
        assert 0 < value < 1 or preset == "spear", f"{key}={value}: the stale batch should make it non-trivial"
    assert loss_now() < before


def test_every_preset_runs_in_the_pipeline(tmp_path):
    """Two sync steps per preset through run_sync; the step rows carry the preset's metrics."""
    for preset in RL_PRESETS:
        run_sync(load_config(None, [*TINY, *OFF, f"algorithm.preset={preset}", f"run.dir={tmp_path / preset}",
                                    "tasks.eval_size=4", "rollout.prompts_per_step=4"]), log=lambda *a: None)
        rows = read_metrics(tmp_path / preset, "train")
        assert [r["step"] for r in rows] == [1, 2]
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


def test_a_recipe_nothing_can_act_on_is_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="spear: its tool_reward recipe counts tool calls.*multi_turn"):
        run_sync(load_config(None, [*TINY, "algorithm.preset=spear", f"run.dir={tmp_path}"]), log=lambda *a: None)
    assert not (tmp_path / "metrics.jsonl").exists()
