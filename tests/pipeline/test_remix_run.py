"""ReMix end to end (docs/algorithms.md): the mix sampler's fraction and window in a real run, the KL-Convex
lambda read from the trainer's step counter, and policy reincarnation swapping the base policy and
dropping the historical store."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from offpolicy.config import load_config
from offpolicy.data.sampling import GroupMeta, Mix
from offpolicy.pipeline.replay import Reincarnation, apply_preset_defaults
from offpolicy.pipeline.sync import run_sync
from offpolicy.train.metrics import read_metrics

SMALL = ["train.steps=4", "eval.every=0", "tasks.eval_size=8", "rollout.prompts_per_step=5",
         "rollout.group_size=4", "run.progress=false", "run.loggers=[]", "run.save_final=false"]


def _run(tmp_path, *extra):
    cfg = load_config(None, [*SMALL, "algorithm.preset=remix", f"run.dir={tmp_path}", *extra])
    run_sync(cfg, log=lambda *a: None)
    return read_metrics(tmp_path, "train")


def test_remix_preset_fills_unset_settings_and_explicit_ones_win():
    cfg = apply_preset_defaults(load_config(None, ["algorithm.preset=remix"]))
    assert cfg.buffer.strategy == "mix" and cfg.buffer.strategy_params == {"p": 0.4, "window": 2}
    assert cfg.train.updates_per_batch == 2
    mine = apply_preset_defaults(load_config(None, ["algorithm.preset=remix", "train.updates_per_batch=1",
                                                    "buffer.strategy_params.p=0.25"]))
    assert mine.train.updates_per_batch == 1 and mine.buffer.strategy_params == {"p": 0.25, "window": 2}
    assert apply_preset_defaults(load_config(None, [])).buffer.strategy is None  # grpo: untouched


def test_replay_groups_matches_what_select_replays():
    mix = Mix(p=0.4, window=2)
    history = [GroupMeta(f"h{i}", i, 4, 1, 1, False) for i in range(8)]
    fresh = [GroupMeta(f"f{i}", 100 + i, 4, 2, 0, False) for i in range(5)]
    g = mix.replay_groups(5, 4)  # target round(0.4 * 20) = 8 rows = 2 groups of 4
    assert g == 2
    sel = mix.select(history + fresh[: 5 - g], 20, now_version=2)
    assert len(sel.replayed) == g and len(sel.take) == 5
    assert mix.replay_groups(5, 4, history_rows=4) == 1  # a short history caps the replay share


def test_mix_run_replays_p_of_each_batch_from_the_window_and_generates_only_the_rest(tmp_path):
    rows = _run(tmp_path, "algorithm.reincarnation_step=0", "algorithm.kl_coef=0")
    # 5 groups of 4 per batch; round(0.4 * 20) = 8 rows = 2 groups replayed from step 2 on
    assert [r["samples"] for r in rows] == [20, 20, 20, 20]
    assert [r["fresh_samples"] for r in rows] == [20, 12, 12, 12]
    assert [r["replayed_frac"] for r in rows] == [0.0, 0.4, 0.4, 0.4]
    # replayed rows come from the last 2 policies only: staleness of a batch is at most 2
    assert all(r["staleness_max"] <= 2 for r in rows) and rows[3]["staleness_max"] >= 1
    assert all(r["optimizer_steps"] == 2 for r in rows)  # update-to-data ratio m = 2
    # the clip window's centre is pi_k / pi_{k-i}: 1 on fresh rows (up to the engine's float error: KV
    # cache vs one full forward), away from 1 on rows replayed from older policies
    assert abs(rows[0]["loss/center_min"] - 1) < 1e-4 and abs(rows[0]["loss/center_max"] - 1) < 1e-4
    assert rows[2]["loss/center_max"] - rows[2]["loss/center_min"] > 1e-2


def test_kl_convex_lambda_follows_the_trainer_step(tmp_path):
    schedule = "{start: 1, every: 1, drop: 0.2, floor: 0.5}"
    rows = _run(tmp_path, f"algorithm.kl_convex={schedule}", "algorithm.kl_coef=0.01",
                "algorithm.reincarnation_step=0")
    assert [r["kl_convex_lambda"] for r in rows] == pytest.approx([1.0, 0.8, 0.6, 0.5], abs=1e-7)
    assert all("kl_ref" in r for r in rows)
    # pi_{k-1} is read once lambda < 1: KL to it is 0 at step 1 (unread) and positive after an update
    assert rows[0]["kl_prev"] == 0.0 and all(r["kl_prev"] > 0 for r in rows[1:])


def test_reincarnation_swaps_the_base_and_drops_the_store(tmp_path):
    rows = _run(tmp_path, "algorithm.reincarnation_step=2", "algorithm.kl_coef=0.01",
                "checkpoint.every=1", "checkpoint.keep=4")
    assert [r.get("reincarnated", 0) for r in rows] == [0, 1, 0, 0]
    # after T: on-policy, full fresh batches, nothing replayed
    assert [r["replayed_frac"] for r in rows] == [0.0, 0.4, 0.0, 0.0]
    assert [r["fresh_samples"] for r in rows] == [20, 12, 20, 20]
    assert rows[2]["staleness_max"] == 0
    # the base policy is pi_T: the weights saved at reincarnation equal the step-2 checkpoint's
    base = load_file(tmp_path / "reincarnation.safetensors")
    step2 = load_file(next((tmp_path / "checkpoints").glob("step-*2/model.safetensors")))
    assert base.keys() == step2.keys()
    assert all(torch.equal(base[k], step2[k]) for k in base)


def test_reincarnation_sets_the_reference_to_the_policy_and_restores_it_on_resume(tmp_path, random_tiny):
    model = copy.deepcopy(random_tiny[0])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    mix = Mix(p=0.4)
    r = Reincarnation(SimpleNamespace(model=model, ref_model=ref, run_dir=tmp_path), 3)
    assert not r.after_step(2, mix) and mix.p == 0.4
    assert not torch.equal(ref.lm_head.weight, model.lm_head.weight)
    assert r.after_step(3, mix) and mix.p == 0.0
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    fresh_ref = copy.deepcopy(random_tiny[0])
    resumed = Reincarnation(SimpleNamespace(model=model, ref_model=fresh_ref, run_dir=tmp_path), 3)
    resumed.restore(2)  # a checkpoint before T: the base is still the initial policy
    assert not torch.equal(fresh_ref.lm_head.weight, model.lm_head.weight)
    resumed.restore(5)
    assert all(torch.equal(a, b) for a, b in zip(fresh_ref.state_dict().values(), model.state_dict().values()))
