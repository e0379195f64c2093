"""Offline DPO end to end: `offpolicy train algorithm.preset=dpo tasks.name=pairs ...` on a standard-format
file with the bundled model and its defaults; the evaluation rows carry preference_accuracy, which starts
at 0.5 (policy = reference: every pair a tie) and rises."""

import pytest

from offpolicy.cli import main
from offpolicy.config import ConfigError, load_config
from offpolicy.data.pairs import arithmetic_pairs, write_pairs
from offpolicy.train.metrics import read_metrics


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return (write_pairs(d / "train.jsonl", arithmetic_pairs("train", 2000, seed=0)),
            write_pairs(d / "eval.jsonl", arithmetic_pairs("eval", 128, seed=0), conversational=False))


def test_dpo_trains_on_a_pair_file_with_the_defaults(pair_files, tmp_path):
    train, held = pair_files
    rc = main(["train", "algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={train}",
               f"tasks.eval_path={held}", f"run.dir={tmp_path}", "train.steps=60", "eval.every=30",
               "run.loggers=[]", "run.save_final=false", "train.threads=1"])
    assert rc == 0
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[0]["preference_accuracy"] == 0.5
    assert evals[-1]["preference_accuracy"] > 0.65 and evals[-1]["reward_margin"] > 0
    rows = read_metrics(tmp_path, "train")
    assert all(r["samples"] == 64 for r in rows)  # 32 pairs, chosen and rejected
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # log 2 at the reference
    assert rows[-1]["loss/preference_accuracy"] > 0.5


@pytest.mark.parametrize("overrides, message", [
    (["rollout.group_size=4"], "each pair is one group of two"),
    (["algorithm.preset=grpo"], "does not train on preference pairs"),
    (["rollout.prompts_per_step=5", "train.micro_batches=2"], "pair is never split"),
])
def test_pair_settings_that_cannot_work_are_refused(pair_files, overrides, message, tmp_path):
    from offpolicy.pipeline.context import bind_algorithm

    train, _ = pair_files
    base = ["algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={train}", f"run.dir={tmp_path}"]
    with pytest.raises(ConfigError, match=message):
        bind_algorithm(load_config(None, [*base, *overrides]))


def test_dpo_needs_pairs():
    from offpolicy.pipeline.context import bind_algorithm

    with pytest.raises(ConfigError, match="trains on preference pairs"):
        bind_algorithm(load_config(None, ["algorithm.preset=dpo"]))


def test_reference_log_probs_are_computed_once_per_response_and_equal_recomputed(pair_files, tmp_path):
    import torch

    from offpolicy.data.experience import collate
    from offpolicy.data.pairs import load_pairs
    from offpolicy.pipeline.context import build_context
    from offpolicy.pipeline.ref_cache import RefCache
    from offpolicy.rollout.pairs import PairsWorkflow
    from offpolicy.rollout.workflow import Sampling
    from offpolicy.train.step import response_logp

    train, _ = pair_files
    ctx = build_context(load_config(None, ["algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={train}",
                                           f"run.dir={tmp_path}", "run.loggers=[]"]))
    pairs = load_pairs(train)[:12]
    cache = RefCache(ctx.ref_model, pad_id=ctx.tokenizer.pad_token_id)
    first = cache.fill(PairsWorkflow()(None, ctx.tokenizer, pairs[:8], None, sampling=Sampling()))
    assert cache.computed == 16
    # a later batch (a new epoch: new experiences, overlapping pairs) computes only what it has not seen
    later = cache.fill(PairsWorkflow()(None, ctx.tokenizer, pairs[4:12], None, sampling=Sampling()))
    assert cache.computed == 24
    batch = collate(later, ctx.tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = response_logp(ctx.ref_model, batch)[0]
    torch.testing.assert_close(batch.ref_logp_BT * batch.mask_BT, recomputed * batch.mask_BT, atol=1e-5, rtol=0)
    assert all(e.ref_logp is not None for e in first)
