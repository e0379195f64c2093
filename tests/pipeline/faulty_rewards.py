"""Reward functions that fail on purpose (imported by the reward worker process by name)."""

import math
import os
import time


def flaky(response: str, truth: str) -> float:
    """Raises on responses ending in 3, NaN on 5, None on 7; hangs once per test (on the 40th call)."""
    if response.endswith("3"):
        raise ValueError(f"cannot score {response!r}")
    if response.endswith("5"):
        return math.nan
    if response.endswith("7"):
        return None
    marker = os.environ.get("OFFPOLICY_TEST_HANG_MARKER")
    if marker:  # count the calls across worker restarts; hang on the 40th (past the first evaluation)
        with open(marker, "a") as f:
            f.write(".")
        if os.path.getsize(marker) == 40:
            time.sleep(60)  # never returns within the limit
    return float(response == truth)


def always_raises(response: str, truth: str) -> float:
    raise RuntimeError("reward backend is down")
