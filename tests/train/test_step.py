import pytest
import torch

from offpolicy.algos import resolve_preset
from offpolicy.data.experience import Experience, collate
from offpolicy.train.step import Algorithm, response_logp, train_step


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
    stats = train_step(model, opt, batch, algo, grad_clip=1e9)
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
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, algo, grad_clip=1e9,
                   micro_batches=micro)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[2], atol=1e-7, rtol=1e-5)


def test_kl_penalty_is_zero_at_the_reference_and_positive_after_a_change(random_tiny):
    model, tok = random_tiny
    batch = _batch(tok, [1, 3], [1.0, 0.0])  # different responses, so the step moves the policy
    policy = type(model)(model.config)
    policy.load_state_dict(model.state_dict())
    algo = Algorithm(*resolve_preset("grpo"), kl_fn=lambda lp, ref: (lp - ref) ** 2, kl_coef=0.1)
    stats = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.5), batch, algo, ref_model=model)
    assert stats["kl_ref"] == 0.0
    batch.ref_logp_BT = None
    stats = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, algo, ref_model=model)
    assert stats["kl_ref"] > 0.0


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
