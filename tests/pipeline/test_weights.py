"""Shipping weights to explorers: a tied output head travels as its embedding, once, and lands tied."""

import copy
import multiprocessing
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reductions on ForkingPickler

from offpolicy.pipeline.ray_runner import pack_state, unpack_state
from offpolicy.pipeline.weights import WeightChannel
from offpolicy.rollout.model import load_policy, load_trainable_state, tied_aliases, trainable_state

TIED = ("lm_head.weight", "model.embed_tokens.weight")


def _policy():
    out = load_policy("bundled")
    return out[0] if isinstance(out, tuple) else out


def test_channel_copies_a_tied_head_once_and_the_explorer_gets_every_weight():
    trainer = _policy()
    assert tied_aliases(trainable_state(trainer)) == {TIED[0]: TIED[1]}  # the bundled model ties its head
    channel = WeightChannel(multiprocessing.get_context("spawn"))
    slot = channel.allocate(trainer)
    assert slot.keys() == trainable_state(trainer).keys() and slot[TIED[0]] is slot[TIED[1]]
    received = pickle.loads(ForkingPickler.dumps(slot))  # the queue to the explorer: the shared tensor once
    assert received[TIED[0]] is received[TIED[1]]
    explorer, before = _policy(), copy.deepcopy(trainer.state_dict())
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p))
    channel.publish(trainer, 1, after_loaded=None)
    channel.attach(received)
    channel.load(explorer, 1)
    got, want = explorer.state_dict(), trainer.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got[TIED[1]], before[TIED[1]])  # the tied weight moved, under both names
    assert explorer.lm_head.weight is explorer.model.embed_tokens.weight


def test_ray_packing_sends_a_tied_tensor_once():
    state = trainable_state(_policy())
    packed = pack_state(state)
    assert packed[TIED[0]] == TIED[1] and sum(isinstance(v, tuple) for v in packed.values()) == len(state) - 1
    back = unpack_state(packed)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    untied = {"a": torch.zeros(3), "b": torch.zeros(3), "c": torch.zeros(6)[:3],  # equal values, a view at 0,
              "m1": torch.empty(3, device="meta"), "m2": torch.empty(3, device="meta")}  # no storage at all
    assert tied_aliases(untied) == {}


def test_loading_skips_a_tied_copy_only_where_both_sides_tie_it():
    model, source = _policy(), _policy()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    state = {k: v.clone() for k, v in source.state_dict().items()}  # from a file: the tied pair as two tensors
    state[TIED[0]] += 1.0  # untied in the source: both names load, the later one wins, as load_state_dict does
    load_trainable_state(model, state)
    assert torch.equal(model.lm_head.weight, state[TIED[0]]) and model.lm_head.weight is model.model.embed_tokens.weight
    load_trainable_state(model, source.state_dict())  # tied on both sides: loaded once, every weight equal
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    del state["model.norm.weight"]
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        load_trainable_state(model, state)
