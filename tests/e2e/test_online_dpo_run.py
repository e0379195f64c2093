"""Online DPO through the runners: pairs sampled from the policy, scored, and trained on with DPO; in
async mode they arrive one version stale, as RL experiences do, and the staleness is logged the same way.
And a mixed run: GRPO on the samples plus a DPO term on the pairs built from them."""

import pytest

from offpolicy.cli import main
from offpolicy.train.metrics import read_metrics

SMALL = ["train.steps=6", "rollout.prompts_per_step=8", "rollout.group_size=4", "tasks.eval_size=32",
         "eval.every=0", "run.loggers=[]", "run.save_final=false", "train.threads=1",
         "run.progress=false"]


@pytest.mark.parametrize("mode, pairing", [("sync", "best_vs_worst"), ("async", "all_pairs")])
def test_online_dpo_trains_on_sampled_pairs(tmp_path, mode, pairing):
    extra = ["pipeline.mode=async", "pipeline.explorer_threads=1", "pipeline.sync_offset=1"] if mode == "async" else []
    assert main(["train", "algorithm.preset=online_dpo", f"workflow.pairing={pairing}", f"run.dir={tmp_path}",
                 *SMALL, *extra]) == 0
    rows = read_metrics(tmp_path, "train")
    per_task = 1 if pairing == "best_vs_worst" else 4  # pairs, live or inert
    assert len(rows) == 6 and all(r["samples"] == 8 * 2 * per_task for r in rows)
    # the bundled model is right about 40% of the time: some groups have no contrast, most steps some
    live = [r["loss/pairs_live"] for r in rows]
    assert all(0 <= x <= 1 for x in live) and 0 < sum(live) / 6 < 1
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # log 2: the policy is the reference at step 1
    stale = [r["staleness_max"] for r in rows]
    assert stale == ([0] * 6 if mode == "sync" else [0, 1, 1, 1, 1, 1])
    assert "accuracy" in read_metrics(tmp_path, "eval")[-1]


def test_a_mixed_run_trains_grpo_on_samples_and_dpo_on_their_pairs(tmp_path):
    assert main(["train", "algorithm.preset=grpo", "workflow.name=online_pairs", "workflow.keep_samples=true",
                 "algorithm.preference_coef=0.5", f"run.dir={tmp_path}", *SMALL]) == 0
    rows = read_metrics(tmp_path, "train")
    assert all(r["samples"] == 8 * (4 + 2) for r in rows)  # 4 samples and one (best, worst) pair per task
    assert rows[0]["pair/loss"] == pytest.approx(0.693147, abs=1e-4)
    assert all("loss/ratio_mean" in r and "pair/preference_accuracy" in r for r in rows)
    assert (tmp_path / "plan.json").read_text().count("0.5 x dpo(") == 1


def test_the_held_out_measure_does_not_depend_on_the_pairing(tmp_path):
    """Evaluation scores one greedy answer per task: all_pairs builds no pair from one answer, and its
    evaluation once scored 0 of 0 (0.000 before any training)."""
    first = {}
    for pairing in ("best_vs_worst", "all_pairs"):
        run = tmp_path / pairing
        assert main(["train", "algorithm.preset=online_dpo", f"workflow.pairing={pairing}", f"run.dir={run}",
                     *SMALL, "train.steps=1", "rollout.prompts_per_step=4"]) == 0
        first[pairing] = read_metrics(run, "eval")[0]
    assert first["all_pairs"]["accuracy"] == first["best_vs_worst"]["accuracy"] > 0.2  # the bundled model: ~0.44
    assert first["all_pairs"]["tasks"] == 32
