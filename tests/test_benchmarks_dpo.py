"""benchmarks/vs_trl_dpo.py --dry-run: TRL's DPOTrainer and offpolicy train a few steps on the same pairs in
the same order, and (the point of the benchmark) compute the same thing: the token ids are checked pair by
pair inside the TRL worker, and the held-out preference accuracy and mean margin agree at every evaluation."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_trl_dpo.py"


def test_dry_run_both_sides_compute_the_same_dpo(tmp_path):
    spec = importlib.util.spec_from_file_location("vs_trl_dpo", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--dry-run", "--out", str(tmp_path)])
    assert set(result["runs"]) == {"trl", "trl_precompute", "offpolicy"}
    evals = {name: runs[0]["evals"] for name, runs in result["raw"].items()}
    assert [e["step"] for e in evals["offpolicy"]] == [0, 4, 8]
    for name in ("trl", "trl_precompute"):
        assert [e["step"] for e in evals[name]] == [0, 4, 8]
        for a, b in zip(evals[name], evals["offpolicy"]):
            assert a["preference_accuracy"] == pytest.approx(b["preference_accuracy"], abs=1 / 32 + 1e-9)
            assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-3, abs=1e-4)
    assert evals["offpolicy"][0]["preference_accuracy"] == 0.5 and evals["offpolicy"][-1]["reward_margin"] > 0.1
    assert all(len(runs[0]["steps"]) == 8 for runs in result["raw"].values())
    assert "| offpolicy |" in (tmp_path / "summary.md").read_text()
