"""The weight channel's waits end when the other process dies (``alive``), not after a fixed time: an explorer
waits for the next version while the trainer trains, evaluates and checkpoints (more than 10 minutes is
ordinary for a large model), and the trainer waits while the explorer generates a long batch. A time limit
made a slow but healthy peer look dead (the explorer died and was restarted; the trainer's publish raised
TimeoutError and stopped the run without a checkpoint)."""

import itertools
import threading
import time

import torch
import torch.multiprocessing as mp

from offpolicy.pipeline import weights
from offpolicy.pipeline.weights import WeightChannel


def test_a_peer_slower_than_ten_minutes_is_waited_for(monkeypatch):
    trainer = torch.nn.Linear(2, 2)
    explorer = torch.nn.Linear(2, 2)
    channel = WeightChannel(mp.get_context("spawn"))
    channel.allocate(trainer)
    channel.publish(trainer, 0, after_loaded=None)
    channel.load(explorer, 0)
    clock = itertools.count(step=120.0)  # every look at the clock: two more minutes
    monkeypatch.setattr(weights.time, "perf_counter", lambda: next(clock))

    def train_then_publish():  # the trainer: a long step, then version 1
        time.sleep(0.3)
        with torch.no_grad():
            trainer.weight.add_(1.0)
        channel.publish(trainer, 1, after_loaded=0)

    t = threading.Thread(target=train_then_publish)
    t.start()
    channel.load(explorer, 1, alive=lambda: True)  # the explorer waits through "20 minutes" of training
    t.join()
    assert torch.equal(explorer.weight, trainer.weight)

    def explore_then_load():  # the explorer: a long batch before it loads version 1 ... (already loaded: 2)
        time.sleep(0.3)
        channel.mark_loaded(2)

    with torch.no_grad():
        trainer.weight.add_(1.0)
    t = threading.Thread(target=explore_then_load)
    t.start()
    channel.publish(trainer, 3, after_loaded=2, alive=lambda: True)  # the trainer waits as long
    t.join()
    assert channel.published == 3
