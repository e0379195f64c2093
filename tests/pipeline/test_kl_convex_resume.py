"""KL-Convex (ReMix) reads pi_{k-1}, a frozen copy of the policy one step behind it (TrainLoop.prev_model). The
checkpoint holds it (prev_policy.safetensors): before it did, a resumed run started with pi_{k-1} := pi_k, so its
first step's KL term, and everything after, differed from the uninterrupted run's."""

import shutil

import pytest

from offpolicy.config import load_config
from offpolicy.pipeline.sync import run_sync
from offpolicy.train.metrics import read_metrics

ARGS = ["algorithm.preset=remix", "algorithm.kl_convex.start=0", "algorithm.kl_convex.every=1", "algorithm.kl_coef=0.5",
        "buffer.strategy=fifo", "buffer.strategy_params={}", "buffer.kind=sqlite", "train.steps=5",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0", "checkpoint.every=3",
        "checkpoint.keep=5", "run.progress=false", "run.loggers=[]", "run.save_final=false", "train.threads=1"]


def test_resume_with_kl_convex_matches_an_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sync(load_config(None, [*ARGS, f"run.dir={a}"]), log=lambda *x: None)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000005")  # as if killed after step 3's checkpoint
    run_sync(load_config(None, [*ARGS, f"run.dir={b}"]), run_dir=b, resume=True, log=lambda *x: None)
    ra, rb = read_metrics(a, "train"), read_metrics(b, "train")
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5]
    assert [r["kl_prev"] for r in rb] == [r["kl_prev"] for r in ra]


def test_a_checkpoint_without_pi_k_minus_1_resumes_with_a_warning(tmp_path):
    """Checkpoints written before they kept pi_{k-1}: the resume says what it falls back to, and runs."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_sync(load_config(None, [*ARGS, "train.steps=3", f"run.dir={a}"]), log=lambda *x: None)
    shutil.copytree(a, b)
    (b / "checkpoints" / "step-00000003" / "prev_policy.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"holds no pi_\(k-1\)"):
        run_sync(load_config(None, [*ARGS, f"run.dir={b}"]), run_dir=b, resume=True, log=lambda *x: None)
    assert [r["step"] for r in read_metrics(b, "train")] == [1, 2, 3, 4, 5]
