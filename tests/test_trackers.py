"""Experiment trackers in their offline / local modes hold the run's config and metrics: a W&B offline run,
an MLflow file store and a Trackio local project, each from ``offpolicy train run.loggers=[...]``. Skipped,
with the reason, when the tracker's extra is not installed (``pip install 'offpolicy[wandb]'`` etc.)."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from offpolicy.cli import main
from offpolicy.train.metrics import read_metrics

SMALL = ["train.steps=3", "eval.every=0", "rollout.prompts_per_step=4", "rollout.group_size=4",
         "tasks.eval_size=8", "run.progress=false", "run.save_final=false", "train.threads=1"]


def _needs(module: str, extra: str):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'offpolicy[{extra}]')")


def _wandb_records(path):
    """The records of a W&B run file (``run-<id>.wandb``): a LevelDB-style log of protobuf ``Record``s in
    32 KiB blocks, after a 7-byte header (the format wandb's own reader used, kept here since the SDK dropped it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, else middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_a_wandb_offline_run_holds_the_config_and_every_step(tmp_path, monkeypatch):
    _needs("wandb", "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    assert main(["train", f"run.dir={run_dir}", "run.loggers=[wandb]", "run.project=offpolicy-test", *SMALL]) == 0
    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = {}, {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.run.config.update}
            assert r.run.project == "offpolicy-test" and r.run.display_name == "run"
    assert config["train"]["steps"] == 3 and config["algorithm"]["preset"] == "grpo"
    expected = {r["step"]: r for r in read_metrics(run_dir, "train")}
    assert sorted(s for s, row in history.items() if "train/reward_mean" in row) == [1, 2, 3]
    for step, r in expected.items():
        assert history[step]["train/reward_mean"] == pytest.approx(r["reward_mean"])
        assert history[step]["train/loss"] == pytest.approx(r["loss"])
    evals = {r["step"]: r["accuracy"] for r in read_metrics(run_dir, "eval")}
    assert {s: history[s]["eval/accuracy"] for s in evals} == pytest.approx(evals)  # before (0) and after (3)


def test_an_mlflow_file_store_holds_the_config_and_every_step(tmp_path, monkeypatch):
    _needs("mlflow", "mlflow")
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    run_dir = tmp_path / "run"
    assert main(["train", f"run.dir={run_dir}", "run.loggers=[mlflow]", "run.project=offpolicy-test", *SMALL]) == 0
    mlflow.set_tracking_uri(store.as_uri())
    runs = mlflow.search_runs(experiment_names=["offpolicy-test"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["train.steps"] == "3" and run.data.params["algorithm.preset"] == "grpo"
    client = mlflow.MlflowClient(store.as_uri())
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/reward_mean")}
    assert history == pytest.approx({r["step"]: r["reward_mean"] for r in read_metrics(run_dir, "train")})
    ratio = client.get_metric_history(run.info.run_id, "train/loss.ratio_is_one")  # beside train/loss: dotted
    assert [m.value for m in ratio] == [1.0, 1.0, 1.0]
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/accuracy")}
    assert evals == pytest.approx({r["step"]: r["accuracy"] for r in read_metrics(run_dir, "eval")})


def test_a_trackio_local_project_holds_every_step(tmp_path):
    _needs("trackio", "trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}  # read when trackio is imported: a fresh process
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", f"run.dir={run_dir}", "run.loggers=[trackio]",
           "run.project=offpolicy-test", *SMALL]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs('offpolicy-test', 'run')))")
    logs = json.loads(subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True,
                                     timeout=120, check=True).stdout)
    by_step = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for r in read_metrics(run_dir, "train"):
        assert by_step[r["step"]]["train/reward_mean"] == pytest.approx(r["reward_mean"])


def test_a_missing_tracker_names_its_extra_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", f"run.dir={tmp_path / 'run'}", "run.loggers=[tensorboard,wandb]", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "run.loggers: wandb needs the wandb package, which is not installed: pip install 'offpolicy[wandb]'" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_a_config_error_with_a_suggestion(capsys):
    assert main(["train", "run.loggers=[tensorbord]"]) == 2
    assert "unknown logger 'tensorbord'; did you mean 'tensorboard'?" in capsys.readouterr().err
