"""Single-turn workflow: sample K responses per task, score them, emit experiences."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from offpolicy.data.experience import Experience
from offpolicy.rollout.engine import HFEngine


def single_turn(engine: HFEngine, tokenizer, tasks: Sequence, reward_fn: Callable[[str, str], float], *,
                group_size: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                version: int = 0, group_tag: str = "", generator: torch.Generator | None = None) -> list[Experience]:
    """One group of ``group_size`` experiences per task; the group id is ``<task_id>@<group_tag>``."""
    prompts = [tokenizer(t.prompt)["input_ids"] for t in tasks]
    ro = engine.generate(prompts, n=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, generator=generator)
    texts = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
    exps = []
    for i, (p_idx, resp, lp, text) in enumerate(zip(ro.prompt_index, ro.response_ids, ro.behav_logp, texts)):
        task = tasks[p_idx]
        reward = float(reward_fn(text, task.answer))
        exps.append(Experience(
            prompt_ids=torch.tensor(prompts[p_idx], dtype=torch.long), response_ids=resp,
            response_mask=torch.ones(len(resp)), behav_logp=lp, reward=reward,
            group_id=f"{task.task_id}@{group_tag or f'v{version}'}", task_id=task.task_id, version=version,
            info={"correct": reward >= 1.0, "finished": ro.finished[i]},
        ))
    return exps
