"""Multi-turn workflow: episodes with an environment (tools), assembled token-in / token-out.

Each task gets ``group_size`` episodes. Per turn, every unfinished episode's context (prompt + everything
so far) goes to the rollout engine in one batch; generation pauses at the end-of-sequence token or at a
``stop`` token of the environment. The model's new tokens are appended as they were sampled (never
re-tokenised) with mask 1 and their ``behav_logp``; the decoded turn goes to ``env.step``; the observation
is appended with mask 0 and ``behav_logp`` 0:

- plain environments (the bundled character model): the observation text, tokenised on its own;
- chat environments (``env.chat``): the conversation is re-rendered with ``tokenizer.apply_chat_template(
  messages, tools=env.tools, add_generation_prompt=True)`` and the new ids must extend the previous ids
  exactly; the extension (the tool message and the next assistant header) is the observation. A template
  that re-tokenises what the model wrote breaks the prefix: the episode stops there, is made inert
  (mask 0: not trained on), counted in ``prefix_failures`` and reported once with the turn and task.

The episode ends when the environment says so (a turn without a tool call is the final answer), after
``max_turns`` model turns, or at ``max_total_tokens`` response tokens (model and environment). Its reward
is the sum of the environment's step rewards (the environment scores the final answer: it knows its
format); ``info["success"]`` comes from the environment too. An episode whose reward faulted
(``info["reward_fault"]`` from the environment) is made inert, as in the single-turn workflow. ``info["episode"]`` carries the counters the trainer logs per step: turns,
tool calls, tool errors by kind, environment seconds, prefix failures. Every turn but the last asks the
engine to keep its KV cache (``keep_kv``), so the next turn runs only the tokens the episode gained since
(the HF engine: :mod:`offpolicy.rollout.kv_reuse`; vLLM's prefix cache does it by itself).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from offpolicy.data.experience import Experience
from offpolicy.rollout.env import Env, StepResult, accepts, make_env_factory, resolve_env
from offpolicy.rewards.guard import Scored
from offpolicy.rollout.workflow import Sampling, Scorer, encode_prompt, group_id, make_inert


@dataclass
class Episode:
    """One episode's token-level trajectory and counters."""

    task: object
    env: Env
    prompt_ids: list[int]
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    behav: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    last_text: str = ""
    env_reward: float = 0.0
    fault: str | None = None
    done: bool = False
    stats: Counter = field(default_factory=Counter)

    def append(self, ids: Sequence[int], trainable: bool, behav=None, engine=None) -> None:
        self.ids += list(ids)
        self.mask += [1.0 if trainable else 0.0] * len(ids)
        self.behav += list(behav) if behav is not None else [0.0] * len(ids)
        self.engine += list(engine) if engine is not None else list(behav) if behav is not None else [0.0] * len(ids)


class MultiTurn:
    """The ``multi_turn`` workflow (see the module docstring); ``env_factory()`` makes a fresh environment."""

    def __init__(self, env_factory: Callable[[], Env], *, max_turns: int = 4, max_total_tokens: int = 64):
        self.env_factory = env_factory
        self.max_turns = max_turns
        self.max_total_tokens = max_total_tokens
        self.reported: set[str] = set()

    @classmethod
    def from_config(cls, wcfg) -> "MultiTurn":
        """From the ``workflow`` section; the environment's settings are checked against its signature here.
        ``workflow.tool_timeout_s`` goes to environments that take a ``tool_timeout_s`` keyword."""
        settings = dict(wcfg.env_args)
        if accepts(resolve_env(wcfg.env), "tool_timeout_s"):
            settings.setdefault("tool_timeout_s", wcfg.tool_timeout_s)
        elif wcfg.tool_timeout_s != type(wcfg).model_fields["tool_timeout_s"].default:
            raise ValueError(f"workflow.tool_timeout_s: the environment {wcfg.env!r} takes no tool time limit (its "
                             "tools run in-process or under their own limit; see its settings in workflow.env_args)")
        factory = make_env_factory(wcfg.env, **settings)
        return cls(factory, max_turns=wcfg.max_turns, max_total_tokens=wcfg.max_total_tokens)

    def __call__(self, engine, tokenizer, tasks: Sequence, scorer: Scorer, *, sampling: Sampling, version: int = 0,
                 batch_index: int = -1, generator: torch.Generator | None = None) -> list[Experience]:
        episodes = asyncio.run(self._episodes(engine, tokenizer, tasks, sampling, generator))
        return [self._experience(e, i, version, batch_index) for i, e in enumerate(episodes)]

    async def _episodes(self, engine, tokenizer, tasks, sampling: Sampling, generator) -> list[Episode]:
        episodes = []
        for task in tasks:
            for _ in range(sampling.group_size):
                env = self.env_factory()
                episodes.append(Episode(task, env, []))
        await asyncio.gather(*(self._start(e, tokenizer) for e in episodes))
        stop_ids = _stop_ids(episodes[0].env, tokenizer) if episodes else []
        for turn in range(1, self.max_turns + 1):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            budget = [self.max_total_tokens - len(e.ids) for e in active]
            contexts, n = _shared([e.prompt_ids + e.ids for e in active], sampling.group_size)
            ro = engine.generate(contexts, n=n, max_new_tokens=min(sampling.max_new_tokens, max(budget)),
                                 temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                 greedy=sampling.greedy, stop_ids=stop_ids, generator=generator,
                                 keep_kv=turn < self.max_turns)
            engine_lp = ro.engine_logp or ro.behav_logp
            for e, room, resp, lp, elp in zip(active, budget, ro.response_ids, ro.behav_logp, engine_lp):
                e.append(resp[:room].tolist(), True, lp[:room].tolist(), elp[:room].tolist())
                e.last_text = tokenizer.decode(resp[:room], skip_special_tokens=True)
                e.stats["turns"] += 1
            results = await asyncio.gather(*(self._step(e) for e in active))
            for e, res in zip(active, results):
                self._observe(e, res, tokenizer, turn)
        return episodes

    async def _start(self, e: Episode, tokenizer) -> None:
        """``env.reset``; an environment that raises there ends its episode before it starts, as inert."""
        try:
            first = await e.env.reset(e.task)
        except Exception as exc:  # a user environment may raise anything; the episode is isolated
            self._raised(e, "reset", exc)
            e.prompt_ids = encode_prompt(tokenizer, e.task)
            e.fault, e.done = "env_exception", True
            return
        if getattr(e.env, "chat", False):
            e.messages = [{"role": "user", "content": first or e.task.prompt}]
            e.prompt_ids = _render(tokenizer, e.messages, e.env)
        else:
            e.prompt_ids = encode_prompt(tokenizer, e.task)
            if first:
                e.prompt_ids += tokenizer(first, add_special_tokens=False)["input_ids"]

    async def _step(self, e: Episode) -> StepResult:
        """``env.step``; an environment that raises ends its episode as inert (``env_exception``), reported once."""
        t0 = time.perf_counter()
        try:
            res = await e.env.step(e.last_text)
        except Exception as exc:  # a user environment may raise anything; the episode is isolated
            self._raised(e, "step", exc)
            res = StepResult(done=True, info={"reward_fault": "env_exception"})
        e.stats["env_s"] += time.perf_counter() - t0
        return res

    def _raised(self, e: Episode, where: str, exc: Exception) -> None:
        if "env" not in self.reported:
            self.reported.add("env")
            print(f"multi_turn: the environment raised on task {e.task.task_id} in {where}: {exc!r}; the episode is "
                  "not trained on (reward_faults/env_exception)", file=sys.stderr)

    def _observe(self, e: Episode, res: StepResult, tokenizer, turn: int) -> None:
        """Merge the step's info; end the episode, or append the observation's tokens (mask 0)."""
        for k, v in res.info.items():
            if isinstance(v, bool):
                e.stats[k] = int(v)
            elif isinstance(v, (int, float)):
                e.stats[k] += v
            elif k == "reward_fault":
                e.fault = str(v)
        e.env_reward += res.reward
        room = self.max_total_tokens - len(e.ids)
        if res.done or e.stats["turns"] >= self.max_turns or room <= 0:
            e.done = True
            return
        if getattr(e.env, "chat", False):
            e.messages += [{"role": "assistant", "content": e.last_text}, {"role": res.role, "content": res.observation}]
            new = _render(tokenizer, e.messages, e.env)
            prev = e.prompt_ids + e.ids
            if new[: len(prev)] != prev:
                self._prefix_break(e, turn, prev, new)
                return
            obs = new[len(prev):]
        else:
            obs = tokenizer(res.observation, add_special_tokens=False)["input_ids"]
        e.append(obs[:room], False)
        if len(obs) >= room:
            e.done = True

    def _prefix_break(self, e: Episode, turn: int, prev: list[int], new: list[int]) -> None:
        e.stats["prefix_failures"] += 1
        e.done = True
        if "prefix" not in self.reported:
            self.reported.add("prefix")
            at = next((i for i, (a, b) in enumerate(zip(prev, new)) if a != b), min(len(prev), len(new)))
            print(f"multi_turn: the chat template does not extend the previous turn's token ids at turn {turn} "
                  f"(task {e.task.task_id}, first difference at token {at}); the episode stops there and is not "
                  "trained on (counted in prefix_failures)", file=sys.stderr)

    def _experience(self, e: Episode, row: int, version: int, batch_index: int) -> Experience:
        correct = bool(e.stats.pop("success", 0))
        reward = e.env_reward
        stats = {k: v for k, v in e.stats.items()}
        stats.setdefault("tool_calls", 0)
        stats.setdefault("prefix_failures", 0)
        exp = Experience(
            prompt_ids=torch.tensor(e.prompt_ids, dtype=torch.long), response_ids=torch.tensor(e.ids, dtype=torch.long),
            response_mask=torch.tensor(e.mask), behav_logp=torch.tensor(e.behav),
            engine_logp=torch.tensor(e.engine) if e.engine != e.behav else None, reward=reward,
            group_id=group_id(e.task, version, batch_index), task_id=e.task.task_id, version=version,
            batch_index=batch_index, info={"correct": correct, "success": correct, "episode": stats})
        if e.fault is not None:
            make_inert(exp, Scored(None, e.fault), row)
        elif stats["prefix_failures"]:
            exp.response_mask = torch.zeros_like(exp.response_mask)
            exp.group_id += f"#prefix{row}"
        return exp


def _shared(contexts: list[list[int]], k: int) -> tuple[list[list[int]], int]:
    """(contexts, n) for the engine: while every run of ``k`` consecutive episodes (one task's group) still
    has the same context (the first turn), each distinct context once with ``n = k`` — the engine then runs
    its forward once per group — else every context with ``n = 1``. Rows come back in the same order."""
    if k > 1 and len(contexts) % k == 0 and all(contexts[i] == contexts[i - i % k] for i in range(len(contexts))):
        return contexts[::k], k
    return contexts, 1


def _render(tokenizer, messages: list[dict], env) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tools=getattr(env, "tools", None) or None,
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _stop_ids(env, tokenizer) -> list[int]:
    """Token ids of the environment's stop strings; each must be a single token."""
    out = []
    for s in getattr(env, "stop", ()):
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"multi_turn: the environment's stop string {s!r} is {len(ids)} tokens for this "
                             "tokenizer; a stop must be one token")
        out.append(ids[0])
    return out
