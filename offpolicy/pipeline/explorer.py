"""The explorer: turns tasks into scored experiences with the weights of a given policy version.

The same :class:`Explorer` runs inline in the synchronous runner and in its own process in the
asynchronous one, so that at staleness 0 both produce identical batches from identical seeds.

Schedule: batch ``e`` (0-based) is generated with the weights of version
``weights_version(e) = max(0, floor((e - sync_offset) / sync_interval) * sync_interval)``,
and trained at trainer version ``e``; its staleness is ``e - weights_version(e)``, between
``sync_offset`` and ``sync_offset + sync_interval - 1`` once ``e >= sync_offset`` (the first
``sync_offset`` batches can only come from version 0).
"""

from __future__ import annotations

import time

import torch

from offpolicy.config import Config
from offpolicy.data.experience import Experience
from offpolicy.pipeline.context import reward_function, task_source
from offpolicy.rollout.engine import HFEngine
from offpolicy.rollout.workflow import single_turn


def weights_version(batch_index: int, *, sync_offset: int, sync_interval: int) -> int:
    """The policy version that generates batch ``batch_index`` (see the module docstring)."""
    lagged = batch_index - sync_offset
    return max(0, lagged // sync_interval * sync_interval) if lagged > 0 else 0


class Explorer:
    """Task stream + sampling engine + reward: ``explore(e, version)`` makes batch ``e``."""

    def __init__(self, cfg: Config, model, tokenizer):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
        self.tasks = task_source(cfg)[0]
        self.reward_fn = reward_function(cfg)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    def explore(self, batch_index: int, version: int) -> tuple[list[Experience], float]:
        """(experiences of batch ``batch_index``, generation seconds)."""
        r = self.cfg.rollout
        t0 = time.perf_counter()
        tasks = [next(self.tasks) for _ in range(r.prompts_per_step)]
        was_training = self.model.training
        self.model.eval()
        exps = single_turn(self.engine, self.tokenizer, tasks, self.reward_fn, group_size=r.group_size,
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                           version=version, group_tag=f"b{batch_index}", generator=self.generator)
        self.model.train(was_training)
        return exps, time.perf_counter() - t0
