"""Online DPO's pairs: built inside each task's scored group, hand-checked; inert pairs keep the row count
fixed; a mixed batch (samples and pairs) trains the policy loss on the samples and the DPO term on the
pairs, and its gradient is the sum of the two computed apart."""

import pytest
import torch

from offpolicy.algos import bind, resolve_preset
from offpolicy.config import ConfigError, load_config
from offpolicy.data.experience import Experience, collate
from offpolicy.rollout.online_pairs import OnlinePairs, build_pairs, pairs_per_task
from offpolicy.rollout.workflow import group_id
from offpolicy.train.algorithm import Algorithm
from offpolicy.train.plan import build_plan
from offpolicy.train.step import response_logp, train_step


def test_pairs_per_task_bounds_what_the_rules_can_give():
    from itertools import product

    from offpolicy.algos import all_pairs

    assert pairs_per_task("best_vs_worst", 8) == 1 and pairs_per_task("all_pairs", 4) == 4
    for K in (2, 3, 4, 5):  # every 0/1/2-valued group of K: never more pairs than the padding allows
        most = max(len(all_pairs(list(r))) for r in product((0.0, 1.0, 2.0), repeat=K))
        assert most == pairs_per_task("all_pairs", K)


def _group(rewards, *, fault_at=None, task_id="t7"):
    out = []
    for i, r in enumerate(rewards):
        e = Experience(torch.tensor([1, 2]), torch.tensor([10 + i, 20 + i]), torch.ones(2), torch.full((2,), -0.5 - i),
                       r, f"{task_id}@b3", task_id, version=2, batch_index=3, info={"correct": r >= 1.0})
        if i == fault_at:
            e.info["reward_fault"] = "raised"
            e.response_mask = torch.zeros(2)
            e.group_id += f"#invalid{i}"
        out.append(e)
    return out


def test_pair_ids_of_tasks_whose_ids_hold_a_hash_stay_apart():
    """Pair ids come from the samples' fields, not from parsing the group id: a task id holding '#' (a task file
    named ``a#b.jsonl``) gave every task of the batch the same pair ids, merging their pairs in the buffer."""
    rows = [e for t in ("a#b-1", "a#b-2") for e in build_pairs(_group([1.0, 0.0], task_id=t), "best_vs_worst", 2)]
    assert [e.group_id for e in rows] == ["a#b-1@b3/p0"] * 2 + ["a#b-2@b3/p0"] * 2
    assert [e.info["pair_id"] for e in rows[::2]] == ["a#b-1@b3/p0", "a#b-2@b3/p0"]


def test_a_faulted_first_sample_does_not_change_the_pair_ids():
    rows = build_pairs(_group([1.0, 0.0, 1.0], fault_at=0), "best_vs_worst", 3)
    assert {e.group_id for e in rows} == {group_id(rows[0], 2, 3) + "/p0"} == {"t7@b3/p0"}


def test_pairs_of_a_scored_group_by_hand():
    group = _group([0.0, 1.0, 1.0, 0.0])
    rows = build_pairs(group, "all_pairs", 4)
    assert len(rows) == 8 and [r.info["role"] for r in rows] == ["chosen", "rejected"] * 4
    # (1,0), (1,3), (2,0), (2,3): the sampled tokens and behaviour log-probs travel with each row
    assert [int(r.response_ids[0]) for r in rows] == [11, 10, 11, 13, 12, 10, 12, 13]
    assert [float(r.behav_logp[0]) for r in rows[:2]] == [-1.5, -0.5]
    assert all(r.version == 2 and r.batch_index == 3 for r in rows)
    assert [r.group_id for r in rows[::2]] == ["t7@b3/p0", "t7@b3/p1", "t7@b3/p2", "t7@b3/p3"]
    assert all(a.group_id == b.group_id for a, b in zip(rows[::2], rows[1::2]))  # a pair is a group of two
    assert len({r.eid for r in rows} | {e.eid for e in group}) == 8 + 4  # every row its own
    assert all(r.response_mask.sum() == 2 for r in rows) and "inert" not in rows[0].info


def test_a_group_without_contrast_gives_inert_pairs_and_a_faulted_sample_none():
    rows = build_pairs(_group([1.0, 1.0, 1.0, 1.0]), "best_vs_worst", 4)
    assert len(rows) == 2 and all(r.info["inert"] and r.response_mask.sum() == 0 for r in rows)
    # the faulted sample (reward 1.0, but no score) is in no pair: of [0, -, 1, 0] the median is 0, so
    # nothing lies below it: no live pair with all_pairs; best_vs_worst pairs sample 2 with sample 0
    rows = build_pairs(_group([0.0, 1.0, 1.0, 0.0], fault_at=1), "all_pairs", 4)
    assert len(rows) == 8 and all(r.info.get("inert") for r in rows)
    rows = build_pairs(_group([0.0, 1.0, 1.0, 0.0], fault_at=1), "best_vs_worst", 4)
    assert [int(r.response_ids[0]) for r in rows] == [12, 10] and "inert" not in rows[0].info


class _Engine:
    """Scripted: response i of each prompt is the digit token of i (so rewards are known)."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, prompts, *, n, **kw):
        from offpolicy.rollout.engine import Rollouts

        ids = [torch.tensor([self.tok.convert_tokens_to_ids(str(i)), self.tok.eos_token_id]) for i in range(n)]
        return Rollouts([p for p in range(len(prompts)) for _ in range(n)], ids * len(prompts),
                        [torch.full((2,), -1.0)] * (n * len(prompts)), [True] * (n * len(prompts)))


def test_the_workflow_yields_rows_per_task_for_every_task(random_tiny):
    from types import SimpleNamespace

    from offpolicy.rewards.guard import Scored
    from offpolicy.rollout.workflow import Sampling, rows_per_step

    tok = random_tiny[1]
    tasks = [SimpleNamespace(prompt="1+1=", answer="2", task_id="a"), SimpleNamespace(prompt="2+2=", answer="9",
                                                                                      task_id="b")]
    scorer = lambda triples: [Scored(float(r == t), None, r == t) for r, t, _ in triples]  # noqa: E731
    for wf in (OnlinePairs("best_vs_worst"), OnlinePairs("all_pairs", keep_samples=True)):
        exps = wf(_Engine(tok), tok, tasks, scorer, sampling=Sampling(group_size=4), version=0, batch_index=0)
        assert len(exps) == rows_per_step(wf, 2, 4)
    # keep_samples: task a's 4 samples, its 4 pairs (response "2" alone is right: rewards [0, 0, 1, 0] have
    # median 0, nothing below it, so all 4 are inert), then task b's samples and 4 inert pairs (no "9")
    roles = [e.info.get("role", "sample") for e in exps[:12]]
    assert roles == ["sample"] * 4 + ["chosen", "rejected"] * 4
    assert all(e.info.get("inert") for e in exps[4:12] + exps[16:])
    exps = OnlinePairs("best_vs_worst")(_Engine(tok), tok, tasks, scorer, sampling=Sampling(group_size=4))
    assert [int(e.response_ids[0]) for e in exps[:2]] == [tok.convert_tokens_to_ids(str(i)) for i in (2, 0)]
    assert "inert" not in exps[0].info and exps[2].info["inert"]


def _mixed_batch(tok):
    def exp(tokens, reward, group, role=None):
        info = {} if role is None else {"role": role}
        return Experience(torch.tensor(tok("12+3=")["input_ids"]), torch.tensor(tokens), torch.ones(len(tokens)),
                          torch.full((len(tokens),), -1.0), reward, group, "t", info=info)

    d = [tok.convert_tokens_to_ids(str(i)) for i in range(10)]
    samples = [exp([d[1], d[5]], 1.0, "g"), exp([d[2]], 0.0, "g"), exp([d[3], d[3], d[4]], 0.0, "g"),
               exp([d[7]], 1.0, "g")]
    pairs = [exp([d[1], d[5]], 1.0, "p0", "chosen"), exp([d[2]], 0.0, "p0", "rejected"),
             exp([d[7]], 1.0, "p1", "chosen"), exp([d[3], d[3], d[4]], 0.0, "p1", "rejected")]
    return samples, pairs


def test_a_mixed_step_is_the_policy_loss_on_the_samples_plus_coef_times_dpo_on_the_pairs(random_tiny):
    tok = random_tiny[1]
    samples, pairs = _mixed_batch(tok)
    cfg = load_config(None, ["workflow.name=online_pairs", "workflow.keep_samples=true", "algorithm.preference_coef=0.5",
                             "algorithm.preference_params={beta: 0.2}", "train.grad_clip=1e9"])
    algo = Algorithm.from_config(cfg.algorithm)
    plan = build_plan(cfg, algo)
    assert plan.ref_logp == "reference" and plan.preference.startswith("0.5 x dpo(beta=0.2")

    def fresh():
        m = type(random_tiny[0])(random_tiny[0].config)
        m.load_state_dict(random_tiny[0].state_dict())
        return m

    ref = fresh().eval()
    with torch.no_grad():  # nudge the policy off the reference so the DPO term has a gradient of its own
        model = fresh()
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=None))
    mixed = fresh()
    mixed.load_state_dict(model.state_dict())
    stats = train_step(mixed, torch.optim.SGD(mixed.parameters(), lr=0.0), collate(samples + pairs, tok.pad_token_id),
                       algo, plan, ref_model=ref)
    # apart: GRPO on the 4 samples alone, and 0.5 x DPO (beta 0.2) on the 2 pairs alone
    grpo = Algorithm(*resolve_preset("grpo"))
    apart = fresh()
    apart.load_state_dict(model.state_dict())
    s1 = train_step(apart, torch.optim.SGD(apart.parameters(), lr=0.0), collate(samples, tok.pad_token_id), grpo,
                    build_plan(load_config(None, ["train.grad_clip=1e9"]), grpo))
    g1 = [p.grad.clone() for p in apart.parameters()]
    batch = collate(pairs, tok.pad_token_id)
    from offpolicy.algos import LossInputs

    logp_BT = response_logp(apart, batch)[0]
    with torch.no_grad():
        ref_BT = response_logp(ref, batch)[0]
    dpo = bind("policy_loss", "dpo", {"beta": 0.2})
    out = dpo(logp_BT, LossInputs(adv=torch.zeros(4), mask=batch.mask_BT, behav_logp=batch.behav_logp_BT,
                                  ref_logp=ref_BT))
    apart.zero_grad()
    term = out.loss_BT.sum() / 4  # seq_mean_token_sum over the 4 pair rows: the mean over the 2 pairs
    (0.5 * term).backward()
    assert stats["pair/loss"] == pytest.approx(term.item(), abs=1e-6)
    assert stats["loss"] == pytest.approx(s1["loss"] + 0.5 * term.item(), abs=1e-6)
    for p, a, g in zip(mixed.parameters(), apart.parameters(), g1):
        torch.testing.assert_close(p.grad, a.grad + g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["workflow.pairing=all_pairs"], "online_pairs only"),
    (["algorithm.preference_coef=0.5"], "keep_samples=true makes"),
    (["workflow.name=online_pairs", "workflow.keep_samples=true", "algorithm.preference_params={beta: 0.2}"],
     "preference_coef=0 turns"),
])
def test_settings_nothing_would_read_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["workflow.name=online_pairs"], "does not train on preference pairs"),
    (["workflow.name=online_pairs", "workflow.keep_samples=true"], "set algorithm.preference_coef"),
    (["algorithm.preset=online_dpo", "workflow.keep_samples=true"], "trains on preference pairs only"),
    (["algorithm.preset=dpo"], "trains on preference pairs only"),
    (["workflow.name=online_pairs", "workflow.keep_samples=true", "algorithm.preference_coef=1",
      "algorithm.preference_params={beta: 0.2, gamma: 1}"], "unknown parameter 'gamma'"),
])
def test_batches_a_loss_cannot_train_on_are_refused_at_start(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        cfg = load_config(None, overrides)
        build_plan(cfg, Algorithm.from_config(cfg.algorithm))


def test_online_dpo_preset_samples_its_pairs():
    cfg = load_config(None, ["algorithm.preset=online_dpo"])
    assert cfg.workflow.name == "online_pairs" and cfg.workflow.pairing == "best_vs_worst"
