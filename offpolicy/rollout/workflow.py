"""Single-turn workflow: sample K responses per task, score them, emit experiences.

A sample whose reward faulted (raised, timed out, returned NaN/inf/None; see
:mod:`offpolicy.rewards.guard`) is kept but made inert: its trainable mask is all zero (no token
reaches the loss) and it is moved to a group of its own, so it shifts no other sample's baseline.
Its ``info["reward_fault"]`` names the fault.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from offpolicy.data.experience import Experience
from offpolicy.rewards.guard import Scored
from offpolicy.rollout.engine import HFEngine

Scorer = Callable[[Sequence[tuple[str, str]]], list[Scored]]


def encode_prompt(tokenizer, task) -> list[int]:
    """Token ids of ``task.prompt``. A plain prompt gets the tokenizer's special tokens (the bundled model's
    ``<bos>``); one rendered by a chat template already holds them (e.g. Llama 3's ``<|begin_of_text|>``),
    so none are added a second time."""
    return tokenizer(task.prompt, add_special_tokens=not getattr(task, "has_special_tokens", False))["input_ids"]


def single_turn(engine: HFEngine, tokenizer, tasks: Sequence, scorer: Scorer, *, group_size: int,
                max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                version: int = 0, batch_index: int = -1,
                generator: torch.Generator | None = None) -> list[Experience]:
    """One group of ``group_size`` experiences per task, each tagged with ``version`` and ``batch_index``.

    The group id only has to be unique per batch and is never parsed: ``<task_id>@b<batch_index>``
    (``<task_id>@v<version>`` when the batch is unknown, -1).
    """
    prompts = [encode_prompt(tokenizer, t) for t in tasks]
    ro = engine.generate(prompts, n=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, generator=generator)
    texts = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
    scores = scorer([(text, tasks[p].answer) for p, text in zip(ro.prompt_index, texts)])
    engine_logp = ro.engine_logp or [None] * len(ro.response_ids)
    tag = f"b{batch_index}" if batch_index >= 0 else f"v{version}"
    exps = []
    for i, (p_idx, resp, lp, score) in enumerate(zip(ro.prompt_index, ro.response_ids, ro.behav_logp, scores)):
        task = tasks[p_idx]
        group_id = f"{task.task_id}@{tag}"
        info = {"correct": score.value is not None and score.value >= 1.0, "finished": ro.finished[i]}
        mask = torch.ones(len(resp))
        if score.fault is not None:
            info["reward_fault"] = score.fault
            mask.zero_()
            group_id += f"#invalid{i}"
        exps.append(Experience(
            prompt_ids=torch.tensor(prompts[p_idx], dtype=torch.long), response_ids=resp, response_mask=mask,
            behav_logp=lp, engine_logp=engine_logp[i], reward=0.0 if score.value is None else score.value,
            group_id=group_id, task_id=task.task_id, version=version, batch_index=batch_index, info=info,
        ))
    return exps
