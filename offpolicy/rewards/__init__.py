"""Reward functions: plain functions ``(response: str, ground_truth: str) -> float``.

``code_exec_reward`` runs generated code in a sandbox (see docs/code_exec.md); ``guard`` isolates
reward faults per sample.
"""

from offpolicy.rewards.code_exec import ExecResult, SandboxError, code_exec_reward, run_code
from offpolicy.rewards.exact_match import exact_match, parse_final_integer

REWARDS = {"exact_match": exact_match, "code_exec": code_exec_reward}

__all__ = ["REWARDS", "exact_match", "parse_final_integer", "code_exec_reward", "run_code", "ExecResult", "SandboxError"]
