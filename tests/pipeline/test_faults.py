"""Faults are isolated or stop the run cleanly: bad rewards, a NaN loss, bad input."""

import json
import math

import pytest
import torch

from offpolicy.algos import LossOut, register
from offpolicy.algos.presets import Preset
from offpolicy.cli import main
from offpolicy.config import ConfigError, load_config
from offpolicy.pipeline import run
from offpolicy.pipeline.explorer import RewardFaultError
from offpolicy.pipeline.trainer import NumericalFaultError
from offpolicy.train.checkpoint import latest_checkpoint
from offpolicy.train.metrics import read_metrics

SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4", "tasks.eval_size=16", "eval.every=0",
         "run.progress=false", "run.loggers=[]"]


@pytest.mark.timing
def test_raising_hanging_and_nan_rewards_are_isolated_per_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPOLICY_TEST_HANG_MARKER", str(tmp_path / "hung"))
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path / 'run'}", "train.steps=4",
                             "reward.function=faulty_rewards:flaky", "reward.timeout_s=0.5",
                             "reward.max_invalid_frac=0.9"])
    run(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the run went on
    total = {k: sum(r.get(f"reward_faults/{k}", 0) for r in rows) for k in
             ("exception", "non_finite", "not_a_number", "timeout")}
    assert total["timeout"] == 1  # the one hang, killed at its limit
    assert total["exception"] > 0 and total["non_finite"] > 0 and total["not_a_number"] > 0
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 < r["reward_invalid_frac"] < 0.9
    log = (tmp_path / "run" / "reward_faults.log").read_text()
    assert "first reward fault of kind 'exception'" in log and "ValueError: cannot score" in log
    assert log.count("first reward fault of kind 'exception':") == 1  # only the first of each kind (training)
    assert log.count("first reward fault of kind 'exception' (evaluation):") == 1  # and of the evaluations


def test_invalid_samples_do_not_reach_the_loss():
    from offpolicy.rewards.guard import Scored
    from offpolicy.rollout.workflow import Sampling, single_turn
    from offpolicy.train.tiny import build_model, build_tokenizer
    from offpolicy.data.arithmetic import generate
    from offpolicy.rollout.engine import HFEngine

    tok = build_tokenizer()
    model = build_model(len(tok), hidden=32, layers=1, heads=2, intermediate=64)
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    scorer = lambda pairs: [Scored(None, "exception") if i % 2 else Scored(1.0) for i in range(len(pairs))]  # noqa: E731
    exps = single_turn(engine, tok, generate("train", 2, seed=0), scorer, sampling=Sampling(group_size=4,
                                                                                            max_new_tokens=3))
    bad = [e for i, e in enumerate(exps) if i % 2]
    assert all(e.response_mask.sum() == 0 and e.info["reward_fault"] == "exception" for e in bad)
    assert len({e.group_id for e in bad}) == len(bad)  # each alone: no effect on others' baselines
    assert all(e.response_mask.sum() > 0 for i, e in enumerate(exps) if i % 2 == 0)


def test_too_many_invalid_rewards_stop_with_a_clear_error_and_a_checkpoint(tmp_path):
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path}", "train.steps=3", "reward.timeout_s=null",
                             "reward.function=faulty_rewards:always_raises"])
    with pytest.raises(RewardFaultError, match=r"100% of the samples have faulty rewards.*max_invalid_frac"):
        run(cfg, log=lambda *a: None)
    assert latest_checkpoint(tmp_path) is not None


def _nan_loss(logp_BT, inputs, **_):
    return LossOut(logp_BT * math.nan, {})


def test_nan_loss_skips_steps_then_stops_after_a_checkpoint(tmp_path, capsys):
    if "nan_test" not in __import__("offpolicy.algos", fromlist=["PRESETS"]).PRESETS:
        register("policy_loss", "nan_test", _nan_loss)
        register("preset", "nan_test", Preset(("group_mean", {}), ("nan_test", {}), ("token_mean", {})))
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path}", "train.steps=10", "algorithm.preset=nan_test",
                             "train.max_skipped_steps=2"])
    from offpolicy.rollout.model import load_policy

    start = load_policy("bundled")[0].state_dict()
    with pytest.raises(NumericalFaultError, match=r"3 consecutive steps with a non-finite loss"):
        run(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path, "train")
    assert [r["skipped_steps"] for r in rows] == [1, 1, 1]
    assert "optimiser step skipped" in capsys.readouterr().out
    ckpt = latest_checkpoint(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(saved[k], start[k]) for k in saved)  # the last good state: untouched weights


@pytest.mark.parametrize("overrides, message", [
    (["rollout.group_size=1"], r"rollout.group_size=1: group-relative advantages need at least 2"),
    (["pipeline.mode=async", "pipeline.sync_offset=3", "pipeline.max_staleness=2"],
     r"pipeline.max_staleness=2 is below what pipeline.sync_offset=3"),
    (["pipeline.sync_offset=2"], r"pipeline.sync_offset / pipeline.sync_interval need pipeline.mode=async"),
    (["train.lr=-1"], r"train.lr: Input should be greater than 0"),
    (["rollout.temperature=hot"], r"rollout.temperature"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_and_malformed_model_folder(tmp_path, capsys):
    assert main(["train", "model.path=/nonexistent/model", f"run.dir={tmp_path / 'a'}"]) == 2
    assert "model.path: /nonexistent/model is not a directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    assert main(["train", f"model.path={bad}", f"run.dir={tmp_path / 'b'}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (bad / "config.json").write_text("{not json")
    assert main(["train", f"model.path={bad}", f"run.dir={tmp_path / 'c'}"]) == 2
    assert f"model.path: cannot load {bad}" in capsys.readouterr().err


def test_unknown_reward_and_preset_fail_before_any_compute(tmp_path, capsys):
    assert main(["train", "reward.function=exact_mach", f"run.dir={tmp_path}"]) == 2
    assert "unknown reward 'exact_mach'" in capsys.readouterr().err
    assert main(["train", "algorithm.loss_params={eps_hgh: 0.3}", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'eps_hgh'" in err and "did you mean 'eps_high'" in err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": 4\n', r"rows.jsonl:2: not valid JSON"),
    ('{"prompt": "1+2=", "answer": "3"}\n\n{"question": "2+2=", "answer": "4"}\n',
     r"rows.jsonl:3: missing field 'prompt'"),
    ('["1+2=", "3"]\n', r"rows.jsonl:1: expected a JSON object"),
])
def test_bad_dataset_rows_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "rows.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        from offpolicy.pipeline.context import task_source

        task_source(load_config(None, ["tasks.name=jsonl", f"tasks.train_path={f}"]))


def test_jsonl_tasks_train_end_to_end(tmp_path):
    rows = "\n".join(json.dumps({"q": f"{a}+{b}=", "a": str(a + b)}) for a in range(10, 20) for b in range(10, 14))
    (tmp_path / "t.jsonl").write_text(rows + "\n")
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path / 'run'}", "train.steps=2", "tasks.name=jsonl",
                             f"tasks.train_path={tmp_path / 't.jsonl'}", "tasks.prompt_key=q", "tasks.answer_key=a"])
    res = run(cfg, log=lambda *a: None)
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2]
    assert 0.0 <= res.eval_after["accuracy"] <= 1.0
