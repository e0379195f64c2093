"""Held-out evaluation: greedy accuracy and pass@k (unbiased estimator, Chen et al. 2021)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from offpolicy.rewards.guard import GuardedReward
from offpolicy.rollout.engine import HFEngine
from offpolicy.rollout.workflow import decode_texts, encode_prompts


def _n_correct(scorer, texts, truths) -> list[bool]:
    """A faulty reward (raises, hangs, NaN, ...) counts as not correct instead of stopping the evaluation."""
    return [(s.value or 0.0) >= 1.0 for s in scorer(list(zip(texts, truths)))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, tokenizer, tasks: Sequence, reward_fn: Callable[[str, str], float], *,
             max_new_tokens: int, pass_k: int = 0, temperature: float = 1.0, seed: int = 0,
             batch_size: int = 512, scorer=None) -> dict[str, float]:
    """``{"accuracy": greedy accuracy, f"pass@{k}": ...}`` over ``tasks`` (pass@k sampled at ``temperature``).

    ``scorer``: a :class:`~offpolicy.rewards.guard.GuardedReward` (time limits); default: ``reward_fn``
    in-process with its exceptions and bad values counted as wrong answers. ``batch_size``: sequences
    generated together (greedy: prompts; pass@k: ``batch_size // k`` prompts x k samples).
    """
    scorer = scorer or GuardedReward(reward_fn, timeout_s=None)
    was_training = model.training
    model.eval()
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    correct, pass_sum = 0.0, 0.0
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        prompts = encode_prompts(tokenizer, chunk)
        ro = engine.generate(prompts, max_new_tokens=max_new_tokens, greedy=True)
        texts = decode_texts(tokenizer, ro.response_ids)
        correct += sum(_n_correct(scorer, texts, [t.answer for t in chunk]))
        if not pass_k:
            continue
        per = max(1, batch_size // pass_k)  # prompts per sampled batch of <= batch_size sequences
        for j0 in range(0, len(chunk), per):
            sub = chunk[j0 : j0 + per]
            ro = engine.generate(prompts[j0 : j0 + per], n=pass_k, max_new_tokens=max_new_tokens,
                                 temperature=temperature, generator=gen)
            texts = decode_texts(tokenizer, ro.response_ids)
            ok = _n_correct(scorer, texts, [t.answer for t in sub for _ in range(pass_k)])
            for j in range(len(sub)):
                pass_sum += pass_at_k(pass_k, sum(ok[j * pass_k : (j + 1) * pass_k]), pass_k)
    model.train(was_training)
    out = {"accuracy": correct / max(len(tasks), 1)}
    if pass_k:
        out[f"pass@{pass_k}"] = pass_sum / max(len(tasks), 1)
    return out


@torch.no_grad()
def evaluate_workflow(model, engine, workflow, tokenizer, tasks: Sequence, scorer, *, max_new_tokens: int,
                      batch_size: int = 512) -> dict[str, float]:
    """Greedy held-out evaluation through the run's workflow (one episode per task): ``accuracy`` and, for
    multi-turn workflows, ``success`` and the per-episode means (``tool_calls_mean``, ``turns_mean``, ...).
    For the single-turn workflow this is the same computation as :func:`evaluate`'s greedy accuracy."""
    from offpolicy.train.metrics import episode_metrics
    from offpolicy.rollout.workflow import Sampling

    was_training = model.training
    model.eval()
    exps = []
    for i in range(0, len(tasks), batch_size):
        exps += workflow(engine, tokenizer, tasks[i : i + batch_size], scorer,
                         sampling=Sampling(group_size=1, max_new_tokens=max_new_tokens, greedy=True), version=0,
                         batch_index=-1, generator=None)
    model.train(was_training)
    return {"accuracy": sum(bool(e.info.get("correct")) for e in exps) / max(len(exps), 1), **episode_metrics(exps)}
