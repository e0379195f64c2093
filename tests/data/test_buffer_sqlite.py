"""SQLiteBuffer across processes: reopening after a restart, and one writer process beside one reader."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from offpolicy.data.experience import Experience
from offpolicy.data.sampling import make_strategy
from offpolicy.data.sql_buffer import SQLBuffer, SQLiteBuffer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

READER = r"""
import json, sys
from offpolicy.data.sampling import make_strategy
from offpolicy.data.sql_buffer import SQLiteBuffer

buf = SQLiteBuffer(sys.argv[1])
state = {"len": len(buf), "stats": list(buf.stats()), "ledger": {k: list(v) for k, v in buf.ledger().items()}}
got = buf.sample(int(sys.argv[2]), make_strategy("fifo"), now_version=9)
state["sampled"] = [[e.eid, e.use_count, e.response_ids.tolist(), e.behav_logp.tolist()] for e in got]
print(json.dumps(state))
"""

WRITER = r"""
import sys, torch
from offpolicy.data.experience import Experience
from offpolicy.data.sql_buffer import SQLiteBuffer

buf = SQLiteBuffer(sys.argv[1])
for i in range(int(sys.argv[2])):
    buf.put([Experience(torch.tensor([i]), torch.tensor([i, j]), torch.ones(2), torch.zeros(2), float(j),
                        f"g{i}", "t", version=i // 10, eid=f"w{i}-{j}") for j in range(2)])
buf.close()
"""


def group(i, k=2):
    g = torch.Generator().manual_seed(i)
    return [Experience(torch.tensor([1, 2, i]), torch.randint(0, 9, (3,), generator=g), torch.ones(3),
                       -torch.rand(3, generator=g), float(j), f"g{i}", f"t{i}", version=i, eid=f"g{i}-{j}")
            for j in range(k)]


def test_reopened_in_a_new_process_sees_exactly_the_unconsumed_rows(tmp_path):
    path = tmp_path / "run" / "buffer.sqlite"
    path.parent.mkdir()
    buf = SQLiteBuffer(path)
    written = {}
    for i in range(5):
        written.update({e.eid: e for e in group(i)})
        buf.put(group(i))
    assert [e.eid for e in buf.sample(2, make_strategy("fifo"), now_version=4)] == ["g0-0", "g0-1"]
    reused = buf.sample(2, make_strategy("priority", use_count_limit=2), now_version=4)
    assert [e.eid for e in reused] == ["g4-0", "g4-1"]  # highest version, used once, kept
    buf.close()

    out = subprocess.run([sys.executable, "-c", READER, str(path), "8"], env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    assert child["len"] == 8
    assert child["stats"] == [8, 10, 4, 2, 0, 0]  # available, put, sampled, used, dropped, evicted
    assert child["ledger"] == {
        **{f"g0-{j}": ["used", 1, 0] for j in range(2)},
        **{f"g{i}-{j}": ["available", 0, i] for i in (1, 2, 3) for j in range(2)},
        **{f"g4-{j}": ["available", 1, 4] for j in range(2)},
    }
    sampled = child["sampled"]
    assert [s[0] for s in sampled] == [f"g{i}-{j}" for i in (1, 2, 3, 4) for j in range(2)]
    assert [s[1] for s in sampled] == [1] * 6 + [2] * 2
    for eid, _, response, behav in sampled:
        assert response == written[eid].response_ids.tolist() and behav == written[eid].behav_logp.tolist()

    reopened = SQLiteBuffer(path)  # and the child's consumption is visible here
    assert len(reopened) == 0 and reopened.stats().used == 10
    reopened.close()


def test_concurrent_writer_process_and_reader_lose_and_repeat_nothing(tmp_path):
    path = tmp_path / "buffer.sqlite"
    n_groups = 200
    buf = SQLiteBuffer(path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n_groups)], env=ENV,
                              stderr=subprocess.PIPE, text=True)
    fifo = make_strategy("fifo")
    got, overlapped, deadline = [], 0, time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            batch = buf.sample(4, fifo, now_version=99)  # two whole groups of 2
            if batch:
                got += [e.eid for e in batch]
                overlapped += writer.poll() is None
                assert batch[0].group_id == batch[1].group_id and batch[2].group_id == batch[3].group_id
            elif writer.poll() is not None and len(buf) == 0:
                break
            else:
                time.sleep(0.002)
    finally:
        if writer.poll() is None:
            writer.kill()
        _, err = writer.communicate()
    assert writer.returncode == 0, err
    assert got == [f"w{i}-{j}" for i in range(n_groups) for j in range(2)]  # all, once, in write order
    assert overlapped > 0  # some batches were read while the writer was still writing
    assert buf.stats() == (0, 2 * n_groups, 2 * n_groups, 2 * n_groups, 0, 0)
    assert {tuple(e[:2]) for e in buf.ledger().values()} == {("used", 1)}
    buf.close()


def test_resume_from_the_file_and_strategy_state_repeats_the_choices(tmp_path):
    def feed(buf, step):
        buf.put(group(2 * step) + group(2 * step + 1))

    buf = SQLiteBuffer(tmp_path / "a.sqlite")
    mix = make_strategy("mix", p=0.5, window=2, seed=3)
    for step in range(3):
        feed(buf, step)
        buf.sample(4, mix, now_version=step)
    buf.close()
    for suffix in ("", "-wal"):  # a checkpoint: the buffer file and the strategy state
        if (tmp_path / f"a.sqlite{suffix}").exists():
            shutil.copy(tmp_path / f"a.sqlite{suffix}", tmp_path / f"b.sqlite{suffix}")
    saved = json.loads(json.dumps(mix.state_dict()))

    def run(buf, strategy):
        picks = []
        for step in range(3, 8):
            feed(buf, step)
            picks.append([(e.eid, e.replayed) for e in buf.sample(4, strategy, now_version=step)])
        buf.close()
        return picks

    resumed = make_strategy("mix", p=0.5, window=2)
    resumed.load_state_dict(saved)
    expected = run(SQLiteBuffer(tmp_path / "a.sqlite"), mix)
    assert run(SQLiteBuffer(tmp_path / "b.sqlite"), resumed) == expected
    assert any(replayed for batch in expected for _, replayed in batch)


# the schema before the batch_index column (a file written by an older offpolicy)
OLD_SCHEMA = """
CREATE TABLE experiences (seq BIGINT PRIMARY KEY, eid TEXT NOT NULL UNIQUE, group_id TEXT NOT NULL,
  version BIGINT NOT NULL, use_count BIGINT NOT NULL, expert INTEGER NOT NULL, meta TEXT NOT NULL,
  tensors BLOB NOT NULL);
CREATE INDEX experiences_meta ON experiences (group_id, seq, version, use_count, expert);
CREATE TABLE retired (eid TEXT PRIMARY KEY, version BIGINT NOT NULL, use_count BIGINT NOT NULL, fate TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters VALUES ('put', 2), ('sampled', 0), ('used', 0), ('dropped', 0), ('evicted', 0), ('lock', 0);
"""


@pytest.mark.parametrize("kind", ["sqlite", "sqlalchemy"])
def test_a_file_without_the_batch_index_column_gets_it_on_opening(tmp_path, kind):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        for seq, e in enumerate(group(0)):
            blob, meta = e.to_bytes()
            meta = json.dumps({k: v for k, v in json.loads(meta).items() if k != "batch_index"})
            conn.execute("INSERT INTO experiences VALUES (?, ?, ?, ?, 0, 0, ?, ?)",
                         (seq, e.eid, e.group_id, e.version, meta, blob))
    conn.close()
    if kind == "sqlite":
        buf = SQLiteBuffer(path)
    else:
        pytest.importorskip("sqlalchemy")
        buf = SQLBuffer(f"sqlite:///{path}")
    new = group(1)
    for e in new:
        e.batch_index = 4
    buf.put(new)
    got = buf.sample(4, make_strategy("fifo"), now_version=1)
    assert [(e.eid, e.batch_index) for e in got] == [("g0-0", -1), ("g0-1", -1), ("g1-0", 4), ("g1-1", 4)]
    buf.close()
    with sqlite3.connect(path) as conn:
        indexed = [r[2] for r in conn.execute("PRAGMA index_info('experiences_meta')")]
    conn.close()
    assert "batch_index" in indexed
