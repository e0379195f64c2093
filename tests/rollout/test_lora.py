"""LoRA through PEFT: only the adapter trains, the KL reference is the adapter-disabled base, saved and
reloaded policies (adapter, merged folder, checkpoint) give the log-probs of the trained one, resume
continues exactly, and the asynchronous explorer receives the adapter (async at staleness 0 = sync)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from offpolicy.config import ConfigError, load_config
from offpolicy.data.experience import collate
from offpolicy.pipeline import run
from offpolicy.pipeline.context import build_context
from offpolicy.pipeline.explorer import Explorer
from offpolicy.rollout.model import (AdapterDisabled, is_lora, load_adapter, load_policy, policy_from_config,
                                     save_policy)
from offpolicy.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from offpolicy.train.metrics import read_metrics
from offpolicy.train.step import response_logp, train_step

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0",
         "run.progress=false", "run.loggers=[]", "train.threads=1",
         "reward.timeout_s=null"]
# a large learning rate, so that a few steps move the adapter far enough for the checks below to mean something
LORA = [*SMALL, "model.lora.r=4", "model.lora.alpha=8", "train.lr=0.02", "algorithm.kl_coef=0.05"]


def _logp(model, batch):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = response_logp(model, batch)[0]
    model.train(was)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA policy after 3 training steps (the trainer's own step), and the last batch."""
    cfg = load_config(None, [*LORA, f"run.dir={tmp_path_factory.mktemp('lora')}"])
    ctx = build_context(cfg)
    explorer = Explorer.from_context(ctx)
    try:
        for step in range(3):
            exps, _ = explorer.explore(step, step)
            batch = collate(exps, ctx.tokenizer.pad_token_id)
            stats = train_step(ctx.model, ctx.optimizer, batch, ctx.algo, ctx.plan, ref_model=ctx.ref_model,
                               step=step + 1)
            assert stats["skipped_steps"] == 0
    finally:
        explorer.close()
    return cfg, ctx, collate(exps, ctx.tokenizer.pad_token_id)


def test_only_the_adapter_is_optimised_and_the_reference_is_the_base(trained):
    cfg, ctx, batch = trained
    names = {id(p): n for n, p in ctx.model.named_parameters()}
    optimised = [names[id(p)] for g in ctx.optimizer.param_groups for p in g["params"]]
    assert optimised and all(".lora_A." in n or ".lora_B." in n for n in optimised)
    assert sum(p.numel() for p in ctx.model.parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in ctx.model.parameters())
    assert isinstance(ctx.ref_model, AdapterDisabled)  # no second copy of the model
    base, _ = load_policy("bundled")
    trained_logp, base_logp = _logp(ctx.model, batch), _logp(base, batch)
    m = batch.mask_BT.bool()
    assert (trained_logp - base_logp)[m].abs().max() > 1e-2  # the adapter did change the policy
    ref_logp = response_logp(ctx.ref_model, batch)[0]
    torch.testing.assert_close(ref_logp[m], base_logp[m], atol=1e-6, rtol=0)
    assert is_lora(ctx.model)  # the adapter is on again after the reference forward
    torch.testing.assert_close(_logp(ctx.model, batch), trained_logp, atol=0, rtol=0)


def test_saved_adapter_and_merged_folder_reload_to_the_same_logprobs(trained, tmp_path):
    cfg, ctx, batch = trained
    want = _logp(ctx.model, batch)
    m = batch.mask_BT.bool()
    save_policy(ctx.model, ctx.tokenizer, tmp_path / "final")

    merged, tok = load_policy(str(tmp_path / "final"))  # a plain folder: no PEFT involved
    assert not is_lora(merged)
    assert not any("lora" in k for k in load_file(tmp_path / "final" / "model.safetensors"))
    # merging B @ A into W rounds differently from applying them apart: ~1e-5 on log-probs of ~7 nats; a
    # wrong merge moves them by the adapter's effect (> 1e-2, checked above)
    torch.testing.assert_close(_logp(merged, batch)[m], want[m], atol=3e-5, rtol=0)

    adapted = load_adapter(load_policy("bundled")[0], tmp_path / "final" / "adapter")
    torch.testing.assert_close(_logp(adapted, batch)[m], want[m], atol=1e-5, rtol=0)


def test_checkpoint_holds_the_adapter_and_restores_it_exactly(trained, tmp_path):
    cfg, ctx, batch = trained
    path = save_checkpoint(tmp_path, 3, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                           state={}, generators={})
    assert (path / "adapter.safetensors").is_file() and not (path / "model.safetensors").exists()
    saved = load_file(path / "adapter.safetensors")
    assert saved and all("lora_" in k for k in saved)

    model, _ = policy_from_config(cfg.model)  # a fresh adapter (random A), as a resumed run builds it
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    load_checkpoint(path, model=model, optimizer=opt, scheduler=None, generators={})
    torch.testing.assert_close(_logp(model, batch), _logp(ctx.model, batch), atol=0, rtol=0)
    assert opt.state_dict()["state"].keys() == ctx.optimizer.state_dict()["state"].keys()

    plain, _ = load_policy("bundled")
    with pytest.raises(ValueError, match="LoRA"):
        load_checkpoint(path, model=plain, optimizer=opt, scheduler=None, generators={})


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))} for r in rows]


def test_lora_run_resumes_exactly_and_async_explorer_gets_the_adapter(tmp_path):
    args = [*LORA, "train.steps=4", "checkpoint.every=2"]
    a = tmp_path / "sync"
    run(load_config(None, [*args, f"run.dir={a}"]), log=lambda *x: None)
    reference = read_metrics(a)
    assert (a / "final" / "adapter" / "adapter_model.safetensors").is_file()
    final = load_file(a / "final" / "model.safetensors")

    shutil.rmtree(latest_checkpoint(a))  # back to the checkpoint of step 2, as after a crash
    shutil.rmtree(a / "final")
    run(load_config(None, [*args, f"run.dir={a}"]), resume=True, log=lambda *x: None)
    assert _comparable(read_metrics(a)) == _comparable(reference)
    resumed = load_file(a / "final" / "model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)

    b = tmp_path / "async"
    run(load_config(None, [*args, f"run.dir={b}", "pipeline.mode=async", "pipeline.explorer_threads=1"]),
        log=lambda *x: None)
    assert _comparable(read_metrics(b)) == _comparable(reference)
    rows = read_metrics(b, "train")
    assert all(r["staleness_max"] == 0 for r in rows)
    async_final = load_file(b / "final" / "model.safetensors")
    assert all(torch.equal(final[k], async_final[k]) for k in final)


def test_missing_peft_is_a_clear_config_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match="pip install"):
        policy_from_config(load_config(None, ["model.lora.r=4"]).model)


def test_unknown_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="model.lora"):
        policy_from_config(load_config(None, ["model.lora.r=4", "model.lora.target_modules=[no_such_proj]"]).model)
