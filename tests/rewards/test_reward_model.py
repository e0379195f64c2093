"""Reward models: Bradley-Terry training from the CLI raises held-out pair accuracy and saves a folder that
transformers and the scorer load again; the scorer reads the last non-padding token, isolates a sample
that raises or scores NaN, and adds rule rewards by weight."""

import json

import pytest
import torch

from offpolicy.cli import main
from offpolicy.data.pairs import arithmetic_pairs, write_pairs
from offpolicy.rewards.guard import GuardedReward, Scored
from offpolicy.rewards.reward_model import RewardModelScorer, load_reward_model, sample_ids, sequence_scores


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """A reward model trained for 60 steps on arithmetic pairs with `offpolicy reward-model train`."""
    d = tmp_path_factory.mktemp("rm")
    write_pairs(d / "train.jsonl", arithmetic_pairs("train", 2000, seed=0))
    write_pairs(d / "eval.jsonl", arithmetic_pairs("eval", 200, seed=0))
    rc = main(["reward-model", "train", "--pairs", str(d / "train.jsonl"), "--eval-pairs", str(d / "eval.jsonl"),
               "--out", str(d / "rm"), "--steps", "60", "--lr", "1e-3", "--eval-every", "30", "--threads", "1"])
    assert rc == 0
    return d


def test_training_raises_held_out_pair_accuracy(trained_rm):
    summary = json.loads((trained_rm / "rm" / "reward_model.json").read_text())
    rows = [json.loads(line) for line in (trained_rm / "rm" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert summary["eval"]["accuracy"] == evals[-1]["pair_accuracy"]
    # at initialisation the random head ranks pairs at about chance; 60 steps learn the slipped-carry pairs
    assert evals[0]["pair_accuracy"] < 0.6 and evals[-1]["pair_accuracy"] >= 0.65
    assert len([r for r in rows if r["kind"] == "train"]) == 60


def test_saved_folder_loads_in_transformers_and_the_scorer(trained_rm):
    from transformers import AutoModelForSequenceClassification

    folder = trained_rm / "rm"
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    scorer = RewardModelScorer(folder, batch_size=3)
    prompts, responses = ["37+48=", "52-27=", "11+11="], ["85", "35", "2222"]
    ids = [sample_ids(scorer.tokenizer, p, r) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        one_by_one = [hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in ids]  # no padding at all
    torch.testing.assert_close(torch.tensor(scorer.scores(prompts, responses)), torch.tensor(one_by_one),
                               atol=1e-5, rtol=0)  # batched with right padding: the same scores
    scored = scorer([(r, "", p) for p, r in zip(prompts, responses)])
    assert [s.fault for s in scored] == [None] * 3
    torch.testing.assert_close(torch.tensor([s.value for s in scored]), torch.tensor(one_by_one), atol=1e-5, rtol=0)


def test_last_non_padding_token_is_read():
    model, tok = load_reward_model("bundled")
    seqs = [[1, 5, 6, 2], [1, 7, 2], [1, 5, 6, 13, 7, 8, 15, 9, 2]]
    with torch.no_grad():
        batched = sequence_scores(model, seqs, tok.pad_token_id)
        alone = torch.cat([sequence_scores(model, [s], tok.pad_token_id) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id


class FaultyModel(torch.nn.Module):
    """A stand-in reward model: the score is the sum of the ids; a sequence holding '=' twice raises, one
    holding the digit 9 scores NaN. Raising fails the whole batch it is in."""

    def __init__(self, tok):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.eq, self.nine = tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids("9")

    def forward(self, input_ids, attention_mask):
        if ((input_ids == self.eq).sum(-1) >= 2).any():
            raise RuntimeError("boom")
        score = (input_ids * attention_mask).sum(-1).float() * self.w
        score = torch.where((input_ids == self.nine).any(-1), torch.tensor(float("nan")), score)
        return type("Out", (), {"logits": score[:, None]})()


def test_a_sample_that_raises_or_is_nan_is_isolated():
    from offpolicy.rollout.model import BUNDLED, load_tokenizer

    tok = load_tokenizer(BUNDLED)
    scorer = RewardModelScorer(model=FaultyModel(tok), tokenizer=tok, batch_size=4)
    samples = [("5", "5", "2+3="), ("7", "7", "3+4=="), ("6", "6", "2+4="), ("9", "9", "4+5="), ("8", "8", "4+4=")]
    out = scorer(samples)
    assert [s.fault for s in out] == [None, "exception", None, "non_finite", None]
    assert "boom" in out[1].message
    expected = [sum(sample_ids(tok, p, r)) for r, _, p in samples]
    assert [out[i].value for i in (0, 2, 4)] == [float(expected[i]) for i in (0, 2, 4)]
    with pytest.raises(TypeError, match="must see the prompt"):
        scorer([("5", "5")])


def test_rule_rewards_combine_by_weight():
    from offpolicy.rewards import combine_rewards
    from offpolicy.rollout.model import BUNDLED, load_tokenizer

    tok = load_tokenizer(BUNDLED)
    rules = GuardedReward(combine_rewards({"exact_match": 2.0}), timeout_s=None)
    scorer = RewardModelScorer(model=FaultyModel(tok), tokenizer=tok, weight=0.5, rules=rules)
    samples = [("5", "5", "2+3="), ("6", "5", "2+3="), ("9", "9", "4+5=")]
    out = scorer(samples)
    model_score = [float(sum(sample_ids(tok, p, r))) for r, _, p in samples]
    assert out[0] == Scored(0.5 * model_score[0] + 2.0) and out[1] == Scored(0.5 * model_score[1])
    assert out[2].fault == "non_finite"  # a fault in the model part faults the sample


def test_bad_pairs_file_is_a_cli_error(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    assert main(["reward-model", "train", "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'p.jsonl'}:1: missing field 'rejected'" in capsys.readouterr().err


def test_conversational_pairs_on_a_qwen2_folder(tmp_path, smoke_model_dir):
    """A chat model's folder trains as a reward model on conversational pairs, and the scorer, given the prompt
    as the policy sees it (the chat template's rendering), scores the very sequence that training scored."""
    from offpolicy.data.pairs import load_pairs, pair_token_ids
    from offpolicy.train.reward_model import RewardModelSettings, train_reward_model

    pairs = load_pairs(write_pairs(tmp_path / "chat.jsonl", arithmetic_pairs("train", 16), conversational=True))
    res = train_reward_model(pairs, pairs[:8], model=str(smoke_model_dir), out=tmp_path / "rm", log=lambda _: None,
                             settings=RewardModelSettings(steps=2, batch_size=4, eval_every=0))
    assert res.eval is not None and (tmp_path / "rm" / "config.json").is_file()
    scorer = RewardModelScorer(tmp_path / "rm", batch_size=8)
    tok, p = scorer.tokenizer, pairs[0]
    ids = pair_token_ids(tok, p)
    rendered = tok.apply_chat_template(list(p.prompt_messages), tokenize=False, add_generation_prompt=True)
    assert sample_ids(tok, rendered, p.chosen) == ids.prompt_ids + ids.chosen_ids
    with torch.no_grad():
        trained = sequence_scores(scorer.model, [ids.prompt_ids + ids.chosen_ids], tok.pad_token_id).item()
    assert scorer([(p.chosen, p.answer, rendered)])[0].value == pytest.approx(trained, abs=1e-5)


def test_rl_run_scored_by_a_reward_model(tmp_path):
    """reward.model: training samples are scored by the model (reward_mean is its score), the accuracy of a
    training row is still the task's (exact match), and evaluation uses the task reward."""
    import math

    from offpolicy.config import load_config
    from offpolicy.data.pairs import arithmetic_pairs, write_pairs
    from offpolicy.pipeline.sync import run_sync
    from offpolicy.train.metrics import read_metrics
    from offpolicy.train.reward_model import RewardModelSettings, train_reward_model

    pairs = arithmetic_pairs("train", 256, seed=0)
    rm = train_reward_model(pairs, pairs[:32], out=tmp_path / "rm",
                            settings=RewardModelSettings(steps=5, batch_size=16), log=lambda *a: None)
    cfg = load_config(None, [f"reward.model={rm.out}", "train.steps=2", "eval.every=0", "tasks.eval_size=16",
                             "rollout.prompts_per_step=4", "rollout.group_size=4", f"run.dir={tmp_path / 'run'}",
                             "run.loggers=[]", "run.save_final=false", "train.threads=1"])
    run_sync(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path / "run", "train")
    assert len(rows) == 2 and all(math.isfinite(r["reward_mean"]) for r in rows)
    # model scores are real numbers, not 0/1: the reward is the model's, the accuracy the task's
    assert any(r["reward_mean"] not in (0.0, 1.0) and r["reward_mean"] != r["accuracy"] for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
