"""Every preset runs end-to-end on the demo through the same training step (no per-name branches)."""

import math

import pytest

from offpolicy.algos import PRESETS
from offpolicy.config import load_config
from offpolicy.pipeline.sync import run_sync
from offpolicy.train.metrics import read_metrics


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains_two_steps(preset, tmp_path):
    cfg = load_config(None, [f"algorithm.preset={preset}", f"run.dir={tmp_path}", "train.steps=2", "eval.every=0",
                             "tasks.eval_size=8", "rollout.prompts_per_step=4", "rollout.group_size=4",
                             "buffer.strategy=fifo", "train.updates_per_batch=1",  # single pass, fresh data
                             "run.progress=false", "run.tensorboard=false", "run.save_final=false"])
    run_sync(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        # single-pass on-policy data: the ratio is 1 up to the engine's float error (KV cache vs one
        # full forward) when the denominator is behav_logp, and exactly 1 against the detached old_logp
        if "loss/ratio_min" in r:
            assert abs(r["loss/ratio_min"] - 1) < 1e-4 and abs(r["loss/ratio_max"] - 1) < 1e-4
