"""The lean generation options of HFEngine (rollout.kv_cache=static, rollout.compile_decode): the same samples
and behaviour log-probs as the dynamic-cache path, from the same generator; a clean fallback where a static
cache cannot be built."""

import pytest
import torch

from offpolicy.config import ConfigError, load_config
from offpolicy.rollout.engine import HFEngine, make_engine

# (temperature, top_p, top_k, n, max_new_tokens, stop on "+"): untruncated, truncated, one row per prompt,
# one token (no decode step at all), a stop token
CASES = [(1.0, 1.0, 0, 8, 7), (0.7, 0.8, 5, 4, 6), (1.0, 1.0, 0, 1, 5), (1.0, 1.0, 0, 4, 1)]


def _prompts(tok):
    return [tok(p)["input_ids"] for p in ["12+7=", "45+61-5=", "3="]]  # different lengths: left padding


def _same(a, b, atol=1e-5):
    assert a.prompt_index == b.prompt_index and a.finished == b.finished
    assert all(torch.equal(x, y) for x, y in zip(a.response_ids, b.response_ids))
    for x, y in zip(a.behav_logp, b.behav_logp):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert (a.engine_logp is None) == (b.engine_logp is None)
    for x, y in zip(a.engine_logp or [], b.engine_logp or []):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _generate(engine, prompts, case, seed=0, **kw):
    temperature, top_p, top_k, n, new = case
    return engine.generate(prompts, n=n, max_new_tokens=new, temperature=temperature, top_p=top_p, top_k=top_k,
                           generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("case", CASES)
def test_static_cache_samples_and_logprobs_equal_the_dynamic_cache(random_tiny, case):
    model, tok = random_tiny
    dynamic = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    static = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache="static")
    prompts = _prompts(tok)
    for seed in (0, 1):
        a, b = _generate(dynamic, prompts, case, seed), _generate(static, prompts, case, seed)
        _same(a, b)
        assert sum(map(len, a.response_ids)) > len(a.response_ids) or case[-1] == 1  # tokens were decoded
    stop = tok("+")["input_ids"][-1]
    _same(_generate(dynamic, prompts, case, stop_ids=[stop]), _generate(static, prompts, case, stop_ids=[stop]))
    greedy = dict(n=2, max_new_tokens=6, greedy=True)
    _same(dynamic.generate(prompts, **greedy), static.generate(prompts, **greedy))


def test_static_cache_on_a_qwen2_checkpoint(model_folder):
    """Grouped-query attention, q/k/v biases, an untied head: the static path still matches."""
    from offpolicy.rollout.model import load_policy

    model, tok = load_policy(str(model_folder("qwen2")))
    engines = [HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache=kv)
               for kv in ("dynamic", "static")]
    _same(*(_generate(e, _prompts(tok), CASES[0]) for e in engines))


def test_no_static_cache_falls_back_to_the_dynamic_path_with_one_warning(random_tiny, monkeypatch):
    import transformers

    model, tok = random_tiny

    def refuse(*args, **kwargs):
        raise NotImplementedError("no static cache for this model")

    monkeypatch.setattr(transformers, "StaticCache", refuse)
    dynamic = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    static = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache="static")
    with pytest.warns(UserWarning, match="decoding with the dynamic cache"):
        b = _generate(static, _prompts(tok), CASES[0])
    _same(_generate(dynamic, _prompts(tok), CASES[0]), b)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per engine, not per batch
        _generate(static, _prompts(tok), CASES[0])


def test_engine_factory_reads_the_rollout_settings(random_tiny):
    model, tok = random_tiny
    cfg = load_config(None, ["rollout.kv_cache=static", "rollout.compile_decode=true"])
    engine = make_engine(cfg.rollout, model, tok)
    assert (engine.kv_cache, engine.compile_decode) == ("static", True)
    with pytest.raises(ConfigError, match="compile_decode=true needs rollout.kv_cache=static"):
        load_config(None, ["rollout.compile_decode=true"])
    with pytest.raises(ConfigError, match="read only with rollout.engine=hf"):
        load_config(None, ["rollout.engine=vllm", "rollout.kv_cache=static"])


@pytest.mark.slow
def test_compiled_decode_equals_the_eager_static_path(random_tiny):
    """torch.compile of the one-token decode forward (tens of seconds to compile on 2 cores: slow)."""
    model, tok = random_tiny
    eager = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache="static")
    compiled = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, kv_cache="static",
                        compile_decode=True)
    for case in CASES[:2]:
        _same(_generate(eager, _prompts(tok), case), _generate(compiled, _prompts(tok), case))


def test_finished_rows_leave_the_decode_forward_and_change_no_sample():
    """The bundled model answers in 2-4 tokens of 5: rows that finished are dropped from the decode forward
    (fewer rows per forward), and the samples and log-probs equal those of a call that keeps every row
    (``keep_kv=True`` lays the cache out by row, so it drops nothing)."""
    from offpolicy.rollout.model import load_policy

    model, tok = load_policy("bundled")
    engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    rows_run = []
    forward = engine._forward
    engine._forward = lambda ids, *a: rows_run.append(ids.shape[0]) or forward(ids, *a)
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in [(12, 7), (45, 61), (3, 99), (88, 88)]]
    sample = dict(n=8, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    compact = engine.generate(prompts, **sample)
    dropped = list(rows_run)
    rows_run.clear()
    sample["generator"] = torch.Generator().manual_seed(0)
    _same(compact, engine.generate(prompts, keep_kv=True, **sample))
    lengths = [len(r) for r in compact.response_ids]
    assert min(lengths) < max(lengths)  # some rows finished early
    assert dropped[0] == rows_run[0] == len(prompts)  # the prefill: each prompt once
    assert dropped[1] == rows_run[1] == 32  # the first decode step runs every row
    assert sum(dropped[2:]) < sum(rows_run[2:])  # later ones only the rows still running
    assert dropped[-1] == sum(n > len(dropped) - 1 for n in lengths)
