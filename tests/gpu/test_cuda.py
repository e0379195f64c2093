"""The CUDA path: a bf16 policy and its batches on the GPU, full fine-tuning and LoRA. Skipped without CUDA."""

import math

import pytest
import torch

from offpolicy.config import load_config
from offpolicy.data.experience import collate
from offpolicy.pipeline import run
from offpolicy.pipeline.context import build_context
from offpolicy.pipeline.explorer import Explorer
from offpolicy.rollout.model import load_policy, save_policy
from offpolicy.train.metrics import read_metrics
from offpolicy.train.step import response_logp, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4", "tasks.eval_size=32", "eval.every=0",
         "run.progress=false", "run.loggers=[]", "reward.timeout_s=null", f"model.device={DEVICE}",
         "model.dtype=bfloat16"]


def _steps(cfg, n):
    """``n`` trainer steps on fresh rollouts; (context, last batch, per-step stats)."""
    ctx = build_context(cfg)
    explorer = Explorer.from_context(ctx)
    stats = []
    try:
        for step in range(n):
            exps, _ = explorer.explore(step, step)
            batch = collate(exps, ctx.tokenizer.pad_token_id)  # built on the CPU; the step moves it
            stats.append(train_step(ctx.model, ctx.optimizer, batch, ctx.algo, ctx.plan, ref_model=ctx.ref_model,
                                    step=step + 1))
    finally:
        explorer.close()
    return ctx, batch, stats


def _device_logp(model, batch):
    from offpolicy.train.step import _to_device

    with torch.no_grad():
        return response_logp(model, _to_device(batch, next(model.parameters()).device))[0]


@pytest.mark.parametrize("extra", [[], ["model.lora.r=8", "algorithm.kl_coef=0.05"],
                                   ["model.gradient_checkpointing=true"]], ids=["full", "lora", "checkpointing"])
def test_bf16_steps_on_the_gpu(tmp_path, extra):
    cfg = load_config(None, [*SMALL, "train.lr=1e-3", f"run.dir={tmp_path}", *extra])
    ctx, batch, stats = _steps(cfg, 4)
    p = next(ctx.model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    for s in stats:
        assert s["skipped_steps"] == 0 and math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"])
    logp = _device_logp(ctx.model, batch)
    assert logp.device.type == "cuda" and logp.dtype == torch.float32
    assert torch.isfinite(logp).all()
    if "model.lora.r=8" in extra:  # the adapter is float32 (PEFT casts it) and only it trains
        lora = [q for n, q in ctx.model.named_parameters() if q.requires_grad]
        assert lora and all(q.dtype == torch.float32 and q.device.type == "cuda" for q in lora)
        save_policy(ctx.model, ctx.tokenizer, tmp_path / "final")
        merged, _ = load_policy(str(tmp_path / "final"), device=DEVICE, dtype="bfloat16")
        m = batch.mask_BT.bool().to(logp.device)
        # bf16 weights: the merged W + BA is rounded to bf16, so agreement is to bf16 precision only
        torch.testing.assert_close(_device_logp(merged, batch)[m], logp[m], atol=0.1, rtol=0)


def test_run_on_the_gpu_learns_and_saves(tmp_path):
    cfg = load_config(None, [*SMALL, "train.steps=30", "train.lr=1e-4", f"run.dir={tmp_path}"])
    result = run(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path, "train")
    assert len(rows) == 30 and all(math.isfinite(r["loss"]) and 0 <= r["reward_mean"] <= 1 for r in rows)
    first = sum(r["reward_mean"] for r in rows[:10]) / 10
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    assert last >= first - 0.05 or result.eval_after["accuracy"] >= result.eval_before["accuracy"]
    model, _ = load_policy(str(tmp_path / "final"), device=DEVICE, dtype="bfloat16")
    assert next(model.parameters()).device.type == "cuda"
