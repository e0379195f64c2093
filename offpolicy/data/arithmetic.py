"""Arithmetic word problems in miniature: a GSM8K-shaped task family that a CPU can learn.

Problems are short expressions with an integer answer, at several difficulty levels:

- level 1 (one step):  ``37+48=``  or ``91-26=``  (two-digit operands, answer may be negative)
- level 2 (two steps): ``37+48-19=`` (the first step is a two-digit sum)

Every problem is a pure function of ``(seed, index)``; the train and held-out splits are
drawn from disjoint halves of the problem space (by a hash of the expression), so the same
expression can never appear in both. The model answers with the integer and then EOS.

``slipped_answer`` produces the systematic mistake used to build the bundled model's warm
start: the carry of the units-digit addition is dropped (``37+48 -> 75``), the tiny-model
equivalent of a common reasoning slip that RL can then fix.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterator

ALPHABET = "0123456789+-="


@dataclass(frozen=True)
class Task:
    """A prompt plus what the reward needs."""

    task_id: str
    prompt: str
    answer: str
    level: int = 1
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def _split_of(expr: str) -> str:
    """Deterministic, seed-independent split: ~10% of expressions are held out."""
    h = int(hashlib.sha1(expr.encode()).hexdigest()[:8], 16)
    return "eval" if h % 10 == 0 else "train"


def _make_expr(rng: random.Random, level: int) -> tuple[str, int, tuple[int, int, str]]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    if level == 1:
        return f"{a}{op}{b}", (a + b if op == "+" else a - b), (a, b, op)
    c = rng.randint(1, 29)
    return f"{a}+{b}-{c}", a + b - c, (a, b, "+")


def slipped_answer(first: tuple[int, int, str], expr_value: int) -> int:
    """The answer with the units carry of the first addition dropped (unchanged if no carry)."""
    a, b, op = first
    if op != "+" or (a % 10) + (b % 10) < 10:
        return expr_value
    return expr_value - 10


def has_carry(first: tuple[int, int, str]) -> bool:
    a, b, op = first
    return op == "+" and (a % 10) + (b % 10) >= 10


def generate(split: str, n: int, *, seed: int = 0, levels: tuple[int, ...] = (1, 2)) -> list[Task]:
    """``n`` distinct tasks of ``split`` ("train" | "eval"), deterministic in ``seed``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"arithmetic-{split}-{seed}")
    out: list[Task] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} tasks at levels {levels}")
        level = levels[len(out) % len(levels)]
        expr, value, first = _make_expr(rng, level)
        if expr in seen or _split_of(expr) != split:
            continue
        seen.add(expr)
        out.append(Task(f"{split}-{seed}-{len(out)}", f"{expr}=", str(value), level,
                        {"carry": has_carry(first), "slipped": str(slipped_answer(first, value))}))
    return out


def stream(*, seed: int = 0, levels: tuple[int, ...] = (1, 2), chunk: int = 4096) -> Iterator[Task]:
    """An endless, deterministic stream of training tasks (epochs over growing pools)."""
    epoch = 0
    while True:
        yield from generate("train", chunk, seed=seed * 1000 + epoch, levels=levels)
        epoch += 1
