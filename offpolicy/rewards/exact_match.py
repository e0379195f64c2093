"""Exact-match reward on the parsed final integer answer."""

from __future__ import annotations

import re

_INT = re.compile(r"[-+]?\d+")


def parse_final_integer(response: str) -> int | None:
    """The last integer in ``response`` (``"-12"``, ``" 85"``, ``"x=7."`` -> 7), or None if there is none.

    Thousands separators are removed first (``"1,000"`` -> 1000).
    """
    matches = _INT.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response or ""))
    return int(matches[-1]) if matches else None


def exact_match(response: str, ground_truth: str) -> float:
    """1.0 if the final integer of ``response`` equals ``ground_truth`` (an integer string), else 0.0."""
    got, want = parse_final_integer(response), parse_final_integer(ground_truth)
    return float(got is not None and got == want)
