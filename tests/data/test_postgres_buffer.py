"""SQLBuffer on a real PostgreSQL server (tests/data/conftest.py starts one): the round trip, writer
processes on a fresh database beside a sampler (nothing lost, nothing repeated), the write lock's timeout,
and short training runs with buffer.kind=sql in sync and async mode.

Every check of what was stored reads the tables with SQL of its own, not through the buffer code."""

import multiprocessing as mp
import time

import pytest
import torch

from offpolicy.data.experience import Experience
from offpolicy.data.sampling import make_strategy
from offpolicy.data.sql_buffer import SQLBuffer


def group(i, k=2, version=None):
    g = torch.Generator().manual_seed(i)
    return [Experience(torch.tensor([1, 2, i]), torch.randint(0, 9, (3,), generator=g), torch.ones(3),
                       -torch.rand(3, generator=g), float(j), f"g{i}", f"t{i}", version=i if version is None else version,
                       eid=f"g{i}-{j}") for j in range(k)]


def query(url, sql):
    """Rows of ``sql`` read by psycopg itself."""
    import psycopg
    import sqlalchemy

    u = sqlalchemy.engine.make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database) as conn:
        return conn.execute(sql).fetchall()


def test_round_trip_types_eviction_and_a_failed_put(pg_url):
    bare = pg_url.replace("postgresql+psycopg://", "postgresql://")  # the spelling in the docs; psycopg 3 serves it
    buf = SQLBuffer(bare, capacity=8)
    written = {e.eid: e for i in range(8) for e in group(i)}
    for i in range(4):
        buf.put(group(i))
    assert [e.eid for e in buf.sample(2, make_strategy("fifo"), now_version=3)] == ["g0-0", "g0-1"]
    reused = buf.sample(2, make_strategy("priority", use_count_limit=2), now_version=3)
    assert [(e.eid, e.use_count) for e in reused] == [("g3-0", 1), ("g3-1", 1)]  # kept for one more use
    buf.put(group(4) + group(5) + group(6))  # 6 live + 6 new > capacity 8: the two oldest groups are evicted
    with pytest.raises(ValueError, match="groups already in the buffer"):
        buf.put(group(7) + group(6))  # refused as a whole: g7 must not be stored either
    buf.close()

    again = SQLBuffer(pg_url, capacity=8)  # a new engine, as another process would open it
    assert len(again) == 8 and again.versions() == {3: 2, 4: 2, 5: 2, 6: 2}
    assert again.stats() == (8, 14, 4, 2, 0, 4)  # available, put, sampled, used, dropped, evicted
    ledger = again.ledger()
    assert {k: tuple(v) for k, v in ledger.items() if v.fate != "available"} == {
        "g0-0": ("used", 1, 0), "g0-1": ("used", 1, 0), **{f"g{i}-{j}": ("evicted", 0, i) for i in (1, 2) for j in (0, 1)}}
    got = again.sample(8, make_strategy("fifo"), now_version=6)
    assert [e.eid for e in got] == [f"g{i}-{j}" for i in (3, 4, 5, 6) for j in (0, 1)]
    for e in got:  # tensors come back exactly (BYTEA round trip)
        assert torch.equal(e.response_ids, written[e.eid].response_ids)
        assert torch.equal(e.behav_logp, written[e.eid].behav_logp)
    again.close()

    types = dict(query(pg_url, "SELECT column_name, data_type FROM information_schema.columns "
                               "WHERE table_name = 'experiences'"))
    assert types["tensors"] == "bytea" and types["seq"] == "bigint" and types["batch_index"] == "bigint"
    assert query(pg_url, "SELECT attstorage FROM pg_attribute WHERE attrelid = 'experiences'::regclass "
                         "AND attname = 'tensors'") == [("e",)]  # EXTERNAL: out of line, not compressed
    assert query(pg_url, "SELECT COUNT(*) FROM experiences WHERE group_id = 'g7'") == [(0,)]
    assert query(pg_url, "SELECT COUNT(*), COUNT(DISTINCT eid) FROM retired") == [(14, 14)]


def write_groups(url, w, n_groups, k, start):
    """A writer process (an explorer): opens the buffer when every writer is ready, then puts its groups."""
    start.wait()  # all writers open the new, empty database at once
    buf = SQLBuffer(url)
    for i in range(n_groups):
        buf.put([Experience(torch.tensor([w, i]), torch.tensor([i, j]), torch.ones(2), torch.zeros(2), float(j),
                            f"w{w}g{i}", "t", version=i // 10, eid=f"w{w}g{i}-{j}") for j in range(k)])
    buf.close()


def test_writer_processes_and_a_sampler_lose_and_duplicate_nothing(pg_url):
    n_writers, n_groups, k = 4, 25, 2
    # forkserver: the writers fork from a clean process that imported torch once (spawn would import it four
    # times; a fork of the test process would copy its threads)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "offpolicy.data.sql_buffer"])
    start = ctx.Barrier(n_writers + 1)
    writers = [ctx.Process(target=write_groups, args=(pg_url, w, n_groups, k, start)) for w in range(n_writers)]
    for p in writers:
        p.start()
    try:
        start.wait(timeout=120)  # go: the tables do not exist yet, and every writer creates them
        buf = SQLBuffer(pg_url)  # the sampler opens the database too, while the writers are creating the tables
        fifo = make_strategy("fifo")
        got, overlapped = [], 0
        while True:
            running = any(p.is_alive() for p in writers)
            batch = buf.sample(2 * k, fifo, now_version=99)  # two whole groups
            if batch:
                got += [e.eid for e in batch]
                overlapped += running
                assert len({e.group_id for e in batch}) == 2
            elif not running:
                break
            else:
                time.sleep(0.002)
    finally:
        for p in writers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in writers] == [0] * n_writers  # a writer's traceback is in the captured stderr

    total = n_writers * n_groups * k
    assert len(got) == total and len(set(got)) == total  # nothing lost, nothing sampled twice
    for w in range(n_writers):  # each writer's groups come out in the order it committed them
        mine = [eid for eid in got if eid.startswith(f"w{w}g")]
        assert mine == [f"w{w}g{i}-{j}" for i in range(n_groups) for j in range(k)]
    writer_of = [eid.split("g")[0] for eid in got[::k]]
    assert writer_of != sorted(writer_of)  # the writers' puts interleaved: they did run concurrently
    assert overlapped > 0  # and the sampler read while they wrote
    assert buf.stats() == (0, total, total, total, 0, 0)
    assert {tuple(e[:2]) for e in buf.ledger().values()} == {("used", 1)}
    buf.close()
    assert query(pg_url, "SELECT COUNT(*), COUNT(DISTINCT eid), MIN(use_count), MAX(use_count) FROM retired "
                         "WHERE fate = 'used'") == [(total, total, 1, 1)]
    assert query(pg_url, "SELECT COUNT(*) FROM experiences") == [(0,)]


def test_a_writer_waits_for_the_lock_at_most_timeout_seconds(pg_url):
    import sqlalchemy

    holder = SQLBuffer(pg_url)
    waiter = SQLBuffer(pg_url, timeout=0.2)
    with holder._db.transaction():  # a sample or put in progress elsewhere holds the write lock
        with pytest.raises(sqlalchemy.exc.OperationalError, match="lock timeout"):
            waiter.put(group(0))
    waiter.put(group(0))  # the lock is free again
    assert len(holder) == 2
    holder.close()
    waiter.close()


TINY = ["train.steps=2", "eval.every=0", "tasks.eval_size=8", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "run.progress=false", "run.loggers=[]", "run.save_final=false", "train.threads=1"]
ROWS = 2 * 4 * 4  # steps * prompts_per_step * group_size


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_training_run_with_the_buffer_on_postgresql(tmp_path, pg_url, mode):
    from offpolicy.config import ConfigError, load_config
    from offpolicy.pipeline import run
    from offpolicy.pipeline.context import open_run_buffer

    run_dir = tmp_path / "run"
    threads = [] if mode == "sync" else ["pipeline.explorer_threads=1"]
    cfg = load_config(None, [*TINY, f"pipeline.mode={mode}", *threads, "buffer.kind=sql", f"buffer.url={pg_url}",
                             f"run.dir={run_dir}"])
    run(cfg, log=lambda *a: None)
    assert not (run_dir / "buffer.db").exists()

    # every row put was handed to the trainer exactly once: batch e (version e) trained at step e + 1
    assert query(pg_url, "SELECT COUNT(*) FROM experiences") == [(0,)]
    retired = query(pg_url, "SELECT version, use_count, fate FROM retired")
    assert sorted(retired) == [(v, 1, "used") for v in (0, 1) for _ in range(ROWS // 2)]
    counters = dict(query(pg_url, "SELECT name, value FROM counters"))
    assert counters["put"] == counters["sampled"] == counters["used"] == ROWS
    assert counters["dropped"] == counters["evicted"] == 0
    with pytest.raises(ConfigError, match="already holds another run's rows"):  # one run per database
        open_run_buffer(cfg, tmp_path / "other")


def test_a_database_that_cannot_be_opened_is_a_config_error(tmp_path, postgres_server):
    import sqlalchemy

    from offpolicy.config import ConfigError, load_config
    from offpolicy.pipeline.context import open_run_buffer

    url = sqlalchemy.engine.make_url(postgres_server).set(database="no_such_database")
    cfg = load_config(None, ["buffer.kind=sql", f"buffer.url={url.render_as_string(hide_password=False)}"])
    with pytest.raises(ConfigError, match="cannot open the database.*no_such_database"):
        open_run_buffer(cfg, tmp_path)


def test_the_password_in_buffer_url_is_never_written_and_a_resume_takes_it_again(tmp_path, pg_url, capsys):
    """config.json / config.yaml / run.log / the tracker / stdout hold the URL without its password (the
    server here trusts local connections, so a password is accepted and not needed); resuming with the full
    URL again is no changed setting, and resuming without it runs on the stored, password-less URL."""
    import json

    import sqlalchemy

    from offpolicy.cli import main
    from offpolicy.config import without_password

    secret = "s3cret-pw"
    url = sqlalchemy.engine.make_url(pg_url).set(password=secret).render_as_string(hide_password=False)
    run_dir = tmp_path / "run"
    args = [*TINY, "run.loggers=[tensorboard]", "checkpoint.every=1", "buffer.kind=sql"]
    assert main(["train", *args, f"buffer.url={url}", f"run.dir={run_dir}"]) == 0
    printed = capsys.readouterr()
    assert secret.encode() not in (printed.out + printed.err).encode()
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.parent.name == "tb" or "tb" in p.parts for p in written)  # the tracker's files are searched too
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    assert json.loads((run_dir / "config.json").read_text())["buffer"]["url"] == without_password(url) != url
    assert main(["train", "--resume", str(run_dir), f"buffer.url={url}", "train.steps=3", "--allow-changed-config"]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed setting: train.steps: 2 -> 3" in out and "changed setting: buffer.url" not in out
    assert main(["train", "--resume", str(run_dir), "train.steps=4", "--allow-changed-config"]) == 0
    assert query(pg_url, "SELECT COUNT(*) FROM retired") == [(4 * 4 * 4,)]  # 4 batches, each row used once


def test_without_password():
    from offpolicy.config import without_password

    assert without_password("postgresql+psycopg://u:p@w@db.example:5432/x") == "postgresql+psycopg://u@db.example:5432/x"
    assert without_password("postgresql://u@h/x") == "postgresql://u@h/x"
    assert without_password("sqlite:////tmp/a@b/buffer.db") == "sqlite:////tmp/a@b/buffer.db"
    assert without_password("sqlite:////tmp/x:y@z/buffer.db") == "sqlite:////tmp/x:y@z/buffer.db"
