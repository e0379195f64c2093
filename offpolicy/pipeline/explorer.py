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
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch

from offpolicy.config import Config
from offpolicy.data.experience import Experience
from offpolicy.rewards.guard import FirstFaults, GuardedReward, RewardFaultError  # noqa: F401 (re-exported)
from offpolicy.rollout.engine import make_engine
from offpolicy.rollout.workflow import Sampling, build_workflow


def as_generator_state(x) -> torch.Tensor:
    """A torch.Generator state from bytes or a uint8 tensor."""
    if isinstance(x, (bytes, bytearray)):
        return torch.frombuffer(bytearray(x), dtype=torch.uint8).clone()
    return torch.as_tensor(x, dtype=torch.uint8)


def weights_version(batch_index: int, *, sync_offset: int, sync_interval: int) -> int:
    """The policy version that generates batch ``batch_index`` (see the module docstring)."""
    lagged = batch_index - sync_offset
    return max(0, lagged // sync_interval * sync_interval) if lagged > 0 else 0


class Explorer:
    """Task stream + rollout engine + workflow + guarded reward: ``explore(e, version)`` makes batch ``e``.

    ``tasks``: the endless training-task stream and ``reward_fn`` the reward, both built once by the
    caller (:func:`~offpolicy.pipeline.context.task_source`, :func:`~offpolicy.pipeline.context.reward_function`).
    """

    def __init__(self, cfg: Config, model, tokenizer, *, tasks: Iterator, reward_fn: Callable[[str, str], float],
                 run_dir: Path | None = None):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.engine = make_engine(cfg.rollout, model, tokenizer, seed=cfg.train.seed)
        self.engine_load_s = 0.0  # seconds the engine spent loading new weights for the last batch
        self.workflow = build_workflow(cfg.workflow)
        self.tasks = tasks
        self.tasks_consumed = 0
        self.fault_log = None if run_dir is None else Path(run_dir) / "reward_faults.log"
        # the first fault of each kind is printed as it happens; a hanging reward trips the circuit breaker
        self.reward = GuardedReward.from_config(reward_fn, cfg.reward, on_fault=FirstFaults(self.fault_log))
        if cfg.reward.model is not None:  # RLHF: a learned reward scores the training samples (it sees the prompt)
            from offpolicy.rewards.reward_model import RewardModelScorer

            # reward.function still decides whether each answer is right (the accuracy metric), not the reward
            self.reward = RewardModelScorer(cfg.reward.model, device=cfg.model.device, checker=self.reward,
                                            batch_size=cfg.reward.model_batch_size, weight=cfg.reward.model_weight)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    @classmethod
    def from_context(cls, ctx) -> "Explorer":
        """The explorer of a run context (its policy, task stream and reward), in this process."""
        return cls(ctx.cfg, ctx.model, ctx.tokenizer, tasks=ctx.train_tasks, reward_fn=ctx.reward_fn,
                   run_dir=ctx.run_dir)

    def state_dict(self) -> dict:
        """Progress of the task stream and the sampling generator's state as bytes (for checkpoints;
        plain bytes cross a process boundary, a shared tensor would die with its sender)."""
        return {"tasks_consumed": self.tasks_consumed, "generator": bytes(self.generator.get_state().numpy())}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: only on a fresh explorer (its stream still at the start)."""
        if self.tasks_consumed:
            raise RuntimeError("Explorer.load_state_dict: the task stream has already been drawn from")
        for _ in range(state["tasks_consumed"]):
            next(self.tasks)
        self.tasks_consumed = state["tasks_consumed"]
        self.generator.set_state(as_generator_state(state["generator"]))

    def explore(self, batch_index: int, version: int, prompts: int | None = None) -> tuple[list[Experience], float]:
        """(experiences of batch ``batch_index``, generation seconds); ``prompts`` tasks (default
        ``rollout.prompts_per_step``). The engine first serves ``version`` — ``self.model``'s weights, which
        the runner has brought to that version (an engine with its own copy, vLLM, loads them here, between
        batches; ``engine_load_s`` is the time that took, not part of the generation seconds)."""
        r = self.cfg.rollout
        self.engine_load_s = self.engine.update_weights(self.model, version)
        t0 = time.perf_counter()
        tasks = [next(self.tasks) for _ in range(r.prompts_per_step if prompts is None else prompts)]
        self.tasks_consumed += len(tasks)
        was_training = self.model.training
        self.model.eval()
        sampling = Sampling(r.group_size, r.max_new_tokens, r.temperature, r.top_p, r.top_k)
        exps = self.workflow(self.engine, self.tokenizer, tasks, self.reward, sampling=sampling, version=version,
                             batch_index=batch_index, generator=self.generator)
        self.model.train(was_training)
        invalid = sum("reward_fault" in e.info for e in exps) / len(exps)
        if invalid > self.cfg.reward.max_invalid_frac:
            kinds = Counter(e.info["reward_fault"] for e in exps if "reward_fault" in e.info)
            raise RewardFaultError(f"batch {batch_index}: {invalid:.0%} of the samples have faulty rewards "
                                   f"({dict(kinds)}), above reward.max_invalid_frac="
                                   f"{self.cfg.reward.max_invalid_frac}; see {self.fault_log}")
        return exps, time.perf_counter() - t0

    def close(self) -> None:
        self.reward.close()
        self.engine.close()
