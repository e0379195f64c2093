"""What a run shows: timestamped lines as it goes when stdout is a file (SLURM, nohup), the same lines in
run.log, a one-screen summary, the resolved config in config.yaml, errors last; resume reports or refuses
changed settings; a training file is not called held-out; eval prints one unwrapped line."""

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from offpolicy.cli import _eval_label, _RunConsole, _summary, main
from offpolicy.config import load_config

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "run.loggers=[]",
         "run.save_final=false", "train.threads=1"]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ")
TESTS = Path(__file__).resolve().parent


def gated(response: str, truth: str) -> float:
    """Scores normally for $OFFPOLICY_TEST_CALLS calls, then waits for the file $OFFPOLICY_TEST_GATE: the run
    stands still until the test has read what it printed so far."""
    count = Path(os.environ["OFFPOLICY_TEST_GATE"] + ".calls")
    with count.open("a") as f:
        f.write(".")
    if count.stat().st_size > int(os.environ["OFFPOLICY_TEST_CALLS"]):
        deadline = time.monotonic() + 120
        while not os.path.exists(os.environ["OFFPOLICY_TEST_GATE"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    return float(response == truth)


def always_raises(response: str, truth: str) -> float:
    raise RuntimeError("reward backend is down")


def _cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "offpolicy.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_a_run_writing_to_a_file_prints_step_and_evaluation_lines_as_it_goes(tmp_path):
    gate, run_dir = tmp_path / "gate", tmp_path / "run"
    proc = _cli("train", f"run.dir={run_dir}", "train.steps=3", "eval.every=1", "run.log_every=1",
                "reward.function=test_logging:gated", "reward.timeout_s=null", *SMALL,
                env={"OFFPOLICY_TEST_GATE": str(gate), "OFFPOLICY_TEST_CALLS": str(8 + 16 + 8)})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x.rstrip("\n")) for x in proc.stdout], daemon=True)
    reader.start()
    seen = []
    try:  # step 2's batch waits on the gate: step 1 and its evaluation must be out before it opens
        while not any(x.startswith("eval  step 1/3", 21) for x in seen if STAMP.match(x)):
            seen.append(lines.get(timeout=120))
        assert proc.poll() is None  # still running: the lines came as they were written
    finally:
        gate.touch()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=30)
    while not lines.empty():
        seen.append(lines.get_nowait())
    stamped = [x[21:] for x in seen if STAMP.match(x)]
    steps = [x for x in stamped if re.match(r"step \d+/", x)]
    evals = [x for x in stamped if x.startswith("eval  ")]
    assert [s.split("  ")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert re.fullmatch(r"step 1/3  reward \d\.\d{3}  accuracy \d\.\d{3}  entropy \d\.\d{3}  staleness 0\.00  "
                        r"step \d+\.\d\d s", steps[0])
    assert [e.split("  ")[1] for e in evals] == ["step 0/3", "step 1/3", "step 2/3", "step 3/3"]
    assert re.fullmatch(r"eval  step 0/3  held-out accuracy \d\.\d{3}  \(\d+\.\d s\)", evals[0])
    text = "\n".join(seen)
    assert "\x1b[" not in text and "━" not in text  # no bar, no colour codes in a file
    # the summary is one screen, not the config JSON; the whole config is in the run directory
    assert len(seen[: next(i for i, x in enumerate(seen) if "run directory:" in x)]) < 25 and '"model": {' not in text
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == json.loads((run_dir / "config.json").read_text())
    # every stamped line is also in run.log, in order
    log = (run_dir / "run.log").read_text().splitlines()
    assert [x for x in log if STAMP.match(x)] == [x for x in seen if STAMP.match(x)]


def test_the_error_is_the_last_thing_printed_and_in_run_log(tmp_path):
    proc = _cli("train", f"run.dir={tmp_path}", "train.steps=3", "eval.every=0",
                "reward.function=test_logging:always_raises", "reward.timeout_s=null", *SMALL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3
    last = out.rstrip().splitlines()
    assert last[-2].startswith("offpolicy: stopped: batch 0: 100% of the samples have faulty rewards")
    assert last[-1] == "(no checkpoint: the run stopped before its first step)" or "last good state" in last[-1]
    assert out.count("Traceback") == out.count("first reward fault of kind 'exception'")  # only the reward's own
    assert (tmp_path / "run.log").read_text().rstrip().splitlines()[-1].startswith(
        "error: RewardFaultError: batch 0: 100% of the samples have faulty rewards")


def test_resume_refuses_changed_settings_unless_allowed_and_then_lists_them(tmp_path, capsys):
    args = [f"run.dir={tmp_path}", "eval.every=0", "run.progress=false", "checkpoint.every=1", *SMALL]
    assert main(["train", "train.steps=2", *args]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "train.lr=0.001", "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"resuming {tmp_path} with settings that differ from its config.json:" in err
    assert "train.lr: 0.0003 -> 0.001" in err and "train.steps: 2 -> 3" in err and "--allow-changed-config" in err
    assert main(["train", "train.steps=3", *args]) == 2  # the automatic resume of run.dir checks the same
    assert "train.steps: 2 -> 3" in capsys.readouterr().err
    assert main(["train", "--allow-changed-config", "train.steps=3", *args]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed setting: train.steps: 2 -> 3" in out
    assert "resuming with a changed setting: train.steps: 2 -> 3" in (tmp_path / "run.log").read_text()
    assert main(["train", "--resume", str(tmp_path), "run.log_every=5"]) == 0  # display settings may change


def test_a_training_file_used_for_evaluation_is_not_called_held_out(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    same = load_config(None, ["tasks.name=file", f"tasks.train_path={f}"])
    assert _eval_label(same) == "training-set" and "8 training-set tasks" not in _summary(same, False)
    # before the file is read only the bound is known
    assert "evaluation on up to 512 training-set tasks (no tasks.eval_path)" in _summary(same, False)
    assert _eval_label(load_config(None, ["tasks.name=file", f"tasks.train_path={f}", "tasks.eval_path=x.jsonl"])) \
        == "held-out"
    assert _eval_label(load_config(None, ["tasks.name=hf", f"tasks.train_path={f}", "tasks.eval_split=test"])) \
        == "held-out"
    assert _eval_label(load_config(None, [])) == "held-out"  # generated tasks: the evaluation split is apart
    pairs = ["tasks.name=pairs", f"tasks.train_path={f}", "algorithm.preset=dpo", "rollout.group_size=2"]
    assert _eval_label(load_config(None, pairs)) == "training-set"  # the first training pairs
    assert _eval_label(load_config(None, [*pairs, "tasks.eval_path=x.jsonl"])) == "held-out"


def test_the_final_line_counts_the_rows_evaluated_not_tasks_eval_size(tmp_path, capsys):
    from offpolicy.data.pairs import arithmetic_pairs, write_pairs

    rows = "".join(f'{{"prompt": "{a}+{a}=", "answer": "{2 * a}"}}\n' for a in range(10))
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "held.jsonl").write_text(rows)
    one = ["train.steps=1", "eval.every=0", "run.progress=false", *SMALL, "tasks.eval_size=512"]
    assert main(["train", "tasks.name=file", f"tasks.train_path={tmp_path / 'train.jsonl'}",
                 f"tasks.eval_path={tmp_path / 'held.jsonl'}", f"run.dir={tmp_path / 'file'}", *one]) == 0
    out = capsys.readouterr().out
    assert "evaluation on up to 512 held-out tasks" in out and "greedy accuracy on 10 held-out tasks" in out
    train = write_pairs(tmp_path / "pairs.jsonl", arithmetic_pairs("train", 64, seed=0))
    evals = write_pairs(tmp_path / "eval.jsonl", arithmetic_pairs("eval", 20, seed=0))
    dpo = ["algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={train}", *one, "rollout.group_size=2"]
    assert main(["train", *dpo, f"tasks.eval_path={evals}", f"run.dir={tmp_path / 'dpo'}"]) == 0
    assert "preference accuracy on 20 held-out pairs" in capsys.readouterr().out
    assert main(["train", *dpo, "tasks.eval_size=16", f"run.dir={tmp_path / 'dpo_train'}"]) == 0
    out = capsys.readouterr().out
    assert "evaluation on up to 16 training-set pairs (no tasks.eval_path)" in out
    assert "preference accuracy on 16 training-set pairs (no tasks.eval_path)" in out


def test_the_summary_is_one_screen_with_the_changed_keys():
    text = _summary(load_config(None, ["train.steps=7", "algorithm.preset=dapo", "tasks.eval_size=16"]), False)
    lines = text.splitlines()
    assert len(lines) < 25 and lines[0].startswith("offpolicy train: dapo on arithmetic")
    assert "  train.steps = 7" in lines and "  algorithm.preset = 'dapo'" in lines and "  tasks.eval_size = 16" in lines
    assert not any("train.lr" in x for x in lines)  # defaults are not repeated


def test_a_live_bar_only_on_a_terminal(monkeypatch):
    cfg = load_config(None, [])
    assert not _RunConsole(cfg).live  # pytest's stdout is not a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert _RunConsole(cfg).live and not _RunConsole(load_config(None, ["run.progress=false"])).live


def test_eval_prints_one_unwrapped_line(capsys):
    assert main(["eval", "--limit", "4", "--k", "2", "tasks.eval_size=4"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and len(out) > 100
    assert "4 held-out arithmetic tasks, reward exact_match, max 5 new tokens  greedy accuracy" in out
