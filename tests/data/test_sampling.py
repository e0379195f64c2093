"""Sample strategies on hand-written group metadata (no buffer, no tensors)."""

import json

import pytest

from offpolicy.data.sampling import (
    SAMPLE_STRATEGIES,
    GroupMeta,
    Selection,
    make_strategy,
    register_strategy,
)


def G(key, seq, version=0, use=0, size=2, expert=False):
    return GroupMeta(key, seq, size, version, use, expert)


# ----------------------------------------------------------------------------------------------- fifo


def test_fifo_takes_oldest_whole_groups_and_removes_them():
    groups = [G("c", 4), G("a", 0), G("b", 2), G("x", 1, expert=True)]  # listed out of order
    fifo = make_strategy("fifo")
    assert fifo.select(groups, 4, now_version=9) == Selection(take=("a", "b"), remove=("a", "b"))
    assert fifo.select(groups, 6, now_version=9).take == ("a", "b", "c")  # the expert group is ignored


def test_fifo_returns_nothing_when_short_and_rejects_n_off_the_group_size():
    groups = [G("a", 0), G("b", 2)]
    assert make_strategy("fifo").select(groups, 6, now_version=0) == Selection()
    with pytest.raises(ValueError, match="n=3"):
        make_strategy("fifo").select(groups, 3, now_version=0)  # 4 rows held, 3 is not a sum of 2s


# ------------------------------------------------------------------------------------------ staleness


def test_staleness_keeps_the_bound_and_drops_older_groups():
    # now = 5, max_staleness = 1: versions 4 and 5 are eligible, version 3 is dropped
    groups = [G("v3", 0, version=3), G("v4", 2, version=4), G("v5", 4, version=5), G("v4b", 6, version=4)]
    s = make_strategy("staleness", max_staleness=1)
    assert s.select(groups, 4, now_version=5) == Selection(take=("v4", "v5"), remove=("v4", "v5", "v3"))
    # not enough eligible rows (6 < 8): nothing taken, the stale group is still dropped
    assert s.select(groups, 8, now_version=5) == Selection(remove=("v3",))
    assert make_strategy("staleness", max_staleness=0).select(groups, 2, now_version=5).take == ("v5",)


# ------------------------------------------------------------------------------------------- priority


def test_priority_is_version_minus_decay_times_use_count():
    # decay 2: a = 5 - 0 = 5, b = 6 - 2*1 = 4, c = 4 - 0 = 4, d = 3; b and c tie, b is older
    groups = [G("a", 0, version=5), G("b", 1, version=6, use=1), G("c", 2, version=4), G("d", 3, version=3)]
    s = make_strategy("priority", decay=2.0, use_count_limit=2)
    sel = s.select(groups, 4, now_version=7)
    assert sel.take == ("a", "b")
    assert sel.remove == ("b",)  # b reaches 2 uses with this one; a has 1 left
    assert make_strategy("priority", use_count_limit=None).select(groups, 4, now_version=7).remove == ()


# ------------------------------------------------------------------------------------------------ mix


def _mix_groups():
    return [
        G("old", 0, version=2, use=1),  # now - window - 1: expired
        G("h3", 1, version=3, use=1),  # history: versions now-2 .. now-1, already trained on
        G("h4a", 2, version=4, use=2),
        G("h4b", 3, version=4, use=1),
        G("f4", 4, version=4),  # fresh, but not the newest version
        G("f5a", 5, version=5),
        G("f5b", 6, version=5),
    ]


def test_mix_replays_a_fraction_from_the_window_and_tags_it():
    s = make_strategy("mix", p=0.5, window=2, seed=0)
    sel = s.select(_mix_groups(), 4, now_version=5)
    assert len(sel.take) == 2 and sel.replayed == sel.take[:1]
    assert sel.replayed[0] in {"h3", "h4a", "h4b"}
    assert sel.take[1] == "f5a"  # newest version first, oldest within it
    assert sel.remove == ("old",)  # out of the window; taken groups stay for later replay
    # p = 0.75 of 8 rows = 6 rows = 3 groups replayed, 1 fresh
    sel = make_strategy("mix", p=0.75, window=2).select(_mix_groups(), 8, now_version=5)
    assert set(sel.replayed) == {"h3", "h4a", "h4b"} and sel.take[3:] == ("f5a",)


def test_mix_draws_replay_uniformly_from_the_window():
    s = make_strategy("mix", p=0.5, window=2, seed=1)
    counts = {"h3": 0, "h4a": 0, "h4b": 0}
    for _ in range(300):
        counts[s.select(_mix_groups(), 4, now_version=5).replayed[0]] += 1
    assert all(70 < c < 130 for c in counts.values()), counts


def test_mix_without_history_is_all_fresh_and_waits_when_fresh_is_short():
    fresh_only = [G("f0", 0, version=0), G("f1", 1, version=0)]
    s = make_strategy("mix", p=0.5, window=2)
    assert s.select(fresh_only, 4, now_version=0) == Selection(take=("f0", "f1"))
    # 12 rows live (6 history + 6 fresh) but p = 0.25 of 12 replays 1 group and fresh cannot give the
    # other 10 rows: return nothing rather than over-replay
    s = make_strategy("mix", p=0.25, window=2)
    state = s.state_dict()
    assert s.select(_mix_groups(), 12, now_version=5) == Selection(remove=("old",))
    assert s.state_dict() == state  # an empty answer does not advance the generator


# ----------------------------------------------------------------------------------------- expert_mix


def test_expert_mix_takes_a_fraction_of_experts_and_keeps_them():
    groups = [G("e1", 0, expert=True), G("e2", 1, expert=True), G("p1", 2), G("p2", 3), G("p3", 4)]
    s = make_strategy("expert_mix", p=0.5, seed=3)
    sel = s.select(groups, 4, now_version=0)
    assert sel.take[0] in {"e1", "e2"} and sel.take[1:] == ("p1",)
    assert sel.remove == ("p1",)  # expert groups are reused, never removed here
    # 8 rows at p = 0.5: both expert groups (4 rows) + p1, p2
    sel = s.select(groups, 8, now_version=0)
    assert set(sel.take[:2]) == {"e1", "e2"} and sel.take[2:] == ("p1", "p2")
    # no expert rows: the policy fills the batch
    assert s.select(groups[2:], 4, now_version=0).take == ("p1", "p2")


# ------------------------------------------------------------------------------ state and construction


@pytest.mark.parametrize("name", ["mix", "expert_mix"])
def test_state_dict_round_trip_reproduces_the_choices(name):
    groups = _mix_groups() + [G("e1", 7, expert=True), G("e2", 8, expert=True), G("e3", 9, expert=True)]
    a = make_strategy(name, p=0.5, seed=11)
    for _ in range(3):
        a.select(groups, 4, now_version=5)
    saved = json.loads(json.dumps(a.state_dict()))  # plain data, fits a checkpoint
    expected = [a.select(groups, 4, now_version=5) for _ in range(10)]
    b = make_strategy(name, p=0.5, seed=999)
    b.load_state_dict(saved)
    assert [b.select(groups, 4, now_version=5) for _ in range(10)] == expected
    assert len({s.take for s in expected}) > 1  # the sequence is random, so the test can fail


def test_mix_resume_keeps_the_configured_p_unless_the_run_had_reincarnated():
    """A resume may change buffer.strategy_params.p (--allow-changed-config): the checkpoint used to put its
    own p back. Only a reincarnation (p set to 0 by the run) is state to restore."""
    a = make_strategy("mix", p=0.5, seed=1)
    changed = make_strategy("mix", p=0.25, seed=1)
    changed.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert changed.p == 0.25 and not changed.reincarnated
    a.reincarnate()
    again = make_strategy("mix", p=0.25, seed=1)
    again.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert again.p == 0.0 and again.reincarnated
    old = make_strategy("mix", p=0.25, seed=1)  # a checkpoint written before the flag: {"rng": ..., "p": ...}
    old.load_state_dict({"rng": a.state_dict()["rng"], "p": 0.0})
    assert old.p == 0.0 and old.reincarnated
    kept = make_strategy("mix", p=0.25, seed=1)
    kept.load_state_dict({"rng": a.state_dict()["rng"], "p": 0.5})
    assert kept.p == 0.25


def test_make_strategy_names_bad_parameters_and_names():
    with pytest.raises(ValueError, match=r"'max_stale'.*did you mean 'max_staleness'.*valid: \['max_staleness', 'seed'\]"):
        make_strategy("staleness", max_stale=2)
    with pytest.raises(ValueError, match=r"unknown sample strategy 'fifoo'.*'fifo'"):
        make_strategy("fifoo")
    with pytest.raises(ValueError, match="p must be in"):
        make_strategy("mix", p=1.5)
    with pytest.raises(ValueError, match="use_count_limit"):
        make_strategy("priority", use_count_limit=0)
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fifo", SAMPLE_STRATEGIES["fifo"])
    with pytest.raises(ValueError, match="n must be positive"):
        make_strategy("fifo").select([G("a", 0)], 0, now_version=0)


# ------------------------------------------------------------- groups of unequal sizes (inert samples)


def test_fill_takes_the_first_groups_that_sum_to_n_when_sizes_differ():
    """A sample whose reward faulted is a group of its own (size 1, its group K-1): the greedy walk over
    sizes 3, 3, 4, 1 stops at 7 rows of 8, although 3 + 4 + 1 = 8; that is no reason to stop the run."""
    groups = [G("a", 0, size=3), G("b", 3, size=3), G("c", 6, size=4), G("d", 10, size=1)]
    assert make_strategy("fifo").select(groups, 8, now_version=0).take == ("a", "c", "d")
    assert make_strategy("priority").select(groups, 8, now_version=0).take == ("a", "c", "d")
    # no choice sums to n yet: wait (None), not the "n is not a multiple of K" error
    assert make_strategy("fifo").select([G("a", 0, size=3), G("c", 3, size=5)], 4, now_version=0) == Selection()
    with pytest.raises(ValueError, match="multiple of the group size"):  # one size: a setting error
        make_strategy("fifo").select([G("a", 0, size=4), G("b", 4, size=4)], 6, now_version=0)


def test_mix_with_inert_groups_in_the_history_replays_what_the_explorer_left_room_for():
    """Sync ReMix: the explorer generates the batch less ``replay_groups`` groups; after reward faults the
    history holds groups of K-1 and 1 rows, and the batch must still be exactly the replay plus the fresh part."""
    import random

    K, prompts = 4, 4
    for seed in range(100):
        rng, s = random.Random(seed), make_strategy("mix", p=0.5, window=2, seed=seed)
        history = []
        for t in range(prompts):
            sizes = [K - 1, 1] if rng.random() < 0.3 else [K]
            history += [G(f"h{t}-{j}", 10 * t + j, version=0, use=1, size=k) for j, k in enumerate(sizes)]
        r = s.replay_groups(prompts, K, sum(g.size for g in history))
        fresh = [G(f"f{t}", 100 + t, version=1, size=K) for t in range(prompts - r)]
        sel = s.select(history + fresh, prompts * K, now_version=1)
        sizes = {g.key: g.size for g in history + fresh}
        assert sum(sizes[k] for k in sel.take) == prompts * K
        assert sum(sizes[k] for k in sel.replayed) == r * K and set(sel.take) - set(sel.replayed) == {g.key for g in fresh}
    # the first step: no history yet, and a fault split a fresh group: all fresh
    fresh = [G("f0", 0, size=3), G("f0-bad", 3, size=1), G("f1", 4, size=4)]
    assert make_strategy("mix", p=0.5).select(fresh, 8, now_version=0).take == ("f0", "f0-bad", "f1")
