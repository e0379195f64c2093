import pytest
import torch

import copy

from offpolicy.algos import bind, resolve_preset
from offpolicy.config import ConfigError, load_config
from offpolicy.data.experience import Experience, collate
from offpolicy.train.algorithm import Algorithm
from offpolicy.train.plan import build_plan
from offpolicy.train.step import response_logp, train_step


def _plan(algo, *overrides):
    return build_plan(load_config(None, ["train.grad_clip=1e9", *overrides]), algo)


def _batch(tok, lengths, rewards):
    exps = []
    for i, (L, r) in enumerate(zip(lengths, rewards)):
        resp = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(L)])
        exps.append(Experience(prompt_ids=torch.tensor(tok("12+3=")["input_ids"]), response_ids=resp,
                               response_mask=torch.ones(L), behav_logp=torch.full((L,), -1.0), reward=r,
                               group_id="g", task_id="t"))
    return collate(exps, tok.pad_token_id)


def test_grpo_step_loss_and_gradient_by_hand(random_tiny):
    model, tok = random_tiny
    model = type(model)(model.config)
    model.load_state_dict(random_tiny[0].state_dict())
    # rewards [1,0,0,0], unbiased std: mean .25, std sqrt(.25) = .5 -> A = [1.5, -.5, -.5, -.5] (±1e-6 eps)
    # on-policy: ratio = 1 everywhere, nothing clipped, per-token loss = -A.
    # response lengths [2,1,1,3] -> token_mean = -(1.5*2 - .5*1 - .5*1 - .5*3) / 7 = -0.5/7
    batch = _batch(tok, [2, 1, 1, 3], [1.0, 0.0, 0.0, 0.0])
    algo = Algorithm(*resolve_preset("grpo"))
    ref = type(model)(model.config)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_step(model, opt, batch, algo, _plan(algo))
    A = torch.tensor([1.5, -0.5, -0.5, -0.5]) * 0.5 / (0.5 + 1e-6)
    expected = -(A * torch.tensor([2.0, 1, 1, 3])).sum() / 7
    assert abs(stats["loss"] - expected.item()) < 1e-6
    assert stats["loss/ratio_is_one"] == 1.0
    # gradient of the step = gradient of -(1/7) * sum_tokens A_i * logp
    logp_BT, _ = response_logp(ref, batch)
    (-(A[:, None] * logp_BT * batch.mask_BT).sum() / 7).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_micro_batches_give_the_same_gradient(random_tiny):
    batch = _batch(random_tiny[1], [2, 1, 3, 3, 1, 2], [1.0, 0.0, 0.0, 1.0, 0.5, 0.0])
    grads = []
    for micro in (1, 2, 3):
        model = type(random_tiny[0])(random_tiny[0].config)
        model.load_state_dict(random_tiny[0].state_dict())
        algo = Algorithm(*resolve_preset("grpo"))
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, algo,
                   _plan(algo, f"train.micro_batches={micro}"))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[2], atol=1e-7, rtol=1e-5)


def test_kl_penalty_is_zero_at_the_reference_and_positive_after_a_change(random_tiny):
    model, tok = random_tiny
    batch = _batch(tok, [1, 3], [1.0, 0.0])  # different responses, so the step moves the policy
    policy = type(model)(model.config)
    policy.load_state_dict(model.state_dict())
    algo = Algorithm(*resolve_preset("grpo"), regularizers=(bind("regularizer", "kl_ref", {"coef": 0.1,
                                                                                             "estimator": "k2"}),))
    plan = _plan(algo)
    assert plan.ref_logp == "reference"
    stats = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.5), batch, algo, plan, ref_model=model)
    assert stats["kl_ref"] == 0.0 and stats["reg/kl_ref"] == 0.0
    stats = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, algo, plan, ref_model=model)
    assert stats["kl_ref"] > 0.0
    assert stats["reg/kl_ref"] == pytest.approx(0.1 * stats["kl_ref"], rel=1e-5)  # token mean, coef 0.1


def test_lr_schedules():
    from offpolicy.config import load_config
    from offpolicy.pipeline.context import lr_multiplier

    f = lr_multiplier(load_config(None, ["train.steps=10", "train.warmup_steps=2", "train.lr_schedule=linear",
                                         "train.min_lr_ratio=0.1"]).train)
    # warm-up 1/2, 2/2; then 1 - 0.9 * (s - 2) / 8: s=2 -> 1, s=6 -> 0.55, s=10 -> 0.1
    assert [f(0), f(1), f(2), f(6), f(10)] == [0.5, 1.0, 1.0, 0.55, pytest.approx(0.1, abs=1e-12)]
    g = lr_multiplier(load_config(None, ["train.steps=10", "train.lr_schedule=cosine",
                                         "train.min_lr_ratio=0.0"]).train)
    assert g(0) == 1.0 and abs(g(5) - 0.5) < 1e-12 and abs(g(10)) < 1e-12
    c = lr_multiplier(load_config(None, ["train.steps=10"]).train)
    assert {c(s) for s in range(12)} == {1.0}


def test_shared_prefix_logp_and_gradient_equal_the_full_forward(random_tiny):
    model, tok = random_tiny
    # three prompts of different lengths, each repeated (a group) with different responses and lengths
    exps = []
    for g, prompt in enumerate(["12+7=", "45+61=", "3-9="]):
        for k, resp in enumerate(["1", "19", "190", "7"][: 2 + g]):
            ids = torch.tensor(tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            exps.append(Experience(prompt_ids=torch.tensor(tok(prompt)["input_ids"]), response_ids=ids,
                                   response_mask=torch.ones(len(ids)), behav_logp=torch.zeros(len(ids)),
                                   reward=float(k == 0), group_id=str(g), task_id=str(g)))
    batch = collate(exps, tok.pad_token_id)
    grads = []
    for share in (False, True):
        model.zero_grad()
        logp, ent = response_logp(model, batch, with_entropy=True, share_prefix=share)
        ((logp * batch.mask_BT).sum() + (ent * batch.mask_BT).sum()).backward()
        grads.append((logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]))
    m = batch.mask_BT.bool()
    torch.testing.assert_close(grads[0][0][m], grads[1][0][m], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0][1][m], grads[1][1][m], atol=1e-5, rtol=0)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_train_step_leaves_its_batch_untouched(random_tiny):
    model, tok = random_tiny
    batch = _batch(tok, [2, 1, 3, 1], [1.0, 0.0, 0.0, 1.0])
    before = copy.deepcopy(batch)
    algo = Algorithm(*resolve_preset("grpo"), regularizers=(bind("regularizer", "kl_ref", {"coef": 0.1}),))
    policy = copy.deepcopy(model)
    train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, algo,
               _plan(algo, "train.updates_per_batch=2"), ref_model=model)
    for name in ("old_logp_BT", "ref_logp_BT", "prev_logp_BT"):
        assert getattr(batch, name) is None
    for name in ("input_ids_BL", "mask_BT", "behav_logp_BT", "rewards_B"):
        assert torch.equal(getattr(batch, name), getattr(before, name))


def test_a_fully_masked_row_changes_nothing(random_tiny):
    """A row with no trainable token (a faulty reward) counts in no denominator, for every aggregation."""
    model, tok = random_tiny
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"):
        grads = []
        for extra in (False, True):
            batch = _batch(tok, [2, 1, 3, 1] + ([2] if extra else []), [1.0, 0.0, 0.0, 1.0] + ([0.0] if extra else []))
            if extra:  # the fifth row is inert and in a group of its own, as the workflow makes it
                batch.mask_BT[4] = 0
                batch.group_ids_B[4] = 7
            policy = copy.deepcopy(model)
            adv_fn, loss_fn, _ = resolve_preset("grpo")
            algo = Algorithm(adv_fn, loss_fn, bind("aggregation", agg, {"max_len": 3} if agg.endswith("norm") else {}))
            stats = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, algo, _plan(algo))
            grads.append((stats["loss"], torch.cat([p.grad.flatten() for p in policy.parameters()])))
        assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6), agg
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=1e-5)


def test_plan_sources_follow_the_declared_inputs():
    def plan(preset, *overrides):
        cfg = load_config(None, [f"algorithm.preset={preset}", *overrides])
        return build_plan(cfg, Algorithm.from_config(cfg.algorithm))

    stale = ("pipeline.mode=async", "pipeline.sync_offset=1")
    assert plan("grpo").old_logp == "current"
    assert plan("grpo", "train.updates_per_batch=2").old_logp == "recompute"
    assert plan("grpo", *stale).old_logp == "behav"  # PPO's pi_old: the sampling policy
    assert plan("grpo", *stale, "train.old_logp=recompute").old_logp == "current"
    # decoupled PPO reads old and behav as two policies: old is always the proximal (step-start) policy
    assert plan("decoupled_ppo", *stale).old_logp == "current"
    assert plan("decoupled_ppo", *stale, "train.mini_batches=2").old_logp == "recompute"
    with pytest.raises(ConfigError, match="two distinct policies"):
        plan("decoupled_ppo", *stale, "train.old_logp=behav")
    with pytest.raises(ConfigError, match="does not read old_logp"):
        plan("rec_oneside_nois", "train.old_logp=behav")
    p = plan("rec_oneside_nois", *stale)
    assert (p.old_logp, p.center_logp, p.ref_logp, p.prev_logp) == ("unused",) * 4
    remix = plan("remix")
    assert remix.center_logp == "current" and remix.ref_logp == "reference" and remix.prev_logp == "previous_policy"
    assert remix.kl.startswith("KL-Convex, 0.001")
    assert plan("grpo", "algorithm.kl_coef=0.01").kl == "constant, 0.01 x KL(pi||ref) (low_var_kl)"
