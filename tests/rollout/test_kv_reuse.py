"""KV-cache reuse across HFEngine calls (``keep_kv``): a call that continues the rows of the previous one
samples the same tokens with the same log-probs as a full recompute, and runs only the new tokens."""

import pytest
import torch

from offpolicy.rollout.engine import HFEngine


def _same(a, b, atol=1e-5):
    assert a.prompt_index == b.prompt_index and a.finished == b.finished
    assert [r.tolist() for r in a.response_ids] == [r.tolist() for r in b.response_ids]
    for x, y in zip(a.behav_logp + (a.engine_logp or []), b.behav_logp + (b.engine_logp or [])):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _longest_kept_prefix(seqs, p):
    return max((len(s) for s in seqs if s == p[: len(s)]), default=0)


@pytest.fixture(params=["llama", "qwen2"])
def model_tok(request, random_tiny, model_folder):
    if request.param == "llama":
        return random_tiny
    from offpolicy.rollout.model import load_policy

    return load_policy(str(model_folder("qwen2")))  # grouped-query attention, q/k/v biases


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_continuing_rows_equals_recomputing_them(model_tok, kv_cache):
    model, tok = model_tok
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache=kv_cache)
    fresh = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache=kv_cache)
    prompts = [tok(p)["input_ids"] for p in ["12+7=", "45+61-5=", "3="]]  # different lengths: left padding
    sample = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=8)
    first = engine.generate(prompts, n=2, keep_kv=True, generator=torch.Generator().manual_seed(0), **sample)
    kept = [list(s) for s in engine._kept.seqs]
    extra = tok("[1*2]{2}")["input_ids"][1:]  # the next turn's observation, without <bos>
    nxt = [prompts[i] + r.tolist() + extra[: j % 4] for j, (i, r) in enumerate(zip(first.prompt_index,
                                                                                 first.response_ids))]
    nxt += [tok("99-1=")["input_ids"], kept[0]]  # a prompt that continues nothing; one that is a kept row
    want = sum(min(len(p) - 1, _longest_kept_prefix(kept, p)) for p in nxt)
    assert want > sum(len(prompts[i]) for i in first.prompt_index)  # response tokens are reused too
    before = engine.reused_tokens
    got = engine.generate(nxt, generator=torch.Generator().manual_seed(1), **sample)
    assert engine.reused_tokens - before == want
    _same(got, fresh.generate(nxt, generator=torch.Generator().manual_seed(1), **sample))


def test_only_the_next_call_continues_and_new_weights_drop_the_cache(random_tiny):
    model, tok = random_tiny
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    prompts = [tok("12+7=")["input_ids"]]
    ro = engine.generate(prompts, max_new_tokens=4, keep_kv=True, generator=torch.Generator().manual_seed(0))
    longer = [prompts[0] + ro.response_ids[0].tolist() + [5]]
    engine.update_weights(model, 1)  # weights may have changed: nothing kept is reused
    engine.generate(longer, max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    assert engine.reused_tokens == 0
    engine.generate(prompts, max_new_tokens=4, keep_kv=True, generator=torch.Generator().manual_seed(0))
    engine.generate(prompts, max_new_tokens=1)  # shorter than the kept row: no continuation; it keeps nothing
    assert engine.reused_tokens == 0
    engine.generate(longer, max_new_tokens=2)  # so the call after it recomputes too
    assert engine.reused_tokens == 0


def test_a_multi_turn_batch_is_the_same_with_and_without_reuse():
    """The calculator agent's episodes (bundled model, compact tools, <= 3 turns): every turn after the first
    continues the previous one's cache, and the trajectories equal those of full recomputes."""
    from offpolicy.config import load_config
    from offpolicy.data import calculator
    from offpolicy.rewards.exact_match import exact_match
    from offpolicy.rewards.guard import GuardedReward
    from offpolicy.rollout.engine import make_engine
    from offpolicy.rollout.model import policy_from_config
    from offpolicy.rollout.workflow import Sampling, build_workflow

    class Recompute:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, prompts, **kw):
            return self.engine.generate(prompts, **{**kw, "keep_kv": False})

    cfg = load_config("examples/calculator_agent.yaml")
    model, tok = policy_from_config(cfg.model, training=False)
    workflow, tasks = build_workflow(cfg.workflow), calculator.generate("eval", 16, seed=0)
    scorer, sampling = GuardedReward(exact_match, timeout_s=None), Sampling(8, cfg.rollout.max_new_tokens)
    runs = []
    for wrap in (lambda e: e, Recompute):
        engine = make_engine("hf", model, tok)
        exps = workflow(wrap(engine), tok, tasks, scorer, sampling=sampling, generator=torch.Generator().manual_seed(3))
        runs.append((exps, engine.reused_tokens))
    (a, reused), (b, none) = runs
    later_turns = sum(e.info["episode"]["turns"] - 1 for e in a)
    assert later_turns > 0 and reused > later_turns * len(a[0].prompt_ids) and none == 0
    for x, y in zip(a, b):
        assert x.response_ids.tolist() == y.response_ids.tolist() and x.response_mask.tolist() == y.response_mask.tolist()
        torch.testing.assert_close(x.behav_logp, y.behav_logp, atol=1e-5, rtol=0)
        assert x.reward == y.reward
