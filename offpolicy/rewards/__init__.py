"""Reward functions: plain functions ``(response: str, ground_truth: str) -> float``."""

from offpolicy.rewards.exact_match import exact_match, parse_final_integer

__all__ = ["exact_match", "parse_final_integer"]
