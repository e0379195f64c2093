"""The environment interface of multi-turn (agentic) workflows, small and async.

An environment turns one task into an episode: ``reset(task)`` gives the first observation, then each
model turn (its text) goes to ``step(action)``, which answers with the next observation, a reward, whether
the episode is over, and an info dict (tool calls made, errors by kind, success, seconds spent). The
multi-turn workflow (:mod:`offpolicy.rollout.multi_turn`) owns the tokens: it renders observations into
token ids (with the tokenizer's chat template, or as plain text for the bundled character model) and never
re-tokenises what the model produced.

Environments are registered by name (``ENVS``) or given as ``package.module:attr`` (a class or factory
called with the environment's keyword settings, returning an :class:`Env`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable


@dataclass
class StepResult:
    """What an environment answers to one model turn.

    ``observation``: the text the model sees next (a tool result, an error message, feedback); ``role``:
    the chat role it is rendered under (``"tool"`` for tool results, ``"user"`` for feedback); ``reward``:
    this step's reward (the episode's return is the sum); ``done``: the episode is over (no observation
    is shown then); ``info``: counters merged into the episode's info (``tool_calls``, ``tool_errors``
    by kind, ``success``, ``env_s``, ...).
    """

    observation: str = ""
    reward: float = 0.0
    done: bool = False
    role: str = "tool"
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """One episode at a time; a fresh instance (or ``reset``) per episode.

    Optional attributes the multi-turn workflow reads (defaults in brackets): ``chat`` [False] — render
    observations as chat messages with the tokenizer's chat template (``tools`` passed to it), else append
    them as plain text; ``tools`` [[]] — JSON schemas of the tools, for the chat template; ``stop`` [()] —
    strings at which the model's generation pauses for the environment (each must be one token of the
    tokenizer; the end-of-sequence token always ends a turn).
    """

    async def reset(self, task) -> str:
        """Start an episode on ``task`` (prompt, answer, meta); returns the first observation (may be the
        prompt itself, or '' when the task's prompt is the whole first turn)."""

    async def step(self, action: str) -> StepResult:
        """Take the model's turn (decoded text, special tokens removed) and answer it."""


ENVS: dict[str, Callable[..., Env]] = {}


def register_env(name: str, factory: Callable[..., Env]) -> Callable[..., Env]:
    """Add an environment factory under ``name``; refuses a name already taken."""
    if name in ENVS:
        raise ValueError(f"environment {name!r} is already registered; pick another name")
    ENVS[name] = factory
    return factory


def make_env_factory(name: str, **settings) -> Callable[[], Env]:
    """A zero-argument factory of fresh environments: a registered ``name`` or ``package.module:attr``."""
    factory = resolve_env(name)
    try:
        inspect.signature(factory).bind(**settings)
    except TypeError as e:
        raise ValueError(f"workflow.env_args for {name!r}: {e}") from None
    return lambda: factory(**settings)


def resolve_env(name: str) -> Callable[..., Env]:
    """The factory registered as ``name``, or imported from ``package.module:attr``."""
    import difflib
    import importlib

    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"workflow.env: cannot import {name!r}: {e}") from None
    else:
        _load_builtin_envs()
        if name not in ENVS:
            close = difflib.get_close_matches(name, list(ENVS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"workflow.env: unknown environment {name!r}{hint}; built-in: {sorted(ENVS)}, "
                             "or give 'package.module:attr'")
        factory = ENVS[name]
    return factory


def accepts(factory: Callable, keyword: str) -> bool:
    """Whether ``factory`` takes ``keyword`` (or any keyword)."""
    params = inspect.signature(factory).parameters.values()
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)


def _load_builtin_envs() -> None:
    import importlib
    import pkgutil

    import offpolicy.rollout.envs as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
