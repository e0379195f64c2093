"""`offpolicy compare` and `offpolicy plot` at toy scale: both files are produced and parse."""

import json
import re

from PIL import Image

from offpolicy.cli import main


def test_compare_writes_dashboard_and_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--presets", "grpo", "rec_oneside_nois", "--seeds", "0", "1", "--out", str(out),
               "train.steps=3", "eval.every=2", "tasks.eval_size=16", "rollout.prompts_per_step=4",
               "rollout.group_size=4", "run.loggers=[]"])
    assert rc == 0
    with Image.open(out / "dashboard.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 300
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    assert rows[0].startswith("| run |") and len(rows) == 2 + 2  # header, rule, one row per preset
    for row, preset in zip(rows[2:], ["grpo", "rec_oneside_nois"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == preset and cells[1] == "2"
        assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cells[3])
    # plot redraws the same runs
    assert main(["plot", *map(str, sorted(out.glob("grpo-s*"))), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "grpo" in capsys.readouterr().out


def test_compare_variants_run_every_preset_under_every_setting(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--presets", "grpo", "--seeds", "0", "--out", str(out), "--variant", "base",
               "--variant", "m2 train.updates_per_batch=2", "train.steps=2", "eval.every=0",
               "tasks.eval_size=8", "rollout.prompts_per_step=4", "rollout.group_size=4", "run.loggers=[]"])
    assert rc == 0
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| grpo")]
    assert [r.split("|")[1].strip() for r in rows] == ["grpo base", "grpo m2"]
    m2 = [json.loads(line) for line in (out / "grpo-m2-s0" / "metrics.jsonl").read_text().splitlines()]
    assert {r["optimizer_steps"] for r in m2 if r["kind"] == "train"} == {2}
    assert main(["compare", "--presets", "grpo", "--variant", "oops=1", "--out", str(tmp_path / "x")]) == 2
    assert "LABEL key=value" in capsys.readouterr().err


def test_compare_rejects_a_bad_preset_before_running(tmp_path, capsys):
    assert main(["compare", "--presets", "grpo", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not any(tmp_path.glob("grpo-*/metrics.jsonl"))


def test_the_reference_reaches_its_own_mean_and_short_runs_get_curves(tmp_path):
    """The target is the reference's seed-mean final accuracy, read off seed-mean curves: the reference
    reaches it (a seed below the mean used to make it "never"); a run without eval.every gets ~10 points;
    the dashboard's curves include the training reward."""
    from offpolicy.pipeline.compare import run_compare
    from offpolicy.report import RunCurves, load_run, summary_table

    a = RunCurves("ref", 0, steps=[0, 10, 20], accuracy=[0.1, 0.3, 0.4], rollouts=[0, 100, 200], seconds=[0, 1, 2])
    b = RunCurves("ref", 1, steps=[0, 10, 20], accuracy=[0.1, 0.5, 0.6], rollouts=[0, 100, 200], seconds=[0, 3, 4])
    c = RunCurves("other", 0, steps=[0, 10, 20], accuracy=[0.1, 0.2, 0.3], rollouts=[0, 100, 200], seconds=[0, 1, 2])
    table, target = summary_table([a, b, c])
    rows = {r.split("|")[1].strip(): [x.strip() for x in r.strip("|").split("|")] for r in table.splitlines()[2:]}
    assert target == 0.5  # mean of 0.4 and 0.6
    assert rows["ref"][4:6] == ["200", "3.0"]  # mean curve 0.1, 0.4, 0.5: reached at the last evaluation
    assert rows["other"][4:6] == ["never", "never"]

    png, _ = run_compare(["grpo"], [0], tmp_path, overrides=["train.steps=3", "tasks.eval_size=8",
                                                               "rollout.prompts_per_step=4", "rollout.group_size=4",
                                                               "run.loggers=[]"], log=lambda *a: None)
    run = load_run(tmp_path / "grpo-s0")
    assert run.steps == [0, 1, 2, 3] and len(run.reward) == 3 and all(0 <= r <= 1 for r in run.reward)
