import torch

from offpolicy.data.experience import Experience, collate
from offpolicy.rollout.engine import HFEngine, _top_p_filter
from offpolicy.train.step import response_logp


def _experiences(ro, prompts):
    return [Experience(prompt_ids=torch.tensor(prompts[p]), response_ids=r, response_mask=torch.ones(len(r)),
                       behav_logp=lp, reward=0.0, group_id=str(p), task_id=str(p))
            for p, r, lp in zip(ro.prompt_index, ro.response_ids, ro.behav_logp)]


def test_kv_cache_logprobs_equal_one_full_forward(random_tiny):
    model, tok = random_tiny
    prompts = [tok(p)["input_ids"] for p in ["12+7=", "45+61-5=", "3="]]  # different lengths: left padding
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    # the engine runs each prompt once for its n rows; the trainer too (share_prefix) or once per row;
    # max_new_tokens=1: responses of one token (the trainer's response forward is skipped)
    for temperature, new_tokens in ((1.0, 6), (0.7, 6), (1.0, 1)):
        ro = engine.generate(prompts, n=4, max_new_tokens=new_tokens, temperature=temperature,
                             generator=torch.Generator().manual_seed(0))
        assert len(ro.response_ids) == 12 and ro.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
        batch = collate(_experiences(ro, prompts), tok.pad_token_id)
        m = batch.mask_BT.bool()
        assert m.sum() > (12 if new_tokens > 1 else 11)
        for share in (True, False):
            with torch.no_grad():
                logp_BT, _ = response_logp(model, batch, temperature=temperature, share_prefix=share)
            torch.testing.assert_close(logp_BT[m], batch.behav_logp_BT[m], atol=1e-5, rtol=0)


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
