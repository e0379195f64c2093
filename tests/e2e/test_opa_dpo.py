"""OPA-DPO end to end on the bundled model (offpolicy opa-dpo): four stage folders with completion markers;
a stage that fails is redone on the rerun while the finished ones are skipped; the run raises held-out greedy
accuracy and preference accuracy by clear margins. Also the settings refused before any stage runs."""

import json
from pathlib import Path

import pytest

from offpolicy.cli import main
from offpolicy.config import ConfigError
from offpolicy.pipeline import opa_dpo
from offpolicy.pipeline.opa_dpo_config import load_opa_dpo_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "opa_dpo_tiny.yaml"
SMALL = ["opa_dpo.generate.prompts=1000", "tasks.eval_size=256", "opa_dpo.align.steps=60", "train.steps=60",
         "eval.every=0", "train.threads=1", "checkpoint.every=20"]


def test_a_failed_stage_resumes_from_the_last_finished_one_and_the_run_improves(tmp_path, monkeypatch):
    run_dir = tmp_path / "opa"
    args = ["opa-dpo", "--config", str(EXAMPLE), f"run.dir={run_dir}", *SMALL]

    def broken(*a, **k):
        raise RuntimeError("stage 3 crashed")

    monkeypatch.setattr(opa_dpo, "align_stage", broken)
    with pytest.raises(RuntimeError, match="stage 3 crashed"):
        main(args)
    done = [name for name in opa_dpo.STAGES if opa_dpo.stage_done(run_dir / name)]
    assert done == ["stage1_generate", "stage2_revise"]
    first = {name: (run_dir / name / "DONE.json").stat().st_mtime_ns for name in done}
    pairs = [json.loads(line) for line in (run_dir / "stage2_revise" / "train_pairs.jsonl").read_text().splitlines()]
    revised = [p for p in pairs if p["id"].endswith("/rev")]
    assert revised and all(len(p["chosen_weights"]) == len(p["chosen"]) + 1 for p in revised)  # chars + EOS
    # every revision changes some token: its span weighs 2.5 in y_rev (inserted / replaced) or y_gen (removed)
    assert all(2.5 in p["chosen_weights"] + p["rejected_weights"] for p in revised)

    monkeypatch.undo()  # the rerun must not generate or revise again
    for name in ("generate_stage", "revise_stage"):
        monkeypatch.setattr(opa_dpo, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    # ... and this time stage 4 fails after its DPO run has checkpointed (in the greedy evaluation after it)
    greedy, calls = opa_dpo.greedy_accuracy, []

    def greedy_fails_in_stage4(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first call is stage 3's
            raise RuntimeError("stage 4 crashed")
        return greedy(*a, **k)

    monkeypatch.setattr(opa_dpo, "greedy_accuracy", greedy_fails_in_stage4)
    with pytest.raises(RuntimeError, match="stage 4 crashed"):
        main(args)
    assert [n for n in opa_dpo.STAGES if opa_dpo.stage_done(run_dir / n)] == list(opa_dpo.STAGES[:3])
    monkeypatch.setattr(opa_dpo, "greedy_accuracy", greedy)
    monkeypatch.setattr(opa_dpo, "align_stage", lambda *a, **k: pytest.fail("align_stage ran again"))
    assert main(args) == 0
    assert "stage 4: resuming the DPO run" in (run_dir / "run.log").read_text()
    from offpolicy.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(run_dir / "stage4_dpo", "train")] == list(range(1, 61))  # none twice
    assert all(opa_dpo.stage_done(run_dir / name) for name in opa_dpo.STAGES)
    assert {name: (run_dir / name / "DONE.json").stat().st_mtime_ns for name in first} == first
    res = json.loads((run_dir / "result.json").read_text())
    assert res["resumed"] == ["stage1_generate", "stage2_revise", "stage3_align"]
    # measured 2026-12-02: greedy 0.44 (base) -> ~0.85 (aligned) -> ~0.8 (DPO); preference accuracy 0.5 -> ~0.9
    assert res["greedy_accuracy"] >= res["greedy_accuracy_base"] + 0.15
    assert res["preference_accuracy"] >= 0.75
    assert res["stages"]["stage4_dpo"]["preference_accuracy_before"] == 0.5
    assert res["pair_accuracy"] >= res["pair_accuracy_base"] + 0.3
    assert (run_dir / "stage3_align" / "model" / "config.json").is_file()
    assert (run_dir / "stage4_dpo" / "final" / "config.json").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["opa_dpo.revise.correctr=x"], "did you mean 'opa_dpo.revise.corrector'"),
    (["tasks.name=pairs", "tasks.train_path=x.jsonl"], "not tasks.name=pairs"),
    (["run.save_final=false"], "leave run.save_final=true"),
    (["opa_dpo.align.steps=-1"], "opa_dpo.align.steps"),
    (["reward.model=some/rm"], "reward.model=some/rm is read by no stage"),  # was accepted and ignored
])
def test_settings_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_opa_dpo_config(EXAMPLE, overrides)


def test_stage4_settings_are_refused_before_stage1_runs(tmp_path):
    cfg, raw = load_opa_dpo_config(EXAMPLE, [f"run.dir={tmp_path / 'r'}", "rollout.group_size=8"])
    with pytest.raises(ConfigError, match="(?s)stage 4.*group of two"):
        opa_dpo.run_opa_dpo(cfg, raw, echo=False)
    assert not (tmp_path / "r" / "stage1_generate").exists()
    cfg, raw = load_opa_dpo_config(None, [f"run.dir={tmp_path / 'r'}", "algorithm.preset=grpo"])
    with pytest.raises(ConfigError, match="does not train on preference pairs"):
        opa_dpo.run_opa_dpo(cfg, raw, echo=False)


def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path):
    run_dir = tmp_path / "r"
    cfg, raw = load_opa_dpo_config(EXAMPLE, [f"run.dir={run_dir}"])
    run_dir.mkdir()
    other, _ = load_opa_dpo_config(EXAMPLE, [f"run.dir={run_dir}", "train.lr=1e-4"])
    (run_dir / "opa_dpo.json").write_text(json.dumps({"raw": raw, "resolved": other.model_dump(mode="json")}))
    with pytest.raises(ConfigError, match=r"train.lr: 0.0001 -> 3e-05"):
        opa_dpo.run_opa_dpo(cfg, raw, echo=False)


def test_stage3_under_lora_trains_the_adapter_and_saves_a_merged_plain_folder(tmp_path):
    import torch

    from offpolicy.data.pairs import Pair
    from offpolicy.rollout.model import load_policy

    cfg, _ = load_opa_dpo_config(EXAMPLE, ["model.lora.r=4", "opa_dpo.align.steps=5", "opa_dpo.align.lr=1e-2",
                                           "tasks.eval_size=16"])
    (tmp_path / "rev").mkdir()
    (tmp_path / "rev" / "sft.jsonl").write_text("".join(
        json.dumps({"prompt": p, "response": r, "source": "gt"}) + "\n" for p, r in [("44+29=", "73"), ("48+15=", "63")]))
    out = tmp_path / "align"
    out.mkdir()
    pairs = [Pair("a", "44+29=", "73", "63"), Pair("b", "48+15=", "63", "53")]
    stats = opa_dpo.align_stage(cfg, tmp_path / "rev", out, lambda s: None, pairs)
    assert stats["lora"] and (out / "model" / "adapter" / "adapter_config.json").is_file()
    aligned, _ = load_policy(str(out / "model"))  # a plain folder: no PEFT needed to load it
    base, _ = load_policy("bundled:tiny-arith")
    moved = [n for (n, p), q in zip(aligned.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert moved and all("proj" in n for n in moved)  # only the adapted linear layers changed (merged)
    assert len([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]) == 5


def test_opa_dpo_run_gives_a_benchmark_its_numbers(tmp_path):
    tiny = ["opa_dpo.generate.prompts=64", "tasks.eval_size=32", "opa_dpo.align.steps=2", "train.steps=2",
            "rollout.prompts_per_step=8", "eval.every=0", "train.threads=1"]
    r = opa_dpo.opa_dpo_run(EXAMPLE, seed=3, overrides=tiny, run_dir=tmp_path / "b")
    for key in ("greedy_accuracy", "preference_accuracy", "greedy_accuracy_base", "greedy_accuracy_aligned",
                "pair_accuracy", "pair_accuracy_base", "seconds"):
        assert 0 <= r[key] <= (1 if key != "seconds" else 1e6), key
    saved = json.loads((tmp_path / "b" / "opa_dpo.json").read_text())
    assert saved["resolved"]["train"]["seed"] == 3 and r["run_dir"] == str(tmp_path / "b")


def test_stage1_answers_each_prompt_of_a_small_task_file_once(tmp_path):
    """A task file with fewer rows than opa_dpo.generate.prompts: each prompt once (its stream repeats the file
    epoch after epoch; taking 20 from it answered the same 5 prompts four times each)."""
    from offpolicy.data import arithmetic

    rows = [{"prompt": t.prompt, "answer": t.answer} for t in arithmetic.generate("train", 5, seed=0)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = load_opa_dpo_config(EXAMPLE, [f"run.dir={tmp_path / 'r'}", "tasks.name=file",
                                           f"tasks.train_path={tmp_path / 't.jsonl'}", "tasks.eval_size=2",
                                           "opa_dpo.generate.prompts=20", "opa_dpo.generate.samples=2"])
    said = []
    (tmp_path / "out").mkdir()
    opa_dpo.generate_stage(cfg, tmp_path / "out", said.append)
    ids = [json.loads(line)["task_id"] for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert len(ids) == 10 and len(set(ids)) == 5  # 5 prompts x 2 samples
    assert any("5 distinct prompts, fewer than opa_dpo.generate.prompts=20" in s for s in said)
