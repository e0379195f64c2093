import math
from types import SimpleNamespace

import pytest
import torch

from offpolicy.data.experience import Experience, collate
from offpolicy.rollout.engine import HFEngine, _top_k_filter, _top_p_filter
from offpolicy.train.step import response_logp


def _experiences(ro, prompts):
    engine = ro.engine_logp or [None] * len(ro.response_ids)
    return [Experience(prompt_ids=torch.tensor(prompts[p]), response_ids=r, response_mask=torch.ones(len(r)),
                       behav_logp=lp, engine_logp=elp, reward=0.0, group_id=str(p), task_id=str(p))
            for p, r, lp, elp in zip(ro.prompt_index, ro.response_ids, ro.behav_logp, engine)]


def test_kv_cache_logprobs_equal_one_full_forward(random_tiny):
    model, tok = random_tiny
    prompts = [tok(p)["input_ids"] for p in ["12+7=", "45+61-5=", "3="]]  # different lengths: left padding
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    # the engine runs each prompt once for its n rows; the trainer too (share_prefix) or once per row;
    # max_new_tokens=1: responses of one token (the trainer's response forward is skipped);
    # under truncation the trainer's untruncated log-probs equal the engine's engine_logp, not behav_logp
    for temperature, new_tokens, top_p, top_k in ((1.0, 6, 1.0, 0), (0.7, 6, 1.0, 0), (1.0, 1, 1.0, 0),
                                                  (1.0, 6, 0.8, 6)):
        ro = engine.generate(prompts, n=4, max_new_tokens=new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, generator=torch.Generator().manual_seed(0))
        assert len(ro.response_ids) == 12 and ro.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
        batch = collate(_experiences(ro, prompts), tok.pad_token_id)
        m = batch.mask_BT.bool()
        assert m.sum() > (12 if new_tokens > 1 else 11)
        truncated = top_p < 1.0 or top_k > 0
        assert (batch.engine_logp_BT is not None) == truncated
        engine_BT = batch.engine_logp_BT if truncated else batch.behav_logp_BT
        for share in (True, False):
            with torch.no_grad():
                logp_BT, _ = response_logp(model, batch, temperature=temperature, share_prefix=share)
            torch.testing.assert_close(logp_BT[m], engine_BT[m], atol=1e-5, rtol=0)
        if truncated:  # renormalised over the kept set: never below the untruncated log-prob, above it somewhere
            assert (batch.behav_logp_BT[m] >= engine_BT[m]).all() and (batch.behav_logp_BT[m] > engine_BT[m]).any()


def test_stops_on_eos_and_pads_after(random_tiny):
    model, tok = random_tiny
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    ro = engine.generate([tok("1+1=")["input_ids"]], n=64, max_new_tokens=8,
                         generator=torch.Generator().manual_seed(3))
    lengths = [len(r) for r in ro.response_ids]
    assert max(lengths) <= 8
    for r, fin in zip(ro.response_ids, ro.finished):
        eos_pos = (r == tok.eos_token_id).nonzero().flatten().tolist()
        # EOS, when present, is the last token of the response; `finished` says whether it came
        assert eos_pos in ([], [len(r) - 1])
        assert fin == (eos_pos != [])
    # a random model over ~16 tokens emits EOS early sometimes and runs to the limit other times
    assert any(ro.finished) and not all(ro.finished)


def test_same_generator_seed_same_samples(random_tiny):
    model, tok = random_tiny
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    p = [tok("9+9=")["input_ids"]]
    a = engine.generate(p, n=8, generator=torch.Generator().manual_seed(5))
    b = engine.generate(p, n=8, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.response_ids, b.response_ids))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0.5, 0.3}; top_p 0.5 keeps {0.5}
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(_top_p_filter(logits, p)).squeeze(0).tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.96) == [True, True, True, True]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda k: torch.isfinite(_top_k_filter(logits, k)).squeeze(0).tolist()  # noqa: E731
    assert kept(1) == [True, False, False, False]
    assert kept(3) == [True, True, True, False]
    assert kept(9) == [True] * 4  # k above the vocabulary: nothing dropped


class FixedLM(torch.nn.Module):
    """A causal-LM stand-in whose next-token distribution is always ``probs``, whatever the input
    (the keywords HFEngine passes; no KV cache, so the engine re-runs rows instead of indexing one)."""

    def __init__(self, probs):
        super().__init__()
        self.logits_V = torch.nn.Parameter(torch.tensor(probs).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, past_key_values=None):
        return SimpleNamespace(logits=self.logits_V.expand(*input_ids.shape, -1), past_key_values=None)


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("temperature, top_p, top_k, kept", [
    (1.0, 0.7, 0, [0, 1]),  # cumulative mass before each token: 0, .5, .8, .95 -> keep while < .7
    (1.0, 1.0, 2, [0, 1]),
    (1.0, 1.0, 3, [0, 1, 2]),
    (1.0, 0.6, 2, [0]),  # top-k first: renormalised {.625, .375} -> .625 >= .6 already (top-p first keeps 2)
    (2.0, 1.0, 2, [0, 1]),  # tempered: q ~ sqrt(p) = .379, .294, .208, .120
])
def test_behav_logp_is_the_truncated_distribution_actually_sampled_from(temperature, top_p, top_k, kept):
    q = [p ** (1 / temperature) for p in PROBS]
    q = [x / sum(q) for x in q]  # the tempered, untruncated distribution (what the trainer recomputes)
    mass = sum(q[j] for j in kept)
    engine = HFEngine(FixedLM(PROBS), pad_id=0, eos_id=99)  # no EOS: every row runs 4 tokens
    ro = engine.generate([[0]], n=2000, max_new_tokens=4, temperature=temperature, top_p=top_p, top_k=top_k,
                         generator=torch.Generator().manual_seed(0))
    tok = torch.cat(ro.response_ids)
    behav, eng = torch.cat(ro.behav_logp).double(), torch.cat(ro.engine_logp).double()
    assert len(tok) == 8000 and set(tok.tolist()) <= set(kept)  # nothing outside the kept set is sampled
    want_behav = torch.tensor([math.log(q[t] / mass) for t in tok.tolist()], dtype=torch.float64)
    want_eng = torch.tensor([math.log(q[t]) for t in tok.tolist()], dtype=torch.float64)
    torch.testing.assert_close(behav, want_behav, atol=1e-6, rtol=0)
    torch.testing.assert_close(eng, want_eng, atol=1e-6, rtol=0)
    # pi/mu = exp(engine - behav) is the kept mass on every kept token, so its mean is the kept mass
    w = (eng - behav).exp()
    assert abs(w.mean().item() - mass) < 1e-6
    # and the tokens come at the recorded rates mu = q / mass (within 4 standard errors)
    for j in kept:
        freq, mu_j = (tok == j).double().mean().item(), q[j] / mass
        assert abs(freq - mu_j) <= 4 * math.sqrt(mu_j * (1 - mu_j) / len(tok)) + 1e-9


def test_untruncated_sampling_keeps_no_engine_logp():
    engine = HFEngine(FixedLM(PROBS), pad_id=0, eos_id=99)
    ro = engine.generate([[0]], n=4, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert ro.engine_logp is None
    tok, behav = torch.cat(ro.response_ids), torch.cat(ro.behav_logp).double()
    torch.testing.assert_close(behav, torch.tensor([math.log(PROBS[t]) for t in tok.tolist()],
                                                   dtype=torch.float64), atol=1e-6, rtol=0)
    greedy = engine.generate([[0]], max_new_tokens=2, top_p=0.5, top_k=1, greedy=True)
    assert greedy.engine_logp is None and greedy.response_ids[0].tolist() == [0, 0]


def test_greedy_is_argmax_of_full_forward(random_tiny):
    model, tok = random_tiny
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    ids = tok("27+5=")["input_ids"]
    ro = engine.generate([ids], max_new_tokens=4, greedy=True)
    seq = list(ids)
    for t in ro.response_ids[0].tolist():
        with torch.no_grad():
            nxt = model(input_ids=torch.tensor([seq])).logits[0, -1].argmax().item()
        assert nxt == t
        seq.append(t)


def test_prompts_encoded_in_one_call_equal_one_call_each():
    from types import SimpleNamespace

    from offpolicy.rollout.model import BUNDLED, load_tokenizer
    from offpolicy.rollout.workflow import encode_prompt, encode_prompts

    tok = load_tokenizer(BUNDLED)
    tasks = [SimpleNamespace(prompt=p) for p in ["12+34=", " 5 +6=", ""]]
    tasks.insert(1, SimpleNamespace(prompt="<bos>1+1=", has_special_tokens=True))  # a rendered chat prompt
    got = encode_prompts(tok, tasks)
    assert got == [encode_prompt(tok, t) for t in tasks]
    assert got[1][:2] == tok("<bos>1", add_special_tokens=False)["input_ids"] and got[0][0] == tok.bos_token_id


def test_decode_texts_equals_batch_decode_and_skips_its_per_id_conversion(monkeypatch):
    """decode_texts gives batch_decode's strings (special tokens skipped, tensors or lists): a plain Rust-backed
    tokenizer through its backend (batch_decode is not called), one that cleans up spaces through batch_decode."""
    from offpolicy.rollout.model import BUNDLED, load_tokenizer
    from offpolicy.rollout.workflow import decode_texts

    tok = load_tokenizer(BUNDLED)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, tok.vocab_size, (int(n),), generator=g) for n in torch.randint(0, 9, (64,), generator=g)]
    want = tok.batch_decode([r.tolist() for r in rows], skip_special_tokens=True)
    assert any(tok.eos_token_id in r.tolist() for r in rows) and len(set(want)) > 32  # specials to skip, varied rows

    def refuse(*a, **k):
        raise AssertionError("batch_decode called")

    monkeypatch.setattr(tok, "batch_decode", refuse)  # on the instance: the class's own decoding is still plain
    assert decode_texts(tok, rows) == want
    assert decode_texts(tok, [r.tolist() for r in rows]) == want
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", True)  # post-processed: batch_decode's business
    with pytest.raises(AssertionError, match="batch_decode called"):
        decode_texts(tok, rows)
