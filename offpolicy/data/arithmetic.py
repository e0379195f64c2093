"""Arithmetic word problems in miniature: a GSM8K-shaped task family that a CPU can learn.

Problems are short expressions with an integer answer, at several difficulty levels:

- level 1 (one step):  ``37+48=``  or ``91-26=``  (two-digit operands, answer may be negative)
- level 2 (two steps): ``37+48-19=`` (the first step is a two-digit sum)

Every problem is a pure function of ``(seed, index)``; the train and held-out splits are
drawn from disjoint halves of the problem space (by a hash of the expression), so the same
expression can never appear in both. The model answers with the integer and then EOS.

``slipped_answer`` produces the systematic mistakes used to build the bundled model's warm start:
adding without carrying (``37+48 -> 75``, ``85+37 -> 12``) and subtracting the smaller digit from
the larger in every column (``52-27 -> 35``) — the textbook slips of learners, and the tiny-model
equivalent of a common reasoning error that RL can then fix. About 60% of one-step problems
are affected.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

ALPHABET = "0123456789+-="


@dataclass(frozen=True)
class Task:
    """A prompt plus what the reward needs."""

    task_id: str
    prompt: str
    answer: str
    level: int = 1
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    has_special_tokens: bool = False  # the prompt was rendered by a chat template: tokenize it as is


def _split_of(expr: str) -> str:
    """Deterministic, seed-independent split: ~10% of expressions are held out."""
    h = int(hashlib.sha1(expr.encode()).hexdigest()[:8], 16)
    return "eval" if h % 10 == 0 else "train"


Step = tuple[int, int, str]


def _make_expr(rng: random.Random, level: int) -> tuple[str, int, list[Step]]:
    """An expression, its value and its steps ``(x, y, op)`` on the true intermediate values."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if level == 1:
        op = rng.choice("+-")
        return f"{a}{op}{b}", (a + b if op == "+" else a - b), [(a, b, op)]
    c = rng.randint(1, 29)
    return f"{a}+{b}-{c}", a + b - c, [(a, b, "+"), (a + b, c, "-")]


def _digits(x: int, width: int) -> list[int]:
    return [int(d) for d in str(x).rjust(width, "0")]


def slip_step(x: int, y: int, op: str) -> int:
    """``x op y`` computed digit by digit with the classic slips: carries dropped for ``+``, and
    "smaller from larger" in every column for ``-`` (no borrowing); ``x - y`` with ``x < y`` is
    ``-(y - x)`` slipped the same way. Both bugs are the textbook arithmetic errors of learners."""
    if op == "-" and x < y:
        return -slip_step(y, x, "-")
    width = max(len(str(x)), len(str(y)))
    cols = zip(_digits(x, width), _digits(y, width))
    digits = [(a + b) % 10 if op == "+" else abs(a - b) for a, b in cols]
    return int("".join(map(str, digits)))


def slipped_answer(steps: list[Step]) -> int:
    """The answer with every step slipped, each step applied to the previous slipped result
    (``37+48 -> 75``, ``85+37 -> 12``, ``52-27 -> 35``)."""
    value = slip_step(*steps[0])
    for _, y, op in steps[1:]:
        value = slip_step(value, y, op)
    return value


def draw_distinct(split: str, n: int, candidate: Callable[[int], tuple[str, Callable[[int], Task]]], *,
                  what: str) -> list[Task]:
    """``n`` tasks of ``split`` with distinct expressions: ``candidate(i)`` draws the i-th candidate (its
    expression and a builder of its Task from its index); candidates of the other split or seen before are
    skipped. Shared by the generated task families, so they split and deduplicate the same way."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    out: list[Task] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} tasks {what}")
        expr, build = candidate(len(out))
        if expr in seen or _split_of(expr) != split:
            continue
        seen.add(expr)
        out.append(build(len(out)))
    return out


def generate(split: str, n: int, *, seed: int = 0, levels: tuple[int, ...] = (1, 2)) -> list[Task]:
    """``n`` distinct tasks of ``split`` ("train" | "eval"), deterministic in ``seed``."""
    rng = random.Random(f"arithmetic-{split}-{seed}")

    def candidate(i: int):
        level = levels[i % len(levels)]
        expr, value, steps = _make_expr(rng, level)
        return expr, lambda k: Task(f"{split}-{seed}-{k}", f"{expr}=", str(value), level,
                                    {"carry": slipped_answer(steps) != value, "slipped": str(slipped_answer(steps))})

    return draw_distinct(split, n, candidate, what=f"at levels {levels}")


def stream(*, seed: int = 0, levels: tuple[int, ...] = (1, 2), chunk: int = 4096) -> Iterator[Task]:
    """An endless, deterministic stream of training tasks (epochs over growing pools)."""
    epoch = 0
    while True:
        yield from generate("train", chunk, seed=seed * 1000 + epoch, levels=levels)
        epoch += 1
