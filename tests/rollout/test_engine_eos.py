"""HFEngine ends a response on every end-of-sequence id the model declares (``generation_config.eos_token_id``,
a list for e.g. Llama 3.1 Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>), as transformers' ``generate`` and
vLLM do, not only on the tokenizer's one."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offpolicy.rollout.engine import HFEngine, make_engine


def _model_preferring(token: int, eos_ids: list[int]):
    """A tiny random Llama whose greedy choice is ``token`` after any prefix (its head's bias row)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=eos_ids, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.model.embed_tokens.weight[:, 0] = 5.0  # hidden[0] > 0 after the final norm, whatever the input
    return model


def test_every_declared_eos_ends_the_response_like_generate():
    model = _model_preferring(5, eos_ids=[2, 5])  # the tokenizer's EOS is 2; the model also declares 5
    prompt = [3, 4]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert ref == [5]  # transformers stops at the declared EOS 5
    engine = HFEngine(model, pad_id=0, eos_id=2)
    greedy = engine.generate([prompt], max_new_tokens=6, greedy=True)
    assert greedy.response_ids[0].tolist() == ref and greedy.finished == [True]
    sampled = engine.generate([prompt, [7]], n=3, max_new_tokens=6, temperature=0.05,
                              generator=torch.Generator().manual_seed(0))
    assert [r.tolist() for r in sampled.response_ids] == [[5]] * 6 and all(sampled.finished)
    assert all(len(lp) == 1 for lp in sampled.behav_logp)


def test_the_factory_engine_stops_on_the_declared_eos_too():
    from types import SimpleNamespace

    model = _model_preferring(5, eos_ids=[2, 5])
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    ro = make_engine("hf", model, tok).generate([[3]], max_new_tokens=4, greedy=True)
    assert ro.response_ids[0].tolist() == [5] and ro.finished == [True]
