"""Any causal-LM folder as the policy: other architectures through the normal entry point, dtype, device,
gradient checkpointing, attention implementation, and the model section of the config."""

import copy
import json

import pytest
import torch

from offpolicy.config import ConfigError, load_config
from offpolicy.data.experience import Experience, collate
from offpolicy.pipeline import run
from offpolicy.rollout.engine import HFEngine
from offpolicy.rollout.model import load_policy, policy_from_config
from offpolicy.train.metrics import read_metrics
from offpolicy.train.algorithm import Algorithm
from offpolicy.train.plan import build_plan
from offpolicy.train.step import response_logp, train_step



def _experiences(ro, prompts):
    return [Experience(prompt_ids=torch.tensor(prompts[p]), response_ids=r, response_mask=torch.ones(len(r)),
                       behav_logp=lp, reward=0.0, group_id=str(p), task_id=str(p))
            for p, r, lp in zip(ro.prompt_index, ro.response_ids, ro.behav_logp)]

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0",
         "run.progress=false", "run.loggers=[]", "train.threads=1", "reward.timeout_s=null",
         "checkpoint.every=0"]


@pytest.mark.parametrize("arch, extra", [("qwen2", ["model.attn_implementation=eager"]),
                                         ("llama", ["model.gradient_checkpointing=true"])])
def test_random_model_folder_trains_through_run(tmp_path, model_folder, arch, extra):
    folder = model_folder(arch)
    cfg = load_config(None, [*SMALL, "train.steps=2", f"model.path={folder}", f"run.dir={tmp_path / 'run'}", *extra])
    run(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["samples"] == 16 and r["skipped_steps"] == 0 for r in rows)
    model, tok = load_policy(str(tmp_path / "run" / "final"))  # the saved folder keeps the architecture
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"] == arch
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert tok.decode(tok("37+48=")["input_ids"], skip_special_tokens=True) == "37+48="


def _batch(model, tok, *, seed=0, n=4):
    """A sampled batch with random 0/1 rewards, so that advantages (and gradients) are not zero."""
    prompts = [tok(p)["input_ids"] for p in ["12+7=", "45+61=", "3+3="]]
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    ro = engine.generate(prompts, n=n, max_new_tokens=5, generator=torch.Generator().manual_seed(seed))
    exps = _experiences(ro, prompts)
    g = torch.Generator().manual_seed(seed)
    for e in exps:
        e.reward = float(torch.randint(0, 2, (1,), generator=g))
    return collate(exps, tok.pad_token_id)


def _grpo():
    return Algorithm.from_config(load_config().algorithm, max_len=5)


def _plan(algo):
    return build_plan(load_config(), algo)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(random_tiny):
    base, tok = random_tiny
    batch = _batch(base, tok)
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert sum(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()) >= 2
        algo = _grpo()
        plan = build_plan(load_config(None, ["train.grad_clip=1e9"]), algo)
        stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), copy.deepcopy(batch), algo, plan)
        results.append((stats["loss"], [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a != 0.0
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_policy_on_cpu_steps_with_float32_logprobs():
    cfg = load_config(None, ["model.dtype=bfloat16"])
    model, tok = policy_from_config(cfg.model)
    assert next(model.parameters()).dtype == torch.bfloat16
    batch = _batch(model, tok)
    assert batch.behav_logp_BT.dtype == torch.float32  # the engine records float32 log-probs
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, _grpo(), _plan(_grpo()))
    assert stats["skipped_steps"] == 0 and stats["loss"] == stats["loss"]  # finite, not NaN
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        logp, ent = response_logp(model, batch, with_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.isfinite(logp).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="model.device=cuda: CUDA is not available"):
        load_policy("bundled", device="cuda")


def test_load_tokenizer_takes_model_names_and_never_goes_to_the_hub():
    from offpolicy.rollout.model import BUNDLED, load_tokenizer

    assert load_tokenizer("bundled").get_vocab() == load_tokenizer(BUNDLED).get_vocab()
    assert load_tokenizer("bundled:tiny-calc").get_vocab() == load_tokenizer(BUNDLED.parent / "tiny-calc").get_vocab()
    with pytest.raises(FileNotFoundError, match="model.path: Qwen/Qwen2-0.5B is not a directory"):
        load_tokenizer("Qwen/Qwen2-0.5B")  # a hub id: refused at once (it used to retry the hub for ~45 s)


def test_model_section_is_validated():
    with pytest.raises(ConfigError, match="did you mean 'model.lora.alpha'"):
        load_config(None, ["model.lora.alpah=8"])
    with pytest.raises(ConfigError, match="model.device"):
        load_config(None, ["model.device=gpu"])
    with pytest.raises(ConfigError, match="did you mean 'model.gradient_checkpointing'"):
        load_config(None, ["model.gradient_checkpoint=true"])
    cfg = load_config(None, ["model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]", "model.device=cuda:1"])
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.device == "cuda:1"


def test_unknown_attention_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="model.path: cannot load"):
        load_policy("bundled", attn_implementation="no_such_kernel")


def test_autocast_keeps_float32_master_weights_that_small_updates_move(tmp_path):
    """model.autocast=bfloat16 on float32 weights: bf16 compute, float32 log-probs and parameters, and an
    update of lr 1e-6 is not rounded away (it would be on bfloat16 parameters)."""
    import copy

    import torch

    from offpolicy.config import load_config
    from offpolicy.data.experience import collate
    from offpolicy.pipeline.context import build_context
    from offpolicy.pipeline.explorer import Explorer
    from offpolicy.train.step import response_logp, train_step

    changed = {}
    for name, extra in {"mixed": ["model.autocast=bfloat16"], "bf16": ["model.dtype=bfloat16"]}.items():
        cfg = load_config(None, [f"run.dir={tmp_path / name}", "train.lr=1e-6", "rollout.prompts_per_step=4",
                                 "rollout.group_size=4", "tasks.eval_size=4", *extra])
        (tmp_path / name).mkdir()
        ctx = build_context(cfg, tmp_path / name)
        explorer = Explorer.from_context(ctx)
        try:
            batch = collate(explorer.explore(0, 0)[0], ctx.tokenizer.pad_token_id)
        finally:
            explorer.close()
        before = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}
        logp, _ = response_logp(ctx.model, batch)
        assert logp.dtype == torch.float32
        assert ctx.model(input_ids=batch.input_ids_BL[:1]).logits.dtype == torch.bfloat16  # bf16 compute
        twin = copy.deepcopy(ctx.model)  # a copy (KL reference) runs its own weights, still under autocast
        with torch.no_grad():
            for p in twin.parameters():
                p.zero_()
        out = twin(input_ids=batch.input_ids_BL[:1]).logits
        assert out.dtype == torch.bfloat16 and torch.count_nonzero(out) == 0
        train_step(ctx.model, ctx.optimizer, batch, ctx.algo, ctx.plan)
        moved = [(before[k] != v.detach()).float().mean().item() for k, v in ctx.model.named_parameters()]
        changed[name] = sum(moved) / len(moved)
        dtypes = {p.dtype for p in ctx.model.parameters()}
        assert dtypes == ({torch.float32} if name == "mixed" else {torch.bfloat16})
    assert changed["mixed"] > 0.9 and changed["bf16"] < 0.5 * changed["mixed"]
