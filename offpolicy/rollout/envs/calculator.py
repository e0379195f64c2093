"""The ``calculator`` environment: one integer-arithmetic tool, exact-answer reward.

The tool evaluates ``+ - * // % **``, exact ``/``, unary minus and parentheses over integers by walking
the expression's ``ast`` (no ``eval``), with bounds: at most ``MAX_EXPR_CHARS`` characters, and every
intermediate value below ``10**MAX_DIGITS`` in magnitude (a power is refused before it is computed).
It runs in-process: its time is bounded by those limits.

Formats (``format=``): ``compact`` (default; the bundled calculator agent: ``482*77=[482*77]{37114}37114``)
rewards a final answer that is exactly the expected number; ``hermes`` (chat models) rewards a final turn
whose last integer is the expected one (:func:`offpolicy.rewards.exact_match`).
"""

from __future__ import annotations

import ast
import math
import operator

from offpolicy.rewards.exact_match import exact_match
from offpolicy.rollout.env import register_env
from offpolicy.rollout.tool_env import ToolEnv
from offpolicy.rollout.tool_parsers import make_format
from offpolicy.rollout.tools import Tool, ToolError

MAX_EXPR_CHARS = 200
MAX_DIGITS = 100
_LIMIT = 10**MAX_DIGITS


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression with + - * // % ** and parentheses.

    Args:
        expression: The expression to evaluate, e.g. "482*77" or "(3+4)*-2".
    """
    if len(expression) > MAX_EXPR_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # deep nesting ends in the last two
        raise ToolError("cannot parse the expression") from None
    return str(_eval(tree.body))


def _div(a: int, b: int) -> int:
    if a % b:
        raise ToolError(f"{a}/{b} is not an integer; use // for floor division")
    return a // b


def _pow(a: int, b: int) -> int:
    if b < 0:
        raise ToolError("negative exponents are not supported")
    if abs(a) > 1 and b * math.log10(abs(a)) >= MAX_DIGITS:
        raise ToolError(f"result too large (more than {MAX_DIGITS} digits)")
    return a**b


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Div: _div, ast.Pow: _pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        if b == 0 and isinstance(node.op, (ast.FloorDiv, ast.Mod, ast.Div)):
            raise ToolError("division by zero")
        value = _BINARY[type(node.op)](a, b)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    else:
        raise ToolError("only integers, + - * / // % ** and parentheses are allowed")
    if abs(value) >= _LIMIT:
        raise ToolError(f"result too large (more than {MAX_DIGITS} digits)")
    return value


CALCULATOR = Tool.from_function(calculator, in_process=True, instant=True)  # integer arithmetic, bounded digits


def exact_answer(answer: str, truth: str) -> float:
    """1.0 if the stated answer is exactly the expected one (whitespace aside), else 0.0."""
    return float(answer.strip() == str(truth).strip())


_REWARDS = {"compact": exact_answer, "hermes": exact_match}


def calculator_env(*, format: str = "compact", max_calls_per_turn: int = 4) -> ToolEnv:
    """A fresh calculator environment; ``format``: ``"compact"`` or ``"hermes"``."""
    if format not in _REWARDS:
        raise ValueError(f"calculator env: format must be one of {sorted(_REWARDS)}, got {format!r}")
    return ToolEnv([CALCULATOR], make_format(format, [CALCULATOR]), _REWARDS[format],
                   max_calls_per_turn=max_calls_per_turn, tool_timeout_s=None)


register_env("calculator", calculator_env)
