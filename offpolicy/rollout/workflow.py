"""Workflows: how a batch of tasks becomes experiences. The explorer is built from a rollout engine and
a workflow, each behind a small protocol, chosen by config (``workflow.name``: a registered name or
``package.module:attr``); no runner looks at which.

A workflow is called as ``workflow(engine, tokenizer, tasks, scorer, *, sampling, version, batch_index,
generator) -> list[Experience]`` with ``sampling.group_size`` experiences per task, in task order.
``scorer`` is the run's fault-isolated reward (:class:`~offpolicy.rewards.guard.GuardedReward`).

- ``single_turn``: sample K responses per task, score them.
- ``multi_turn`` (:mod:`offpolicy.rollout.multi_turn`): episodes with an environment and tools.
- ``pairs`` (:mod:`offpolicy.rollout.pairs`): offline preference pairs as (chosen, rejected) experiences.
- ``online_pairs`` (:mod:`offpolicy.rollout.online_pairs`): pairs built from each task's scored samples.

A workflow that yields other than ``group_size`` rows per task says how many with
``rows_per_task(group_size) -> int`` (see :func:`rows_per_step`).

A workflow may also have ``evaluate(ctx, tasks) -> dict`` (with ``accuracy``), which the trainer's
held-out evaluation then uses instead of greedy generation (the pairs workflow measures preference
accuracy that way), or ``eval_workflow``: the workflow whose greedy episodes are scored instead of its own
(``online_pairs`` names ``single_turn``: its samples are evaluated, not the pairs built from them).

A sample whose reward faulted (raised, timed out, returned NaN/inf/None; see
:mod:`offpolicy.rewards.guard`) is kept but made inert (:func:`make_inert`): its trainable mask is all zero
(no token reaches the loss) and it is moved to a group of its own, so it shifts no other sample's baseline.
Its ``info["reward_fault"]`` names the fault.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch

from offpolicy.data.experience import Experience
from offpolicy.rewards.guard import Scored

# scores (response, ground_truth, prompt) samples: rule rewards read the first two, a reward model all three
Scorer = Callable[[Sequence[tuple[str, str, str]]], list[Scored]]


class Sampling(NamedTuple):
    """How a workflow samples: ``group_size`` responses per task, the engine's sampling settings."""

    group_size: int = 1
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


class Workflow(Protocol):
    def __call__(self, engine, tokenizer, tasks: Sequence, scorer: Scorer, *, sampling: Sampling, version: int,
                 batch_index: int, generator: torch.Generator | None) -> list[Experience]: ...


def encode_prompt(tokenizer, task) -> list[int]:
    """Token ids of ``task.prompt``. A plain prompt gets the tokenizer's special tokens (the bundled model's
    ``<bos>``); one rendered by a chat template already holds them (e.g. Llama 3's ``<|begin_of_text|>``),
    so none are added a second time."""
    return tokenizer(task.prompt, add_special_tokens=not getattr(task, "has_special_tokens", False))["input_ids"]


def encode_prompts(tokenizer, tasks: Sequence) -> list[list[int]]:
    """:func:`encode_prompt` of each task, with one tokenizer call per kind (with / without special tokens)."""
    out: list[list[int] | None] = [None] * len(tasks)
    for special in (True, False):
        idx = [i for i, t in enumerate(tasks) if (not getattr(t, "has_special_tokens", False)) == special]
        if idx:
            ids = tokenizer([tasks[i].prompt for i in idx], add_special_tokens=special)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = row
    return out


def decode_texts(tokenizer, rows: Sequence) -> list[str]:
    """``tokenizer.batch_decode(rows, skip_special_tokens=True)`` of token-id rows (lists or 1-D tensors).

    A Rust-backed tokenizer whose decoding transformers does not post-process (no
    ``clean_up_tokenization_spaces``, ``_decode`` not overridden) is decoded by its backend: the same strings,
    without transformers' per-id conversion (~1.5 ms of a demo step), and one row at a time: the
    backend's ``decode_batch`` hands the rows to its thread pool, whose threads then wait for the cores that
    torch's OpenMP threads still spin on after a forward (256 demo rows right after a matmul: 0.66 ms batched,
    0.04 ms one by one; ~2.6 ms of the demo's explore step batched). Any other goes through ``batch_decode``."""
    rows = [r.tolist() if torch.is_tensor(r) else r for r in rows]
    backend = getattr(tokenizer, "_tokenizer", None)
    if (backend is not None and hasattr(backend, "decode") and not tokenizer.clean_up_tokenization_spaces
            and _plain_decode(type(tokenizer))):
        return [backend.decode(r, skip_special_tokens=True) for r in rows]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _plain_decode(cls) -> bool:
    """Whether ``cls`` decodes with transformers' own Rust-backed ``_decode`` / ``batch_decode`` (a subclass
    that overrides either may post-process the text)."""
    try:
        from transformers import PreTrainedTokenizerFast as Fast  # TokenizersBackend in transformers 5
    except ImportError:  # pragma: no cover - every supported transformers has it
        return False
    return cls._decode is Fast._decode and cls.batch_decode is Fast.batch_decode and cls.decode is Fast.decode


def group_id(task, version: int, batch_index: int) -> str:
    """Unique per batch, never parsed (the batch index and version are fields of the experience)."""
    return f"{task.task_id}@{f'b{batch_index}' if batch_index >= 0 else f'v{version}'}"


def make_inert(exp: Experience, score: Scored, row: int) -> None:
    """A sample whose reward faulted: no trainable token, a group of its own, the fault named in info."""
    exp.info["reward_fault"] = score.fault
    exp.response_mask = torch.zeros_like(exp.response_mask)
    exp.group_id += f"#invalid{row}"


def single_turn(engine, tokenizer, tasks: Sequence, scorer: Scorer, *, sampling: Sampling, version: int = 0,
                batch_index: int = -1, generator: torch.Generator | None = None) -> list[Experience]:
    """One group of ``sampling.group_size`` experiences per task, each tagged with ``version`` and ``batch_index``."""
    s = sampling
    prompts = encode_prompts(tokenizer, tasks)
    ro = engine.generate(prompts, n=s.group_size, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_p=s.top_p, top_k=s.top_k, greedy=s.greedy, generator=generator)
    texts = decode_texts(tokenizer, ro.response_ids)
    scores = scorer([(text, tasks[p].answer, tasks[p].prompt) for p, text in zip(ro.prompt_index, texts)])
    engine_logp = ro.engine_logp or [None] * len(ro.response_ids)
    prompt_tensors = [torch.tensor(p, dtype=torch.long) for p in prompts]  # shared by the task's samples (read-only)
    lengths = [len(r) for r in ro.response_ids]
    masks = torch.ones(sum(lengths)).split(lengths)  # one allocation, a view per row
    exps = []
    for i, (p_idx, resp, lp, score) in enumerate(zip(ro.prompt_index, ro.response_ids, ro.behav_logp, scores)):
        task = tasks[p_idx]
        correct = score.correct if score.correct is not None else score.value is not None and score.value >= 1.0
        info = {"correct": correct, "finished": ro.finished[i]}
        exp = Experience(
            prompt_ids=prompt_tensors[p_idx], response_ids=resp,
            response_mask=masks[i], behav_logp=lp, engine_logp=engine_logp[i],
            reward=0.0 if score.value is None else score.value, group_id=group_id(task, version, batch_index),
            task_id=task.task_id, version=version, batch_index=batch_index, info=info)
        if score.fault is not None:
            make_inert(exp, score, i)
        exps.append(exp)
    return exps


def _single_turn_factory(workflow_cfg) -> Workflow:
    return single_turn


def _multi_turn_factory(workflow_cfg) -> Workflow:
    from offpolicy.rollout.multi_turn import MultiTurn

    return MultiTurn.from_config(workflow_cfg)


def _pairs_factory(workflow_cfg) -> Workflow:
    from offpolicy.rollout.pairs import PairsWorkflow

    return PairsWorkflow()


def _online_pairs_factory(workflow_cfg) -> Workflow:
    from offpolicy.rollout.online_pairs import OnlinePairs

    return OnlinePairs.from_config(workflow_cfg)


# name -> factory(workflow config section) -> Workflow
WORKFLOWS: dict[str, Callable[[Any], Workflow]] = {"single_turn": _single_turn_factory,
                                                  "multi_turn": _multi_turn_factory, "pairs": _pairs_factory,
                                                  "online_pairs": _online_pairs_factory}


def rows_per_step(workflow: Workflow, prompts_per_step: int, group_size: int) -> int:
    """Rows one explorer batch yields, which the trainer then takes per step: ``group_size`` per task,
    unless the workflow says otherwise with ``rows_per_task(group_size)`` (online pairs)."""
    per_task = getattr(workflow, "rows_per_task", None)
    return prompts_per_step * (per_task(group_size) if per_task is not None else group_size)


def register_workflow(name: str, factory: Callable[[Any], Workflow]) -> None:
    """Add a workflow factory (called with the ``workflow`` config section); refuses a taken name."""
    if name in WORKFLOWS:
        raise ValueError(f"workflow {name!r} is already registered; pick another name")
    WORKFLOWS[name] = factory


def build_workflow(workflow_cfg) -> Workflow:
    """``workflow.name``: a registered workflow, or ``package.module:attr`` (a workflow factory called with
    the config section, or a workflow function itself)."""
    import difflib
    import importlib
    import inspect

    name = workflow_cfg.name
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"workflow.name: cannot import {name!r}: {e}") from None
        params = list(inspect.signature(obj).parameters)
        return obj(workflow_cfg) if len(params) == 1 else obj
    if name not in WORKFLOWS:
        close = difflib.get_close_matches(name, list(WORKFLOWS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"workflow.name: unknown workflow {name!r}{hint}; built-in: {sorted(WORKFLOWS)}, or "
                         "give 'package.module:attr'")
    return WORKFLOWS[name](workflow_cfg)
