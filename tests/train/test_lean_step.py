"""The lean training-step options: train.optimizer_impl (fused / foreach / for_loop AdamW give the same update),
model.autocast (bf16 compute on float32 master weights: log-probs within a stated tolerance of float32; 'auto'
only where bf16 matrix units are detected) and train.compile (compiled log-probs equal eager ones)."""

import copy

import pytest
import torch

from offpolicy.pipeline.context import make_optimizer
from offpolicy.train.step import compile_forward, response_logp, train_step


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_batch):
    """The bundled model, its default algorithm and one demo batch (8 prompts x 4 samples)."""
    return demo_batch(tmp_path_factory.mktemp("lean"))


def _updated(cfg, ctx, batch, impl, steps=2):
    model = copy.deepcopy(ctx.model)
    opt, _ = make_optimizer(cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer_impl": impl})}),
                            model)
    for step in range(1, steps + 1):
        train_step(model, opt, batch, ctx.algo, ctx.plan, step=step)
    return opt, {k: v.detach() for k, v in model.named_parameters()}


def test_fused_foreach_and_for_loop_adamw_give_the_same_update(demo):
    cfg, ctx, batch = demo
    before = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}
    results = {impl: _updated(cfg, ctx, batch, impl) for impl in ("for_loop", "foreach", "fused", "auto")}
    opts = {impl: r[0] for impl, r in results.items()}
    assert opts["fused"].defaults["fused"] and opts["foreach"].defaults["foreach"]
    assert not opts["for_loop"].defaults["fused"] and opts["for_loop"].defaults["foreach"] is False
    assert opts["auto"].defaults["fused"]  # torch has a fused CPU kernel for float32
    ref = results["for_loop"][1]
    moved = max((ref[k] - before[k]).abs().max().item() for k in ref)
    assert moved > 1e-4  # two steps at lr 3e-4 moved the weights
    for impl in ("foreach", "fused", "auto"):
        for k, v in results[impl][1].items():
            torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0, msg=f"{impl}: {k}")


def test_auto_falls_back_to_torchs_own_choice_where_no_fused_kernel_exists_and_fused_is_refused(demo, monkeypatch):
    from offpolicy.config import ConfigError

    cfg, ctx, _ = demo
    real = torch.optim.AdamW

    def no_fused_kernel(params, **kw):  # as torch does for a device without the kernel
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    with_impl = lambda impl: cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer_impl": impl})})
    opt, _ = make_optimizer(with_impl("auto"), copy.deepcopy(ctx.model))
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is None
    with pytest.raises(ConfigError, match="train.optimizer_impl=fused: `fused=True` requires"):
        make_optimizer(with_impl("fused"), copy.deepcopy(ctx.model))


def test_autocast_auto_follows_the_detected_bf16_units(monkeypatch):
    from offpolicy.rollout import model as model_mod
    from offpolicy.train.tiny import build_model

    for has_units in (False, True):
        monkeypatch.setattr(model_mod, "bf16_matmul_units", lambda device, v=has_units: v)
        m = build_model(21, hidden=16, layers=1, heads=2, intermediate=32, seed=0)
        model_mod.enable_autocast(m, "auto")
        out = m(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert out.dtype == (torch.bfloat16 if has_units else torch.float32)
        assert {p.dtype for p in m.parameters()} == {torch.float32}  # master weights stay float32


def test_bf16_matmul_units_reads_the_cpu_flags(monkeypatch, tmp_path):
    from pathlib import Path

    from offpolicy.rollout import model as model_mod

    real = Path.read_text
    for flags, expected in (("fpu avx avx2", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        monkeypatch.setattr(Path, "read_text", lambda self, *a, f=flags, **k: f"processor: 0\nflags\t\t: {f}\n"
                            if str(self) == "/proc/cpuinfo" else real(self, *a, **k))
        assert model_mod.bf16_matmul_units("cpu") is expected


def test_bf16_autocast_logprobs_within_tolerance_of_float32(demo):
    """bf16 autocast rounds every matmul input (8 bits of mantissa): on the bundled model the response
    log-probs stay within 0.1 nats of float32 (mean |diff| below 0.02); off, nothing changes at all."""
    from offpolicy.rollout.model import enable_autocast

    _, ctx, batch = demo
    m = batch.mask_BT.bool()
    with torch.no_grad():
        fp32, _ = response_logp(ctx.model, batch)
        again, _ = response_logp(ctx.model, batch)
        mixed_model = copy.deepcopy(ctx.model)
        enable_autocast(mixed_model, "bfloat16")
        bf16, _ = response_logp(mixed_model, batch)
    assert torch.equal(fp32, again)  # autocast off: bit-identical, call after call
    assert bf16.dtype == torch.float32
    diff = (bf16 - fp32)[m].abs()
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_compile_forward_leaves_the_engine_eager(random_tiny):
    """train.compile replaces the forward by a compiled one (deep copies keep it); the engine's sampling
    runs it eagerly (its decode shapes would recompile it every token), so generating compiles nothing."""
    from torch._dynamo.utils import counters

    from offpolicy.rollout.engine import HFEngine

    model, tok = random_tiny
    model = copy.deepcopy(model)
    eager_out = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id).generate(
        [tok("12+7=")["input_ids"]], n=4, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    compile_forward(model)
    assert hasattr(model.forward.__func__, "_torchdynamo_orig_callable")
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin and twin.forward.__func__ is model.forward.__func__
    graphs = counters["stats"]["unique_graphs"]
    out = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id).generate(
        [tok("12+7=")["input_ids"]], n=4, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.equal(a, b) for a, b in zip(out.behav_logp, eager_out.behav_logp))


@pytest.mark.slow
def test_compiled_forward_logprobs_equal_eager(demo):
    """train.compile: the compiled forward's log-probs equal eager ones within 1e-5 and its gradients to
    float rounding (relative norm 1e-4), on the shared-prefix path and the one-forward-per-row path.
    Compiling takes ~20 s on 2 quiet cores, minutes on a loaded machine (slow)."""
    _, ctx, batch = demo
    eager = ctx.model
    compiled = copy.deepcopy(ctx.model)
    compile_forward(compiled)
    for share in (True, False):
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            logp, _ = response_logp(model, batch, share_prefix=share)
            (logp * batch.mask_BT).sum().backward()
            grads.append((logp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=0)
        for k, g in grads[0][1].items():
            rel = ((grads[1][1][k] - g).norm() / g.norm().clamp(min=1e-12)).item()
            assert rel < 1e-4, (k, rel)
