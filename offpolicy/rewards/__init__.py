"""Reward functions: plain functions ``(response: str, ground_truth: str) -> float``.

``math_reward`` checks a math answer (see docs/rewards.md), ``format_reward`` the ``<think>``/``<answer>``
layout, ``code_exec_reward`` runs generated code in a sandbox (see docs/code_exec.md);
``combine_rewards`` makes a weighted sum of rewards; ``guard`` isolates reward faults per sample.
"""

from __future__ import annotations

import difflib
from math import isfinite  # not `import math`: the name is the submodule offpolicy.rewards.math
from typing import Callable

from offpolicy.rewards.code_exec import ExecResult, SandboxError, code_exec_reward, run_code
from offpolicy.rewards.exact_match import exact_match, parse_final_integer
from offpolicy.rewards.math import final_answer, format_reward, math_reward

REWARDS = {"exact_match": exact_match, "code_exec": code_exec_reward, "math": math_reward, "format": format_reward}


class WeightedSum:
    """``sum_i w_i * f_i(response, ground_truth)``. A class, not a closure, so that it pickles (by
    reference to module-level rewards) into `GuardedReward`'s worker process."""

    def __init__(self, terms: list[tuple[Callable[[str, str], float], float]]):
        self.terms = tuple(terms)

    def __call__(self, response: str, ground_truth: str) -> float:
        return sum(w * fn(response, ground_truth) for fn, w in self.terms)

    def __repr__(self) -> str:
        return ",".join(f"{getattr(fn, '__name__', fn)}:{w:g}" for fn, w in self.terms)


def combine_rewards(weights: dict[str, float] | list[tuple[Callable | str, float]]) -> WeightedSum:
    """A reward that is the weighted sum of others: ``{"math": 1.0, "format": 0.1}`` (built-in names) or
    ``[(fn, weight), ...]`` (callables or built-in names). Raises ValueError for an unknown name, a
    non-finite weight or no terms; TypeError for something that is not callable."""
    terms = []
    for fn, weight in weights.items() if isinstance(weights, dict) else weights:
        if isinstance(fn, str):
            if fn not in REWARDS:
                close = difflib.get_close_matches(fn, REWARDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown reward {fn!r}{hint}; built-in: {sorted(REWARDS)}")
            fn = REWARDS[fn]
        if not callable(fn):
            raise TypeError(f"reward {fn!r} is not callable")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isfinite(weight):
            raise ValueError(f"weight of {getattr(fn, '__name__', fn)!r} must be a finite number, got {weight!r}")
        terms.append((fn, float(weight)))
    if not terms:
        raise ValueError("combine_rewards: no rewards given")
    return WeightedSum(terms)


__all__ = ["REWARDS", "WeightedSum", "combine_rewards", "exact_match", "parse_final_integer", "math_reward",
           "format_reward", "final_answer", "code_exec_reward", "run_code", "ExecResult", "SandboxError"]
