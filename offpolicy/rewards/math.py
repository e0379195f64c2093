"""Math answer reward: does the response's final answer equal the ground truth?

`final_answer` finds the answer a model output states, in this order (the first rule that applies wins;
within a rule, the last occurrence): ``#### N`` (GSM8K); ``\\boxed{...}`` (nested braces); ``<answer>...
</answer>``; "The (final) answer is N" / "Answer: N"; a line starting "A: N"; else the last number in the
text. `truth_answer` reads the ground truth: a bare answer (``"18"``, ``"1,000"``, ``"\\frac{1}{2}"``,
``"$5"``) or a GSM8K answer field (what follows the last ``####``).

`answers_equal` compares the two. Plain numbers -- commas, ``$``, units, ``%``, ``a/b``, ``\\frac{a}{b}``,
signs, decimals -- are compared as exact fractions within a relative tolerance of 1e-6 (two integers:
exactly), so ``0.50 == 0.5``, and ``50%`` equals both ``50`` and ``0.5``. Anything else (``\\sqrt{2}``, ``x+5``,
``(1, 2)``, ``\\pi/2``) goes to math-verify (`math_verify.parse` / `math_verify.verify`; floats if it cannot
parse a side). Its signal-based time limit works only in the main thread, so it is used there
(`MATH_VERIFY_TIMEOUT_S` per call) and left off in other threads: call this from a worker thread only under an
outer limit (`offpolicy.rewards.guard.GuardedReward` enforces one).

Speed (measured, docs/rewards.md): 20-140 us per GSM8K chain-of-thought response (plain numbers never
reach math-verify); 1-15 ms when math-verify parses a LaTeX expression (parses are cached).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from fractions import Fraction
from typing import NamedTuple

MATH_VERIFY_TIMEOUT_S = 2  # per parse / verify call (whole seconds: signal.alarm); 3 calls stay under guard's 5 s
_REL_TOL, _ABS_TOL = Fraction(1, 10**6), Fraction(1, 10**12)
MAX_ANSWER_CHARS = 300  # longer "answers" are not answers; they are not handed to the symbolic parser

# A number: 1,000 (groups of three) or 1000, decimals, .5
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A number token in text: a sign that is not a binary operator, $, then \frac{a}{b}, a/b or a number (not an
# ordinal: 13th), then %
_TOKEN = re.compile(
    rf"(?P<sign>(?<![\w)\]}}])[-+])?(?:\$\s?)?(?<![\w.])"
    rf"(?:\\frac\{{(?P<fn>{_NUM})\}}\{{(?P<fd>{_NUM})\}}"
    rf"|(?P<n>{_NUM})(?:\s?/\s?(?P<d>{_NUM}))?(?!\d|st\b|nd\b|rd\b|th\b))"
    r"(?P<pct>\s?(?:%|percent\b))?"
)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACES = re.compile(r"[{}]")
_BARE = re.compile(r"[^\s$]+")
_TAG = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S | re.I)
_PHRASE = re.compile(
    r"\banswer(?:\s*(?:\*\*|\}))?\s*(?:is\b|:)(?:\s*\*\*)?\s*:?\s*(.*?)(?:\.(?=\s|\Z)|\n|\Z)", re.I)
_A_LINE = re.compile(r"(?:^|\n)[ \t*]*A\s*:[ \t]*([^\n]*)")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SUBS = [("\u2212", "-"), ("\\$", "$"), ("$", ""), ("\\%", "%"), ("{,}", ","), ("\\dfrac", "\\frac"),
         ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", " "),
         ("\\:", " "), ("\\ ", " "), ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""),
         ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("**", "")]
_LIGHT_SUBS = [("\u2212", "-"), ("\\%", "%"), ("{,}", ","), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")]  # whole text
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")  # \frac12
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")  # a word that is not a LaTeX command
_MATH_WORDS = frozenset({"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "inf", "infty", "oo"})
_UNITS_TAIL = re.compile(r"\s*[a-zA-Z][a-zA-Z\s/.]*(?:\^\{?\d\}?[a-zA-Z\s/.]*)?")  # " dollars", "cm^2", " km/h"
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*", re.S)


class Number(NamedTuple):
    value: Fraction
    percent: bool  # written with % (or "percent"): equals both its value and its value / 100


# ---------------------------------------------------------------------------------------------------
# Rewards


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the final answer of ``response`` equals ``ground_truth``, else 0.0; never raises.

    ``ground_truth``: a bare answer or a GSM8K answer field ending in ``#### N`` (int / float accepted).
    About 20-100 us per typical GSM8K response; 1-12 ms when a side needs math-verify (docs/rewards.md).
    """
    try:
        gold = truth_answer(ground_truth)
        return float(gold is not None and answers_equal(final_answer(response), gold))
    except Exception:  # a reward must not take the run down over one odd string; 0.0 is the honest score
        return 0.0


def format_reward(response: str, ground_truth: str = "") -> float:
    """1.0 if ``response`` is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else
    (whitespace aside; one tag of each, a non-blank answer), else 0.0. ``ground_truth`` is ignored."""
    if not isinstance(response, str):
        return 0.0
    m = _FORMAT.fullmatch(response)
    ok = m is not None and m.group(1).strip() != "" and all(
        response.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    return float(ok)


# ---------------------------------------------------------------------------------------------------
# Extraction


def final_answer(response: str) -> str | None:
    """The answer ``response`` states (see the module docstring for the order), cleaned of ``$``, units,
    LaTeX spacing and trailing periods; None if there is none."""
    if not isinstance(response, str) or not response.strip():
        return None
    if "####" in response:
        found = _reduce(_HASHES.findall(response)[-1], pick="first")
        if found:
            return found
    boxed = _last_boxed(response)
    if boxed is not None:
        return _reduce(boxed, pick="units")
    tags = _TAG.findall(response)
    if tags and tags[-1].strip():
        content = tags[-1]
        return _stated(content) or _reduce(content, pick="last", cut_eq=True)
    return _stated(response) or _last_number(response)


def truth_answer(ground_truth: str) -> str | None:
    """The answer in a ground-truth field: what follows the last ``####``, the last ``\\boxed{}``, or
    the whole (cleaned) string."""
    if isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool):
        ground_truth = str(ground_truth)
    if not isinstance(ground_truth, str):
        return None
    text = ground_truth.rsplit("####", 1)[-1]
    boxed = _last_boxed(text)
    return _reduce(text if boxed is None else boxed, pick="units")


def _stated(text: str) -> str | None:
    """The answer after the last "answer is" / "Answer:", else after the last line starting "A:". A span
    that is a sentence without a number ("Answer: let's think step by step") is no answer."""
    for pattern, pick in ((_PHRASE, "first"), (_A_LINE, "last")):
        for span in reversed(pattern.findall(text)[-4:]):
            found = _reduce(span, pick=pick, cut_eq=True)
            if found and (not _is_prose(found) or len(found.split()) <= 3):
                return found
    return None


def _last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (nested braces) or ``\\boxed N``; None if none is complete."""
    end = len(text)
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        if not text.startswith("{", i):  # \boxed 5
            word = _BARE.match(text, i, end)
            if word:
                return word.group(0)
            continue
        depth = 0
        for brace in _BRACES.finditer(text, i, end):
            depth += 1 if brace.group(0) == "{" else -1
            if depth == 0:
                return text[i + 1:brace.start()]
        end = m.start()  # an earlier box still open here never closes: scan only up to this one (linear)
    return None


def _last_number(text: str) -> str | None:
    tokens = list(_TOKEN.finditer(_clean_light(text)))
    return _clean(tokens[-1].group(0)) if tokens else None


def _reduce(span: str, *, pick: str, cut_eq: bool = False) -> str | None:
    """Clean an answer span. ``cut_eq``: keep what follows the last ``=`` (``48 + 24 = 72``). Prose
    ("18 dollars", "$1,200 in total") gives its number: ``pick="units"`` only strips a unit tail,
    ``"first"`` / ``"last"`` take the first / last number of a sentence."""
    s = _clean(span)
    if cut_eq and "=" in s and s.rsplit("=", 1)[1].strip():
        s = s.rsplit("=", 1)[1].strip()
    if not s:
        return None
    if not _is_prose(s):
        return s
    tokens = list(_TOKEN.finditer(s))
    if pick == "units":
        unit = tokens and tokens[0].start() == 0 and _UNITS_TAIL.fullmatch(s, tokens[0].end())
        return _clean(tokens[0].group(0)) if unit else s
    if not tokens:
        return s
    return _clean(tokens[0 if pick == "first" else -1].group(0))


def _clean_light(text: str) -> str:
    for old, new in _LIGHT_SUBS:
        text = text.replace(old, new)
    return text


def _clean(span: str) -> str:
    s = span.strip()[:4 * MAX_ANSWER_CHARS]
    for _ in range(2):  # \text{\textbf{5}}
        s = _TEXT_CMD.sub(r"\1", s)
    for old, new in _SUBS:
        s = s.replace(old, new)
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    return s.strip().rstrip(".,;:!").strip()


def _is_prose(s: str) -> bool:
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(s))


# ---------------------------------------------------------------------------------------------------
# Comparison


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """Whether two cleaned answers agree: numerically when both are plain numbers, else by math-verify
    (string equality first, for what neither parses)."""
    if not pred or not gold:
        return False
    if _canon(pred) == _canon(gold):
        return True
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return _numbers_equal(p, g)
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    return _symbolic_equal(pred, gold)


def parse_number(s: str) -> Number | None:
    """``s`` as an exact number if it is exactly one number token (``-$1,200``, ``0.50``, ``3/4``,
    ``\\frac{1}{2}``, ``50%``), else None."""
    m = _TOKEN.fullmatch(s.strip())
    if m is None:
        return None
    num, den = (m["fn"], m["fd"]) if m["fn"] is not None else (m["n"], m["d"] or "1")
    den = Fraction(den.replace(",", ""))
    if den == 0:
        return None
    value = Fraction(num.replace(",", "")) / den
    return Number(-value if m["sign"] == "-" else value, m["pct"] is not None)


def _numbers_equal(p: Number, g: Number) -> bool:
    candidates = [(p.value, g.value)]
    if p.percent:
        candidates.append((p.value / 100, g.value))
    if g.percent:
        candidates.append((p.value, g.value / 100))
    # Exact fractions, so a 5000-digit "number" cannot overflow a float. Two integers are equal or not: the
    # tolerance is for decimals that approximate a fraction (0.3333333 vs 1/3); on integers it would make an
    # off-by-one answer above a million (1450001 vs 1,450,000) correct.
    return any(a == b if a.denominator == b.denominator == 1
               else abs(a - b) <= max(_REL_TOL * max(abs(a), abs(b)), _ABS_TOL) for a, b in candidates)


def _canon(s: str) -> str:
    return "".join(s.split()).lower()


def _symbolic_equal(pred: str, gold: str) -> bool:
    from math_verify import verify

    g, p = _parse_expr(gold), _parse_expr(pred)
    if not g or not p:  # math-verify cannot parse a side: compare as numbers if both read as one
        a, b = _as_float(pred), _as_float(gold)
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return verify(list(g), list(p), timeout_seconds=_timeout())  # a tuple would be compared as one value


@functools.lru_cache(maxsize=4096)  # the same ground truth is scored against a whole group of responses
def _parse_expr(s: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(f"${s}$", config, parsing_timeout=_timeout()))


def _as_float(s: str) -> float | None:
    try:
        return float(s.replace(",", "").rstrip("%"))
    except ValueError:
        return None


def _timeout() -> int | None:
    """math-verify's time limit is signal.alarm, which works only in the main thread."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
