"""examples/gsm8k_*.yaml validate and say what docs/gsm8k.md says they say."""

from pathlib import Path

import pytest

from offpolicy.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name, preset", [("gsm8k_rec.yaml", "rec_oneside_nois"), ("gsm8k_grpo.yaml", "grpo")])
def test_gsm8k_examples_validate(name, preset, tmp_path, gsm8k_data):
    cfg = load_config(EXAMPLES / name, [f"model.path={tmp_path}"])
    assert cfg.algorithm.preset == preset and cfg.model.path == str(tmp_path)
    assert (cfg.model.device, cfg.model.dtype, cfg.model.autocast) == ("cuda", "float32", "bfloat16")
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (96, 8, 1024)
    assert (cfg.train.lr, cfg.pipeline.mode, cfg.pipeline.sync_interval, cfg.staleness_bound) == (1e-6, "async", 20, 19)
    assert cfg.reward.function == "math" and cfg.tasks.eval_path.endswith("gsm8k/test.jsonl")
    assert cfg.tasks.eval_size == 1319 and cfg.tasks.chat_template == "auto"
