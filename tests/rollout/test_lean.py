"""``model.forward_impl=lean``: the functional forward computes the model's own function (logits, caches,
log-probs, gradients) to float rounding, plugs into the engine, the trainer and the copies made of the
policy, and is refused where it would not be the same function."""

import copy

import pytest
import torch

from offpolicy.rollout.engine import HFEngine, _cache_keyword
from offpolicy.rollout.lean import enable_lean_forward, is_lean, unsupported


@pytest.fixture(params=["llama", "qwen2"])
def pair(request, model_folder):
    """(stock, lean) copies of one model: Llama, and Qwen2 (grouped-query attention, q/k/v biases)."""
    from offpolicy.rollout.model import load_policy

    model, tok = load_policy(str(model_folder(request.param)))
    lean = copy.deepcopy(model)
    enable_lean_forward(lean)
    return model, lean, tok


def _left_padded(tok, texts):
    from offpolicy.rollout.engine import _left_pad

    return _left_pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id)


def test_logits_and_cache_equal_the_stock_forward(pair):
    model, lean, tok = pair
    ids, attn = _left_padded(tok, ["12+7=", "45+61-5=", "3="])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        b = lean(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        real = attn.bool()  # left-padding positions are never read
        torch.testing.assert_close(b.logits[real], a.logits[real], atol=1e-5, rtol=0)
        # one more token through each one's cache: the cached keys/values are the same too
        nxt, attn2 = torch.tensor([[5], [6], [7]]), torch.cat([attn, torch.ones(3, 1, dtype=attn.dtype)], 1)
        kw = dict(attention_mask=attn2, position_ids=pos[:, -1:] + 1, use_cache=True, logits_to_keep=1)
        ck = _cache_keyword(model)  # 'cache' (transformers >= 5.2x) or 'past_key_values'
        a2 = model(input_ids=nxt, **{ck: getattr(a, ck)}, **kw)
        b2 = lean(input_ids=nxt, **{ck: getattr(b, ck)}, **kw)
        assert b2.logits.shape == (3, 1, model.config.vocab_size)
        torch.testing.assert_close(b2.logits, a2.logits, atol=1e-5, rtol=0)


def test_trainer_logprobs_and_gradients_equal_the_stock_forward(pair):
    from offpolicy.data.experience import Experience, collate
    from offpolicy.train.step import response_logp

    model, lean, tok = pair
    g = torch.Generator().manual_seed(0)
    exps = []
    for i, text in enumerate(["12+7=", "45+61-5=", "3="]):  # groups of 3 responses of different lengths
        for k in range(3):
            resp = torch.randint(3, len(tok) - 1, (2 + (i + k) % 3,), generator=g)
            exps.append(Experience(torch.tensor(tok(text)["input_ids"]), resp, torch.ones(len(resp)),
                                   torch.zeros(len(resp)), 0.0, f"g{i}", f"t{i}"))
    batch = collate(exps, tok.pad_token_id)
    grads = []
    for m in (model, lean):
        m.train()
        m.zero_grad()
        logp, entropy = response_logp(m, batch, temperature=0.7, with_entropy=True)
        ((logp + 0.1 * entropy) * batch.mask_BT).sum().backward()
        grads.append((logp.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        m.eval()
    (lp_a, g_a), (lp_b, g_b) = grads
    torch.testing.assert_close(lp_b * batch.mask_BT, lp_a * batch.mask_BT, atol=1e-5, rtol=0)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sampling", [dict(), dict(top_p=0.8, top_k=5), dict(greedy=True)])
def test_engine_samples_the_same_tokens(pair, sampling):
    model, lean, tok = pair
    prompts = [tok(t)["input_ids"] for t in ["12+7=", "45+61-5=", "3="]]
    out = [HFEngine(m, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id).generate(
        prompts, n=4, max_new_tokens=6, generator=torch.Generator().manual_seed(3), **sampling) for m in (model, lean)]
    assert [r.tolist() for r in out[0].response_ids] == [r.tolist() for r in out[1].response_ids]
    for x, y in zip(out[0].behav_logp, out[1].behav_logp):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_a_kept_cache_is_continued_by_the_lean_forward(pair):
    model, lean, tok = pair
    prompts = [tok(t)["input_ids"] for t in ["12+7=", "45+61-5="]]
    runs = []
    for m in (model, lean):
        engine = HFEngine(m, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        first = engine.generate(prompts, n=2, max_new_tokens=4, keep_kv=True, generator=torch.Generator().manual_seed(0))
        nxt = [prompts[i] + r.tolist() + [5, 6] for i, r in zip(first.prompt_index, first.response_ids)]
        runs.append((engine.generate(nxt, max_new_tokens=4, generator=torch.Generator().manual_seed(1)),
                     engine.reused_tokens))
    (a, reused_a), (b, reused_b) = runs
    assert reused_b == reused_a > 0
    assert [r.tolist() for r in a.response_ids] == [r.tolist() for r in b.response_ids]
    for x, y in zip(a.behav_logp, b.behav_logp):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_copies_run_lean_on_their_own_weights_and_other_calls_go_to_the_stock_forward(pair):
    from transformers import StaticCache

    model, lean, tok = pair
    ref = copy.deepcopy(lean)  # as the KL reference / pi_{k-1} are made
    assert is_lean(ref) and not is_lean(model)
    ids = torch.tensor([tok("12+7=")["input_ids"]])
    with torch.no_grad():
        before = lean(input_ids=ids).logits
        for p in ref.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(lean(input_ids=ids).logits, before)  # the copy's forward reads the copy
        assert not torch.allclose(ref(input_ids=ids).logits, before)
        static = StaticCache(config=model.config, max_cache_len=16)  # a cache the lean forward does not keep
        ck = _cache_keyword(model)
        assert _cache_keyword(lean) == ck
        out = lean(input_ids=ids, **{ck: static}, use_cache=True)
        want = model(input_ids=ids, **{ck: StaticCache(config=model.config, max_cache_len=16)}, use_cache=True)
        torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=0)
        embeds = model.get_input_embeddings()(ids)  # another input the lean forward leaves to the stock one
        torch.testing.assert_close(lean(inputs_embeds=embeds).logits, model(inputs_embeds=embeds).logits)


def test_autocast_wraps_the_lean_forward(model_folder):
    from offpolicy.rollout.model import enable_autocast, load_policy

    model, tok = load_policy(str(model_folder("llama")))
    lean = copy.deepcopy(model)
    enable_lean_forward(lean)
    for m in (model, lean):
        enable_autocast(m, "bfloat16")
    ids = torch.tensor([tok("12+7=")["input_ids"]])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, lean(input_ids=ids).logits
    assert b.dtype == torch.bfloat16 and is_lean(lean)  # the lean body ran under the autocast
    torch.testing.assert_close(b.float(), a.float(), atol=0.05, rtol=0)


def test_what_the_lean_forward_does_not_cover_is_refused(model_folder, random_tiny):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from offpolicy.config import ConfigError, load_config
    from offpolicy.rollout.model import add_lora

    assert unsupported(random_tiny[0]) is None
    sliding = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                           use_sliding_window=True, sliding_window=4, max_window_layers=0))
    assert "sliding" in unsupported(sliding)
    with pytest.raises(ValueError, match="model.forward_impl=lean: .*sliding"):
        enable_lean_forward(sliding)
    lora = add_lora(copy.deepcopy(random_tiny[0]), r=2, alpha=4)
    assert "PEFT" in unsupported(lora)
    checkpointed = copy.deepcopy(random_tiny[0])
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "checkpointing" in unsupported(checkpointed)
    for extra, key in [("model.lora.r=4", "model.lora.r"), ("model.gradient_checkpointing=true",
                       "model.gradient_checkpointing"), ("model.attn_implementation=eager", "model.attn_implementation"),
                       ("rollout.kv_cache=static", "rollout.kv_cache=static"),
                       ("pipeline.mode=ray train.workers=2 train.parallel=fsdp2", "train.parallel=fsdp2")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["model.forward_impl=lean", *extra.split()])


def test_a_float64_model_with_left_padding_stays_finite_and_equal(model_folder):
    """The mask is the dtype's minimum: in float64 it would overflow a float32 softmax to -inf, and a padding
    row (every key masked) would turn NaN and spread through the next layer's keys."""
    from offpolicy.rollout.model import load_policy

    model, tok = load_policy(str(model_folder("qwen2")))
    model = model.double()
    lean = copy.deepcopy(model)
    enable_lean_forward(lean)
    ids, attn = _left_padded(tok, ["12+7=", "45+61-5=", "3="])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        b = lean(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b[attn.bool()], a[attn.bool()], atol=1e-10, rtol=0)
