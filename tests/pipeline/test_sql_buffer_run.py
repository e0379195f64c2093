"""buffer.kind=sql: a run keeps its experiences in the SQLAlchemy database at buffer.url, in sync and async mode."""

import sqlite3
import sys

import pytest

from offpolicy.config import ConfigError, load_config
from offpolicy.pipeline import run
from offpolicy.pipeline.context import open_run_buffer

TINY = ["train.steps=2", "eval.every=0", "tasks.eval_size=8", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "run.progress=false", "run.loggers=[]", "run.save_final=false", "train.threads=1"]
ROWS = 2 * 4 * 4  # steps * prompts_per_step * group_size


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_run_leaves_every_row_used_in_the_database(tmp_path, mode):
    pytest.importorskip("sqlalchemy")
    db, run_dir = tmp_path / "b.db", tmp_path / "run"
    threads = [] if mode == "sync" else ["pipeline.explorer_threads=1"]
    cfg = load_config(None, [*TINY, f"pipeline.mode={mode}", *threads, "buffer.kind=sql", f"buffer.url=sqlite:///{db}",
                             f"run.dir={run_dir}"])
    run(cfg, log=lambda *a: None)
    assert not (run_dir / "buffer.db").exists()  # the rows went to buffer.url, not to the default file

    # read the database with sqlite3 itself, not through the buffer code that wrote it
    with sqlite3.connect(db) as conn:
        retired = conn.execute("SELECT version, use_count, fate FROM retired").fetchall()
        live = conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0]
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    # every row put was handed to the trainer exactly once: batch e (version e) trained at step e + 1
    assert live == 0 and len(retired) == ROWS
    assert sorted(retired) == [(v, 1, "used") for v in (0, 1) for _ in range(ROWS // 2)]
    assert counters["put"] == counters["sampled"] == counters["used"] == ROWS
    assert counters["dropped"] == counters["evicted"] == 0

    # the database now belongs to this run: a new run is refused; resuming this one (it has a checkpoint) is not
    with pytest.raises(ConfigError, match="already holds another run's rows"):
        open_run_buffer(cfg, tmp_path / "other")
    open_run_buffer(cfg, run_dir).close()


@pytest.mark.parametrize("overrides, message", [
    (["buffer.kind=sql"], "buffer.kind=sql needs buffer.url"),
    (["buffer.url=sqlite:///b.db"], "buffer.url is set but buffer.kind=None; set buffer.kind=sql"),
    (["buffer.kind=sqlite", "buffer.url=sqlite:///b.db"], "buffer.url is set but buffer.kind=sqlite"),
    (["buffer.kind=sql", "buffer.url=b.db"], "buffer.url='b.db' is not an SQLAlchemy URL"),
])
def test_kind_sql_and_url_go_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_in_memory_sqlite_url_cannot_serve_the_async_explorer(tmp_path):
    pytest.importorskip("sqlalchemy")
    cfg = load_config(None, ["pipeline.mode=async", "buffer.kind=sql", "buffer.url=sqlite://"])
    with pytest.raises(ConfigError, match="in-memory SQLite database cannot be shared"):
        open_run_buffer(cfg, tmp_path)


def test_unopenable_url_is_a_config_error(tmp_path):
    pytest.importorskip("sqlalchemy")
    cfg = load_config(None, ["buffer.kind=sql", f"buffer.url=sqlite:///{tmp_path}/no/such/dir/b.db"])
    with pytest.raises(ConfigError, match="cannot open the database"):
        open_run_buffer(cfg, tmp_path)


def test_missing_sqlalchemy_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # `import sqlalchemy` now raises ImportError
    cfg = load_config(None, ["buffer.kind=sql", f"buffer.url=sqlite:///{tmp_path}/b.db"])
    with pytest.raises(ConfigError, match=r"offpolicy\[sql\]"):
        open_run_buffer(cfg, tmp_path)
