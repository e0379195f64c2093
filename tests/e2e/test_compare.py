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
