"""Multiplication problems for a tool-using agent: operands too large for the tiny model to multiply
in its head, so the reliable way to the answer is to call a calculator.

Problems are ``a*b=`` with a three-digit ``a`` and a two- or three-digit ``b`` (``482*77=``); the answer
is the exact product. The "compact" tool format (one character per token) that the bundled calculator
agent speaks:

- ``482*77=[482*77]{37114}37114<eos>``: the model writes a call ``[...]`` (its turn ends at ``]``), the
  environment appends the result in braces (``{?}`` when the expression cannot be computed), and the
  model's next turn, without brackets, is the final answer.
- ``482*77=37094<eos>``: the model answers directly (for these operands, almost always wrong).

As in :mod:`offpolicy.data.arithmetic`, every problem is a pure function of ``(seed, index)`` and the
train and held-out splits are disjoint halves of the problem space (by a hash of the expression).
"""

from __future__ import annotations

import random
import re
from typing import Iterator

from offpolicy.data.arithmetic import Task, draw_distinct

ALPHABET = "0123456789+-*=[]{}?"
SHAPES = ((3, 2), (3, 3))  # (digits of a, digits of b)

_CALL = re.compile(r"^(-?\d+)([+\-*])(-?\d+)$")


def calculate(expr: str) -> str:
    """The calculator: ``"482*77" -> "37114"``; ``"?"`` for anything but ``int op int`` with op in ``+-*``."""
    m = _CALL.match(expr)
    if m is None:
        return "?"
    a, op, b = int(m[1]), m[2], int(m[3])
    return str(a * b if op == "*" else a + b if op == "+" else a - b)


def tool_demonstration(task: Task) -> tuple[str, str, str]:
    """The tool-using answer to ``task`` in three parts: the call the model writes, the observation the
    environment appends, and the final answer (before EOS): ``("[482*77]", "{37114}", "37114")``."""
    expr = task.prompt.removesuffix("=")
    return f"[{expr}]", "{" + calculate(expr) + "}", task.answer


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def generate(split: str, n: int, *, seed: int = 0, shapes: tuple[tuple[int, int], ...] = SHAPES) -> list[Task]:
    """``n`` distinct tasks of ``split`` ("train" | "eval"), deterministic in ``seed``; the shapes
    ``(digits of a, digits of b)`` take turns. ``level`` is the number of digits of ``b``."""
    rng = random.Random(f"calculator-{split}-{seed}")

    def candidate(i: int):
        da, db = shapes[i % len(shapes)]
        a, b = _operand(rng, da), _operand(rng, db)
        return f"{a}*{b}", lambda k: Task(f"calc-{split}-{seed}-{k}", f"{a}*{b}=", str(a * b), db)

    return draw_distinct(split, n, candidate, what=f"of shapes {shapes}")


def stream(*, seed: int = 0, shapes: tuple[tuple[int, int], ...] = SHAPES, chunk: int = 4096) -> Iterator[Task]:
    """An endless, deterministic stream of training tasks (epochs over growing pools)."""
    epoch = 0
    while True:
        yield from generate("train", chunk, seed=seed * 1000 + epoch, shapes=shapes)
        epoch += 1
