"""The explorer puts its report on a queue (a feeder thread writes it to the pipe later), then releases the
semaphore: killed in between, it leaves a released semaphore and no report. The trainer must see a dead
explorer (ExplorerDied: restart, or stop with a checkpoint), not crash on the queue's Empty."""

import queue
import threading

import pytest


class _Dead:
    exitcode = -9

    def is_alive(self):
        return False


class _NeverArrives(queue.Queue):
    def get(self, block=True, timeout=None):
        raise queue.Empty  # what a get gives after its timeout when nothing was written


def test_a_released_semaphore_without_a_report_is_a_dead_explorer():
    from offpolicy.pipeline.asynchronous import ExplorerDied, _next_report

    ready = threading.Semaphore(0)
    ready.release()
    with pytest.raises(ExplorerDied, match="exited"):
        _next_report(ready, _NeverArrives(), _Dead(), {})
