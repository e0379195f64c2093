"""The explorer process watches its trainer (``alive`` in the weight channel's waits): a trainer killed with
SIGKILL must end the wait even while nobody has reaped it yet (a zombie: its pid still answers ``kill(pid, 0)``),
or the explorer waits for weights that never come."""

import os
import signal
import subprocess
import sys
import time

TRAINER = r"""
import sys, time
import multiprocessing as mp

def watch(parent, out):
    from offpolicy.pipeline.asynchronous import _parent_alive
    while _parent_alive(parent):
        time.sleep(0.05)
    open(out, "w").write("gone")

if __name__ == "__main__":
    import os
    p = mp.get_context("spawn").Process(target=watch, args=(os.getpid(), sys.argv[1]))
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def test_an_unreaped_dead_trainer_counts_as_dead(tmp_path):
    script, out = tmp_path / "trainer.py", tmp_path / "gone"
    script.write_text(TRAINER)
    trainer = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    child = int(trainer.stdout.readline())
    try:
        time.sleep(1.0)  # the watcher is running
        os.kill(trainer.pid, signal.SIGKILL)  # not reaped (no wait()) until the end: a zombie meanwhile
        deadline = time.monotonic() + 20
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.exists(), "the watcher still takes its dead (unreaped) trainer for alive"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
        trainer.wait()
