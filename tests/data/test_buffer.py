"""Buffers (memory, SQLite, SQLAlchemy when installed): round trip, groups, capacity, ledger, strategies."""

import dataclasses
import pickle

import pytest
import torch

from offpolicy.data.buffer import BufferFull, MemoryBuffer, open_buffer
from offpolicy.data.experience import Experience
from offpolicy.data.sampling import Selection, make_strategy
from offpolicy.data.sql_buffer import SQLBuffer, SQLiteBuffer


def group(gid, k=2, version=0, expert=False, seed=0, batch_index=-1):
    """K experiences of one task with every field set (distinct dtypes, optional tensors, nested info);
    eids ``{gid}-{i}`` so that two buffers fed the same calls can be compared."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        T = 3 + i
        out.append(Experience(
            prompt_ids=torch.randint(0, 50, (4,), generator=g),
            response_ids=torch.randint(0, 50, (T,), generator=g),
            response_mask=torch.tensor([1.0] * (T - 1) + [0.0]),
            behav_logp=-torch.rand(T, generator=g),
            engine_logp=-torch.rand(T, generator=g) if i == 1 else None,
            old_logp=-torch.rand(T, generator=g) if i == 0 else None,
            ref_logp=-torch.rand(T, generator=g, dtype=torch.float64),
            reward=0.25 * i - 1.0 / 3.0,
            group_id=gid,
            task_id=f"task-{gid}",
            version=version,
            batch_index=batch_index,
            created_at=1700000000.123456 + i,
            expert=expert,
            info={"correct": i == 1, "answer": "42", "nested": {"turns": [1, 2]}},
            eid=f"{gid}-{i}",
        ))
    return out


@pytest.fixture(params=["memory", "sqlite", "sqlalchemy"])
def make_buffer(request, tmp_path):
    """A factory ``make_buffer(capacity=None, eviction="oldest")`` for each implementation."""
    made = []

    def make(capacity=None, eviction="oldest"):
        if request.param == "memory":
            buf = MemoryBuffer(capacity, eviction)
        elif request.param == "sqlite":
            buf = SQLiteBuffer(tmp_path / "buffer.sqlite", capacity, eviction)
        else:
            pytest.importorskip("sqlalchemy")
            buf = SQLBuffer(f"sqlite:///{tmp_path / 'alchemy.sqlite'}", capacity, eviction)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


def fields_equal(a: Experience, b: Experience) -> bool:
    for f in dataclasses.fields(Experience):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y or type(x) is not type(y):
            return False
    return True


def test_round_trip_keeps_every_field(make_buffer):
    buf = make_buffer()
    written = group("g0", k=3, version=4, seed=1, batch_index=7)
    buf.put(written)
    got = buf.sample(3, make_strategy("fifo"), now_version=4)
    assert [e.eid for e in got] == [e.eid for e in written]  # insertion order within the group
    for w, g in zip(written, got):
        assert g.use_count == 1  # counts this use
        assert fields_equal(dataclasses.replace(w, use_count=1), g)
    assert written[0].use_count == 0  # the caller's objects are not modified


def test_put_is_atomic_and_refuses_split_or_repeated_groups(make_buffer):
    buf = make_buffer()
    buf.put([])  # nothing to do
    buf.put(group("a"))
    with pytest.raises(ValueError, match="already in the buffer"):
        buf.put(group("b") + group("a", seed=5))  # b is valid, a is not: neither goes in
    assert len(buf) == 2
    with pytest.raises(ValueError, match="eids already put"):
        buf.put([dataclasses.replace(e, group_id="c") for e in group("a")])  # same eids as a
    mixed = group("d", version=1)
    mixed[1].version = 2
    with pytest.raises(ValueError, match="mixes versions"):
        buf.put(mixed)
    mixed = group("d", batch_index=1)
    mixed[1].batch_index = 2
    with pytest.raises(ValueError, match="batch indices"):
        buf.put(mixed)
    buf.sample(2, make_strategy("fifo"), now_version=0)
    with pytest.raises(ValueError, match="eids already put"):
        buf.put(group("a"))  # consumed eids stay known
    assert buf.stats() == (0, 2, 2, 2, 0, 0)


class Recorder:
    """A strategy that takes nothing and records what it was shown."""

    def __init__(self):
        self.seen = {}

    def select(self, groups, n, now_version):
        self.seen = {g.key: (g.version, g.batch_index, g.size) for g in groups}
        return Selection()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_strategies_see_each_groups_batch_index(make_buffer):
    buf = make_buffer()
    buf.put(group("a", version=1, batch_index=3) + group("b", k=3, version=1, batch_index=5, seed=1))
    buf.put(group("c", seed=2))  # put by hand: batch unknown
    rec = Recorder()
    assert buf.sample(2, rec, now_version=1) == []
    assert rec.seen == {"a": (1, 3, 2), "b": (1, 5, 3), "c": (0, -1, 2)}


def test_sample_returns_whole_groups_and_nothing_when_short(make_buffer):
    buf = make_buffer()
    for i in range(3):
        buf.put(group(f"g{i}", k=4, version=i, seed=i))
    got = buf.sample(8, make_strategy("fifo"), now_version=3)
    assert [e.group_id for e in got] == ["g0"] * 4 + ["g1"] * 4
    assert buf.sample(8, make_strategy("fifo"), now_version=3) == []  # 4 rows left
    assert len(buf) == 4
    with pytest.raises(ValueError, match="n=3"):
        buf.sample(3, make_strategy("fifo"), now_version=3)  # 4 rows held, 3 is not a multiple of K = 4


def test_capacity_evicts_oldest_policy_groups_but_never_experts(make_buffer):
    buf = make_buffer(capacity=6)
    buf.put(group("E", expert=True))  # oldest, but never evicted
    buf.put(group("A", version=0))
    buf.put(group("B", version=1))
    buf.put(group("C", version=2))  # over by 2: A goes
    assert buf.versions() == {1: 2, 2: 2}
    buf.put(group("D", version=3) + group("F", version=3))  # over by 4: B and C go
    assert buf.versions() == {3: 4}
    with pytest.raises(BufferFull, match="never evicted"):
        buf.put([e for g in "GHI" for e in group(g)])  # 6 rows, only 4 evictable
    assert len(buf) == 6
    ledger = buf.ledger()
    assert sorted(e.fate for e in ledger.values()) == ["available"] * 6 + ["evicted"] * 6
    assert buf.stats().evicted == 6 and buf.stats().put == 12


def test_reject_eviction_refuses_the_put(make_buffer):
    buf = make_buffer(capacity=4, eviction="reject")
    buf.put(group("a") + group("b"))
    with pytest.raises(BufferFull, match="reject"):
        buf.put(group("c"))
    assert len(buf) == 4 and buf.stats().evicted == 0


def test_ledger_every_row_used_once_or_still_available(make_buffer):
    buf = make_buffer()
    written = {}
    fifo = make_strategy("fifo")
    for i in range(10):
        g = group(f"g{i}", version=i // 2, seed=i)
        written.update({e.eid: e for e in g})
        buf.put(g)
        if i % 3 == 2:
            buf.sample(4, fifo, now_version=i // 2)
    seen = [e.eid for _ in range(2) for e in buf.sample(2, fifo, now_version=5)]
    ledger = buf.ledger()
    assert set(ledger) == set(written)
    used = {eid for eid, entry in ledger.items() if entry.fate == "used"}
    assert all(ledger[eid].use_count == 1 for eid in used)
    assert all(entry.use_count == 0 for entry in ledger.values() if entry.fate == "available")
    assert set(seen) <= used and len(used) == 16
    stats = buf.stats()
    assert stats.put == stats.available + stats.used + stats.dropped + stats.evicted == 20
    assert (stats.available, stats.sampled) == (4, 16)


def test_staleness_drops_are_counted(make_buffer):
    buf = make_buffer()
    for v in range(4):
        buf.put(group(f"v{v}", version=v))
    got = buf.sample(2, make_strategy("staleness", max_staleness=1), now_version=3)
    assert [e.version for e in got] == [2, 2]
    assert buf.versions() == {3: 2}
    assert buf.stats().dropped == 4
    assert {e.fate for eid, e in buf.ledger().items() if e.version < 2} == {"dropped"}


def test_priority_reuse_order_and_use_count_limit(make_buffer):
    buf = make_buffer()
    for v in range(3):
        buf.put(group(f"g{v}", version=v))
    s = make_strategy("priority", decay=1.0, use_count_limit=2)
    # priorities (version - use_count), ties to the older group:
    # g2:2 | g2:1 = g1:1 -> g1 | g2:1 -> g2 (2 uses, removed) | g1:0 = g0:0 -> g0 | g1:0 | g0
    order = [buf.sample(2, s, now_version=3)[0].group_id for _ in range(6)]
    assert order == ["g2", "g1", "g2", "g0", "g1", "g0"]
    assert buf.sample(2, s, now_version=3) == [] and len(buf) == 0
    assert {e.use_count for e in buf.ledger().values()} == {2}
    assert buf.stats().sampled == 12


def test_mix_tags_replays_and_expires_the_window(make_buffer):
    buf = make_buffer()
    s = make_strategy("mix", p=0.5, window=1, seed=0)
    buf.put(group("v0"))
    first = buf.sample(2, s, now_version=0)  # no history yet: all fresh
    assert not any(e.replayed for e in first)
    buf.put(group("v1", version=1))
    second = buf.sample(4, s, now_version=1)  # v0 (used, in window) replayed + v1 fresh
    assert [(e.group_id, e.replayed, e.use_count) for e in second] == [
        ("v0", True, 2), ("v0", True, 2), ("v1", False, 1), ("v1", False, 1)]
    buf.put(group("v2", version=2))
    third = buf.sample(4, s, now_version=2)  # v0 left the window: deleted as used
    assert [e.group_id for e in third] == ["v1", "v1", "v2", "v2"]
    assert {e.fate for e in buf.ledger().values() if e.version == 0} == {"used"}
    assert buf.versions() == {1: 2, 2: 2} and buf.versions(unused=True) == {}


def test_expert_rows_are_reused_and_flagged(make_buffer):
    buf = make_buffer()
    buf.put(group("sft", expert=True, version=-1))
    for i in range(3):
        buf.put(group(f"p{i}", version=i))
    s = make_strategy("expert_mix", p=0.5)
    batches = [buf.sample(4, s, now_version=3) for _ in range(3)]
    assert [[e.expert for e in b] for b in batches] == [[True, True, False, False]] * 3
    assert [b[2].group_id for b in batches] == ["p0", "p1", "p2"]
    assert batches[2][0].use_count == 3 and len(buf) == 2
    assert buf.versions() == {}  # expert rows are not policy versions


def test_memory_and_sqlite_make_the_same_choices(tmp_path):
    bufs = [MemoryBuffer(capacity=16), SQLiteBuffer(tmp_path / "b.sqlite", capacity=16)]
    strategies = [make_strategy("mix", p=0.5, window=2, seed=7) for _ in bufs]
    picks = [[], []]
    for step in range(8):
        for buf, s, out in zip(bufs, strategies, picks):
            buf.put(group(f"s{step}a", version=step, seed=step) + group(f"s{step}b", version=step, seed=50 + step))
            out.append([e.eid for e in buf.sample(4, s, now_version=step)])
    assert picks[0] == picks[1]
    assert bufs[0].stats() == bufs[1].stats() and bufs[0].ledger() == bufs[1].ledger()
    bufs[1].close()


def test_open_buffer_and_pickled_sqlite_handle(tmp_path):
    assert isinstance(open_buffer(None), MemoryBuffer)
    buf = open_buffer(str(tmp_path / "b.sqlite"), capacity=8)
    assert isinstance(buf, SQLiteBuffer) and buf.capacity == 8
    buf.put(group("a"))
    clone = pickle.loads(pickle.dumps(buf))  # what a spawned child process receives: the path, no data
    assert len(clone) == 2 and clone.capacity == 8
    clone.close()
    buf.close()


def _edit(info: dict) -> None:
    """Change ``info`` in place at every depth it has."""
    for v in info.values():
        if isinstance(v, dict):
            _edit(v)
        elif isinstance(v, list):
            v.append(9)
    info["edited"] = True


@pytest.mark.parametrize("info", [{"correct": True, "answer": "42"}, {"nested": {"turns": [1, 2]}}])
def test_memory_buffer_copies_info_but_shares_tensors(info):
    """What is put, what is stored and what is sampled are three rows: a caller editing its ``info`` (flat or
    nested) changes none of the others; tensors are shared (never modified in place)."""
    import copy

    put = [dataclasses.replace(e, info=copy.deepcopy(info)) for e in group("g")]
    buf = MemoryBuffer()
    buf.put(put)
    _edit(put[0].info)
    reuse = make_strategy("priority", use_count_limit=2)
    first = buf.sample(2, reuse, now_version=0)
    assert first[0].info == info and first[0].response_ids is put[0].response_ids
    _edit(first[0].info)
    again = buf.sample(2, reuse, now_version=0)
    assert again[0].info == info and again[0].use_count == 2
