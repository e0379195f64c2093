"""End-to-end: the CLI trains the bundled model for a few steps and leaves a usable run directory."""

import json

import pytest
import torch

from offpolicy.cli import main
from offpolicy.train.metrics import read_metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    rc = main(["train", f"run.dir={d}", "train.steps=3", "eval.every=2", "tasks.eval_size=16",
               "rollout.prompts_per_step=4", "rollout.group_size=4", "run.progress=false"])
    assert rc == 0
    return d


def test_metrics_file_has_one_line_per_step_and_evals(run_dir):
    train = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in train:
        for key in ("reward_mean", "accuracy", "entropy", "response_len", "gen_s", "train_s", "tokens_per_s",
                    "loss", "grad_norm", "loss/ratio_is_one"):
            assert key in r, key
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["entropy"] > 0 and r["gen_s"] > 0 and r["train_s"] > 0
        assert r["loss/ratio_is_one"] == 1.0  # on-policy, single pass: the ratio is exactly 1
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").iterdir())


def test_resolved_config_and_final_checkpoint(run_dir):
    from transformers import AutoModelForCausalLM

    from offpolicy.rollout.model import BUNDLED, load_policy

    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["steps"] == 3 and cfg["algorithm"]["preset"] == "grpo"
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    start = AutoModelForCausalLM.from_pretrained(BUNDLED)
    moved = [not torch.equal(a, b) for a, b in zip(final.parameters(), start.parameters())]
    assert any(moved)  # the saved weights are the trained ones, not a copy of the start
    model, tok = load_policy(str(run_dir / "final"))
    assert tok.decode(tok("37+48=")["input_ids"], skip_special_tokens=True) == "37+48="


def test_eval_command_reports_accuracy_and_pass_at_k(run_dir, capsys):
    assert main(["eval", "--model", str(run_dir / "final"), "--k", "4", "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "pass@4" in out


def test_bad_config_exits_with_a_named_error(capsys):
    assert main(["train", "train.stepz=3"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["train", "algorithm.preset=grpoo", "run.progress=false"]) == 2
    assert "grpo" in capsys.readouterr().err


def test_a_wrong_loss_parameter_value_fails_before_the_model_loads(tmp_path):
    """A wrong ``ratio_to`` names the value and the valid ones, with no traceback, before any model load or
    run directory; measured in a fresh process so that "before the model loads" is observable."""
    import subprocess
    import sys

    code = ("import sys, transformers; from offpolicy.cli import main; "
            "loads = []; orig = transformers.AutoModelForCausalLM.from_pretrained; "
            "transformers.AutoModelForCausalLM.from_pretrained = lambda *a, **k: loads.append(a) or orig(*a, **k); "
            f"rc = main(['train', 'algorithm.loss_params.ratio_to=bhav', 'run.dir={tmp_path / 'r'}']); "
            "print('loads', len(loads)); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "ratio_to='bhav' is not valid; valid: ['old', 'behav']" in out.stderr
    assert "Traceback" not in out.stderr and "loads 0" in out.stdout
    assert not (tmp_path / "r").exists()


def test_presets_command_lists_and_describes(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "decoupled_ppo" in out and "behav_logp,old_logp" in out and "replay,kl_convex,reincarnation_step" in out
    assert main(["presets", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "ppo_clip(eps_low=0.2, eps_high=0.2, dual_clip=3.0, ratio_to='old')" in out
    assert "reads:       old_logp" in out and "arXiv 2402.03300" in out
    assert main(["presets", "grop"]) == 2
    assert "did you mean 'grpo'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.replay.mix_prob=0.3"], "algorithm.replay.mix_prob: preset 'grpo' has no replay recipe"),
    (["algorithm.preset=remix", "algorithm.kl_coef=0", "algorithm.kl_convex.start=10"],
     "algorithm.kl_convex shapes the KL term, but algorithm.kl_coef=0"),
    (["algorithm.reincarnation_step=5"], "preset 'grpo' has no reincarnation recipe"),
    (["algorithm.preset=spear"], "its tool_reward recipe counts tool calls, which a single_turn workflow never makes"),
    (["algorithm.extra_params.mix_prob=0.3"], "unknown config key 'algorithm.extra_params'"),
])
def test_recipe_settings_nothing_acts_on_are_rejected(overrides, message, capsys, tmp_path):
    assert main(["train", f"run.dir={tmp_path}", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
