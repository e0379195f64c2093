"""Held-out evaluation: greedy accuracy and pass@k (unbiased estimator, Chen et al. 2021), through a workflow
(one greedy episode per task; ``k`` sampled episodes per task for pass@k)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from offpolicy.rewards.guard import GuardedReward
from offpolicy.rollout.engine import HFEngine
from offpolicy.rollout.workflow import single_turn


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, tokenizer, tasks: Sequence, reward_fn: Callable[[str, str], float], *,
             max_new_tokens: int, pass_k: int = 0, temperature: float = 1.0, seed: int = 0,
             batch_size: int = 512, scorer=None) -> dict[str, float]:
    """``{"accuracy": greedy accuracy, f"pass@{k}": ...}`` of single-turn answers over ``tasks`` (pass@k
    sampled at ``temperature``), with the model's own HF engine: :func:`evaluate_workflow` with the
    ``single_turn`` workflow.

    ``scorer``: a :class:`~offpolicy.rewards.guard.GuardedReward` (time limits); default: ``reward_fn``
    in-process with its exceptions and bad values counted as wrong answers.
    """
    scorer = scorer or GuardedReward(reward_fn, timeout_s=None)
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    res = evaluate_workflow(model, engine, single_turn, tokenizer, tasks, scorer, max_new_tokens=max_new_tokens,
                            pass_k=pass_k, temperature=temperature, seed=seed, batch_size=batch_size)
    return {k: res[k] for k in ("accuracy", f"pass@{pass_k}") if k in res}


@torch.no_grad()
def evaluate_workflow(model, engine, workflow, tokenizer, tasks: Sequence, scorer, *, max_new_tokens: int,
                      pass_k: int = 0, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 512) -> dict[str, float]:
    """Held-out evaluation through the run's workflow: ``accuracy`` (one greedy episode per task), ``tasks``
    (how many), for multi-turn workflows ``success`` and the per-episode means (``tool_calls_mean``,
    ``turns_mean``, ...), and with ``pass_k`` ``pass@k`` from ``pass_k`` episodes per task sampled at
    ``temperature`` (seeded by ``seed``). A sample's correctness is the workflow's ``info["correct"]``.

    A workflow whose rows are not its episodes (online pairs: two rows per pair, none from a single sample)
    names the workflow that generates its episodes as ``eval_workflow``; that one is run here, so the measure
    does not depend on how rows are built from the samples. ``batch_size``: sequences generated together
    (greedy: tasks; pass@k: ``batch_size // pass_k`` tasks x ``pass_k`` episodes).
    """
    from offpolicy.rollout.workflow import Sampling
    from offpolicy.train.metrics import episode_metrics

    workflow = getattr(workflow, "eval_workflow", workflow)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    exps, pass_sum = [], 0.0
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        exps += workflow(engine, tokenizer, chunk, scorer, version=0, batch_index=-1, generator=None,
                         sampling=Sampling(group_size=1, max_new_tokens=max_new_tokens, greedy=True))
        if not pass_k:
            continue
        per = max(1, batch_size // pass_k)  # tasks per sampled batch of <= batch_size episodes
        for j0 in range(0, len(chunk), per):
            sub = chunk[j0 : j0 + per]
            sampled = workflow(engine, tokenizer, sub, scorer, version=0, batch_index=-1, generator=gen,
                               sampling=Sampling(group_size=pass_k, max_new_tokens=max_new_tokens,
                                                 temperature=temperature))
            if len(sampled) != len(sub) * pass_k:
                raise ValueError(f"pass@{pass_k}: the workflow gave {len(sampled)} rows for {len(sub)} tasks, not "
                                 f"{pass_k} episodes per task")
            for j in range(len(sub)):
                ok = sum(bool(e.info.get("correct")) for e in sampled[j * pass_k : (j + 1) * pass_k])
                pass_sum += pass_at_k(pass_k, ok, pass_k)
    model.train(was_training)
    out = {"accuracy": sum(bool(e.info.get("correct")) for e in exps) / max(len(exps), 1), "tasks": len(tasks),
           **episode_metrics(exps)}
    if pass_k:
        out[f"pass@{pass_k}"] = pass_sum / max(len(tasks), 1)
    return out
