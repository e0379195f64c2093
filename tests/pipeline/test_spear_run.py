"""SPEAR end to end on a scripted environment: the self-imitation buffer's insertion, eviction, trigger and
replay happen in a real pipeline run (checked step by step against the logged counters), the tool-call
reward follows its schedule, and a resumed run restores the buffer (its metrics equal an uninterrupted run's)."""

import math

import pytest

from offpolicy.config import load_config
from offpolicy.pipeline.sync import run_sync
from offpolicy.train.metrics import read_metrics

ARGS = ["algorithm.preset=spear", "workflow.name=multi_turn", "workflow.env=tests.pipeline.scripted_env:AnswerEnv",
        "workflow.max_turns=1", "workflow.max_total_tokens=5", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "tasks.eval_size=8", "eval.every=0", "run.progress=false", "run.loggers=[]", "run.save_final=false",
        "train.threads=1", "algorithm.self_imitation.batch_size=4", "algorithm.self_imitation.tolerate_steps=2",
        "algorithm.self_imitation.horizon=3", "algorithm.tool_reward.horizon=4"]


def _run(run_dir, *extra, resume=False):
    run_sync(load_config(None, [*ARGS, f"run.dir={run_dir}", *extra]), resume=resume, log=lambda *a: None)
    return read_metrics(run_dir, "train")


def test_self_imitation_buffer_in_a_real_run(tmp_path):
    rows = _run(tmp_path, "train.steps=8", "workflow.env_args={bonus_calls: 3}")
    window: list[tuple[int, int]] = []  # (step, inserted) since the last replay, as the buffer keeps them
    replays = 0
    for r in rows:
        t = r["step"]
        window = [(s, n) for s, n in window + [(t, r["sil/inserted"])] if t - s <= 2]  # tolerate_steps = 2
        assert r["sil/buffer_size"] == sum(n for _, n in window)
        assert r["sil/candidates"] <= r["sil/buffer_size"]
        triggered = r["sil/candidates"] > 1.5 * 4
        assert (r["sil/replayed_samples"] > 0) == triggered
        if triggered:  # min(2^floor(log2 n), batch_size) drawn, advantages recalibrated (> 0), buffer cleared
            assert r["sil/replayed_samples"] == min(2 ** int(math.log2(r["sil/candidates"])), 4)
            assert r["sil/adv_mean"] > 0
            replays += 1
            window = []
            if r["sil/weight"] > 0:
                assert math.isfinite(r["sil/loss"])
        assert r["sil/replay_passes"] == replays
        assert r["sil/weight"] == pytest.approx(0.5 * (1 - math.cos(math.pi * min(t, 3) / 3)))
        # tool-call reward: 0.1 * min(3, 10) * w_tool(t), w_tool = (1 + cos(pi min(t, 4) / 4)) / 2
        assert r["tool_reward_mean"] == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)))
        assert r["tool_calls_mean"] == 3
    assert replays >= 1 and sum(r["sil/inserted"] for r in rows) > 0


def test_resume_restores_the_self_imitation_buffer(tmp_path):
    full = _run(tmp_path / "full", "train.steps=8", "checkpoint.every=4")
    _run(tmp_path / "cut", "train.steps=4", "checkpoint.every=4")
    resumed = _run(tmp_path / "cut", "train.steps=8", "checkpoint.every=4", resume=True)
    keys = [k for k in full[0] if k.startswith("sil/") or k in ("loss", "reward_mean")]
    assert [[r[k] for k in keys] for r in resumed[4:]] == [[r[k] for k in keys] for r in full[4:]]
    assert any(r["sil/buffer_size"] > r["sil/inserted"] for r in full[4:5])  # the buffer carried entries over
