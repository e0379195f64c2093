"""Reward faults are isolated per sample: exceptions, hangs (even in C), NaN/inf/None."""

import math
import time

import pytest

from offpolicy.rewards.guard import GuardedReward, check_value


def good(response, truth):
    return float(response == truth)


def faulty(response, truth):
    if response == "raise":
        raise ZeroDivisionError("boom")
    if response == "hang":
        time.sleep(60)  # stands for code that never returns
    if response == "nan":
        return math.nan
    if response == "inf":
        return -math.inf
    if response == "none":
        return None
    if response == "die":
        import os

        os._exit(3)
    if response == "exit":
        import sys

        sys.exit(3)  # SystemExit is no Exception: a reward calling it must not end the run
    return float(response == truth)


def test_check_value():
    assert check_value(1) == (1.0, None, "", None)
    assert check_value(True).fault is None and check_value(True).value == 1.0
    assert check_value(math.nan).fault == "non_finite"
    assert check_value(None).fault == "not_a_number"
    assert check_value("x").fault == "not_a_number"
    assert check_value("0.5").value == 0.5


@pytest.mark.timing
def test_each_fault_is_marked_and_the_rest_scored():
    guard = GuardedReward(faulty, timeout_s=2.0)  # far above a fast sample's ms, even on a loaded CI
    try:
        pairs = [("7", "7"), ("raise", "7"), ("8", "7"), ("hang", "7"), ("7", "7"), ("nan", "7"), ("inf", "7"),
                 ("none", "7"), ("die", "7"), ("7", "7")]
        t0 = time.monotonic()
        out = guard(pairs)
        assert time.monotonic() - t0 < 15  # the hang cost about its 2 s limit, not 60 s
        assert [o.value for o in out] == [1.0, None, 0.0, None, 1.0, None, None, None, None, 1.0]
        assert [o.fault for o in out] == [None, "exception", None, "timeout", None, "non_finite", "non_finite",
                                          "not_a_number", "worker_died", None]
        assert "ZeroDivisionError: boom" in out[1].message
        assert guard(pairs[:1])[0].value == 1.0  # the worker was restarted after the kill
    finally:
        guard.close()


def test_in_process_mode_catches_exceptions():
    guard = GuardedReward(faulty, timeout_s=None)
    out = guard([("raise", "1"), ("1", "1")])
    assert out[0].fault == "exception" and out[1].value == 1.0


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_sys_exit_in_a_reward_is_an_exception_of_its_sample(timeout_s):
    guard = GuardedReward(faulty, timeout_s=timeout_s)
    try:
        out = guard([("1", "1"), ("exit", "1"), ("1", "1")])
    finally:
        guard.close()
    assert [o.fault for o in out] == [None, "exception", None] and "SystemExit: 3" in out[1].message


@pytest.mark.timing
def test_results_come_back_in_chunks_and_a_hang_loses_none_of_them():
    """Fast samples are sent back a list at a time (not one message each); results the worker held when a later
    sample hung are scored again, so each sample keeps its own value and the hang is pinned on the right one."""
    guard = GuardedReward(faulty, timeout_s=1.0)
    try:
        guard([("7", "7")])  # the worker is up
        received = []
        recv = guard._conn.recv
        guard._conn.recv = lambda: received.append(1) or recv()
        out = guard([(str(i % 3), "1") for i in range(300)])
        assert [o.value for o in out] == [float(i % 3 == 1) for i in range(300)]
        assert len(received) < 30  # 300 samples in a few messages
        pairs = [("1", "1"), ("2", "1"), ("hang", "1"), ("1", "1"), ("hang", "1"), ("0", "1")]
        out = guard(pairs)
        assert [o.fault for o in out] == [None, None, "timeout", None, "timeout", None]
        assert [o.value for o in out] == [1.0, 0.0, None, 1.0, None, 0.0]
        assert guard.consecutive_timeouts == 0  # the last sample returned
    finally:
        guard.close()


@pytest.mark.timing
def test_a_hang_is_pinned_on_its_own_sample_when_the_parent_looks_late(monkeypatch):
    """The worker may finish samples before the parent starts watching its progress (a busy machine): the
    count it starts from is taken before the job is sent, so the time-out still falls on the hanging sample."""
    guard = GuardedReward(faulty, timeout_s=1.0)
    collect = guard._collect

    def late(*args, **kwargs):
        time.sleep(0.5)  # the worker scores the fast samples and is in the hang by now
        return collect(*args, **kwargs)

    monkeypatch.setattr(guard, "_collect", late)
    try:
        guard([("7", "7")])  # the worker is up
        out = guard([("1", "1"), ("2", "1"), ("hang", "1"), ("0", "1")])
        assert [o.fault for o in out] == [None, None, "timeout", None]
        assert [o.value for o in out] == [1.0, 0.0, None, 0.0]
    finally:
        guard.close()
