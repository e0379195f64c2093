"""SQL buffers: :class:`SQLiteBuffer` (sqlite3, WAL mode; the default for runs) and :class:`SQLBuffer`
(the same tables behind an SQLAlchemy URL, e.g. PostgreSQL; sqlalchemy is optional and imported lazily).

Tables: ``experiences`` (one row per experience: metadata columns the strategies read, the JSON metadata
and the raw-array blob from :meth:`Experience.to_bytes`; no pickle), ``retired`` (eid, version,
use_count and fate of every row that left: the consumption log) and ``counters``. A file written before
the ``batch_index`` column existed gets it on opening (value -1, unknown, for its rows).

Concurrency: every ``put`` and ``sample`` is one short write transaction that takes the database's write
lock first (SQLite ``BEGIN IMMEDIATE``; through SQLAlchemy an ``UPDATE`` of a lock row, which is a row lock
on PostgreSQL), so writer processes (on any number of machines) and the sampler never interleave inside
one. Each process and each thread opens its own connection; a busy database is waited on for ``timeout``
seconds (PostgreSQL: ``lock_timeout``). Serialisation and deserialisation happen outside the transaction.

PostgreSQL: write transactions run at READ COMMITTED, so each statement after the lock sees every
transaction committed before the lock was granted (at REPEATABLE READ or SERIALIZABLE the waiting lock
``UPDATE`` would fail with a serialisation error instead); reads (``stats``, ``ledger``, ...) take one
REPEATABLE READ snapshot, so their several statements agree. One lock rather than row locks
(``FOR UPDATE SKIP LOCKED``): a strategy chooses among all stored groups (staleness, priority, mixes) and
needs one consistent view of them, and a put's eviction plan needs the same; the critical section is one
transaction of a few statements (docs/scaling.md measures it against the number of writers). Creating the tables is
serialised by an advisory lock, as ``CREATE TABLE IF NOT EXISTS`` races between processes on PostgreSQL.
A bare ``postgresql://`` URL uses psycopg 3 (``postgresql+psycopg://``, the driver ``offpolicy[sql]``
installs); name another driver in the URL to use it (``postgresql+psycopg2://``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from offpolicy.data.buffer import (
    BufferStats,
    LedgerEntry,
    check_buffer_args,
    checked_select,
    plan_eviction,
    removal_fates,
    restore_on_error,
    split_groups,
)
from offpolicy.data.experience import Experience
from offpolicy.data.sampling import GroupMeta, SampleStrategy, Selection

Exec = Callable[..., list]  # ex(sql, params=None) -> rows; params: a dict, or a list of dicts (executemany)

_TABLES = (
    "CREATE TABLE IF NOT EXISTS experiences (seq BIGINT PRIMARY KEY, eid TEXT NOT NULL UNIQUE, "
    "group_id TEXT NOT NULL, version BIGINT NOT NULL, batch_index BIGINT NOT NULL DEFAULT -1, "
    "use_count BIGINT NOT NULL, expert INTEGER NOT NULL, meta TEXT NOT NULL, tensors {blob} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS retired (eid TEXT PRIMARY KEY, version BIGINT NOT NULL, "
    "use_count BIGINT NOT NULL, fate TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
)
# The index covers every column the strategies read, so the metadata scan of a sample never reads blobs.
_INDEX = ("CREATE INDEX IF NOT EXISTS experiences_meta ON experiences "
          "(group_id, seq, version, batch_index, use_count, expert)")
# Files written before the batch_index column get it (O(1) on SQLite and PostgreSQL >= 11) and a rebuilt
# index that covers it.
_ADD_BATCH_INDEX = ("ALTER TABLE experiences ADD COLUMN batch_index BIGINT NOT NULL DEFAULT -1",
                    "DROP INDEX IF EXISTS experiences_meta")
# Row blobs (token ids, log-probs; ~5 KB for 320 tokens) are stored out of line uncompressed: pglz saves about
# half the bytes of a row that lives seconds, at a server CPU cost that made a put of 8 such rows ~1.4x slower
# and a sample ~1.2x slower on this project's machine (docs/scaling.md).
_PG_BLOB_STORAGE = "ALTER TABLE experiences ALTER COLUMN tensors SET STORAGE EXTERNAL"
_COUNTERS = ("put", "sampled", "used", "dropped", "evicted", "lock")
_CHUNK = 500  # values per IN (...) list; SQLite allows 32766 bound parameters, PostgreSQL 65535
_USED_OR_DROPPED = "CASE WHEN use_count > 0 THEN 'used' ELSE 'dropped' END"


# ------------------------------------------------------------------------------------------- backends


class _SQLiteDB:
    """sqlite3 connections, one per (process, thread), in WAL mode with a busy timeout."""

    blob = "BLOB"
    backend = "sqlite"

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout
        self._local = threading.local()
        self._opened: list[tuple[int, sqlite3.Connection]] = []

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # a forked child never reuses the parent's
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: commits survive a process crash
            self._local.conn, self._local.pid = conn, os.getpid()
            self._opened.append((os.getpid(), conn))
        return conn

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Exec]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield functools.partial(_run_sqlite, conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def setup(self) -> contextlib.AbstractContextManager[Exec]:
        """A write transaction for creating the tables."""
        return self.transaction()

    def close(self) -> None:
        pid = os.getpid()
        for owner, conn in self._opened:
            if owner == pid:
                conn.close()
        self._opened = [(o, c) for o, c in self._opened if o != pid]
        self._local = threading.local()


def _run_sqlite(conn: sqlite3.Connection, sql: str, params: Any = None) -> list:
    if isinstance(params, list):
        conn.executemany(sql, params)
        return []
    return conn.execute(sql, params or {}).fetchall()


class _AlchemyDB:
    """An SQLAlchemy engine per process; write transactions lock the ``counters`` row named ``lock``."""

    def __init__(self, url: str, timeout: float):
        try:
            import sqlalchemy
        except ImportError as err:
            raise ImportError("SQLBuffer needs SQLAlchemy (pip install sqlalchemy); "
                              "SQLiteBuffer needs nothing extra") from err
        self.sa, self.timeout = sqlalchemy, timeout
        parsed = sqlalchemy.engine.make_url(url)
        if parsed.drivername == "postgresql":  # SQLAlchemy's default would be psycopg2; offpolicy[sql] has psycopg 3
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.url, self.backend = parsed, parsed.get_backend_name()
        self.blob = "BYTEA" if self.backend == "postgresql" else "BLOB"
        self._engine, self._pid = None, None

    def _get_engine(self):
        if self._engine is None or self._pid != os.getpid():  # engines are not shared across a fork
            sa = self.sa
            if self.backend == "sqlite":
                engine = sa.create_engine(self.url, connect_args={"timeout": self.timeout})
                sa.event.listen(engine, "connect", _sqlite_wal)
            elif self.backend == "postgresql":
                engine = sa.create_engine(self.url, pool_pre_ping=True, isolation_level="READ COMMITTED")
                sa.event.listen(engine, "connect", functools.partial(_pg_lock_timeout, self.timeout))
            else:
                engine = sa.create_engine(self.url, pool_pre_ping=True)
            self._engine, self._pid = engine, os.getpid()
        return self._engine

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[Exec]:
        with self._get_engine().connect() as conn:
            if not write and self.backend == "postgresql":  # one snapshot for all the statements of a read
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                ex = functools.partial(_run_alchemy, self.sa, conn)
                if write:  # first statement: take the write lock before reading anything
                    ex("UPDATE counters SET value = value + 1 WHERE name = 'lock'")
                yield ex

    @contextlib.contextmanager
    def setup(self) -> Iterator[Exec]:
        """A transaction for creating the tables (without the lock row, which may not exist yet)."""
        with self._get_engine().begin() as conn:
            ex = functools.partial(_run_alchemy, self.sa, conn)
            if self.backend == "postgresql":  # held to the commit: one process creates, the others then see
                ex("SELECT pg_advisory_xact_lock(:key)", {"key": _SETUP_LOCK})
            yield ex

    def close(self) -> None:
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None


_SETUP_LOCK = 0x6F6666706F6C6963  # "offpolic": the advisory lock key that serialises table creation


def _pg_lock_timeout(timeout: float, dbapi_conn, _record) -> None:
    """Wait at most ``timeout`` seconds for the write lock (as SQLite's busy timeout), then fail."""
    cur = dbapi_conn.cursor()
    cur.execute(f"SET lock_timeout = {max(1, int(timeout * 1000))}")
    cur.close()
    dbapi_conn.commit()  # a SET inside a transaction that is rolled back would be undone


def _sqlite_wal(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def _run_alchemy(sa, conn, sql: str, params: Any = None) -> list:
    res = conn.execute(sa.text(sql), params if params is not None else {})
    return [tuple(r) for r in res] if res.returns_rows else []


def _columns(ex: Exec, backend: str, table: str) -> set[str]:
    if backend == "sqlite":
        return {r[0] for r in ex("SELECT name FROM pragma_table_info(:t)", {"t": table})}
    return {r[0] for r in ex("SELECT column_name FROM information_schema.columns "
                             "WHERE table_name = :t AND table_schema = current_schema()", {"t": table})}


def _has_index(ex: Exec, backend: str, name: str) -> bool:
    if backend == "sqlite":
        return bool(ex("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = :n", {"n": name}))
    return ex("SELECT to_regclass(:n) IS NOT NULL", {"n": name})[0][0]


def _each_in(ex: Exec, sql: str, values: Iterable[str]) -> list:
    """Run ``sql`` with its ``{in_}`` replaced by a list of bound values, once per chunk; rows concatenated."""
    values, rows = list(values), []
    for i in range(0, len(values), _CHUNK):
        part = values[i : i + _CHUNK]
        names = ", ".join(f":v{j}" for j in range(len(part)))
        rows += ex(sql.format(in_=names), {f"v{j}": v for j, v in enumerate(part)})
    return rows


# ---------------------------------------------------------------------------------------------- store


class _SQLStore:
    """The buffer logic over either backend (see :class:`~offpolicy.data.buffer.Buffer`)."""

    def __init__(self, db, capacity: int | None, eviction: str):
        check_buffer_args(capacity, eviction)
        self.capacity, self.eviction = capacity, eviction
        self._db = db
        # On a database that already has everything this only reads, and takes no table lock: on PostgreSQL a
        # CREATE INDEX (even IF NOT EXISTS) or an INSERT ... ON CONFLICT beside writers that hold the lock row
        # can deadlock with them. Concurrent set-ups are serialised (SQLite: the write lock; PostgreSQL: an
        # advisory lock), so each statement below runs in at most one process.
        with db.setup() as ex:
            new = not _columns(ex, db.backend, "experiences")
            for sql in _TABLES:
                ex(sql.format(blob=db.blob))
            if new and db.backend == "postgresql":
                ex(_PG_BLOB_STORAGE)
            elif "batch_index" not in _columns(ex, db.backend, "experiences"):
                for sql in _ADD_BATCH_INDEX:
                    ex(sql)
            if not _has_index(ex, db.backend, "experiences_meta"):
                ex(_INDEX)
            have = {r[0] for r in ex("SELECT name FROM counters")}
            missing = [c for c in _COUNTERS if c not in have]
            if missing:
                ex("INSERT INTO counters (name, value) VALUES (:name, 0)", [{"name": c} for c in missing])

    # ------------------------------------------------------------------------------------- writing

    def put(self, exps: list[Experience]) -> None:
        new = split_groups(exps)
        if not exps:
            return
        rows = [_encode(e) for e in exps]  # serialise before taking the lock
        with self._db.transaction() as ex:
            self._check_new(ex, list(new), [e.eid for e in exps])
            # no capacity, nothing to evict: skip the scan of every stored group (it grows with the backlog)
            groups = self._groups(ex) if self.capacity is not None else []
            evict = plan_eviction(groups, len(exps), self.capacity, self.eviction)
            self._bump(ex, "evicted", self._retire(ex, evict, "'evicted'"))
            base = ex("SELECT value FROM counters WHERE name = 'put'")[0][0]
            self._bump(ex, "put", len(rows))
            ex("INSERT INTO experiences (seq, eid, group_id, version, batch_index, use_count, expert, meta, tensors) "
               "VALUES (:seq, :eid, :group_id, :version, :batch_index, :use_count, :expert, :meta, :tensors)",
               [dict(r, seq=base + i) for i, r in enumerate(rows)])

    def _check_new(self, ex: Exec, group_ids: list[str], eids: list[str]) -> None:
        present = _each_in(ex, "SELECT DISTINCT group_id FROM experiences WHERE group_id IN ({in_})", group_ids)
        if present:
            raise ValueError(f"groups already in the buffer: {[r[0] for r in present[:3]]}; put whole groups once")
        seen = _each_in(ex, "SELECT eid FROM experiences WHERE eid IN ({in_}) "
                            "UNION SELECT eid FROM retired WHERE eid IN ({in_})", eids)
        if seen:
            raise ValueError(f"eids already put: {[r[0] for r in seen[:3]]}")

    def sample(self, n: int, strategy: SampleStrategy, *, now_version: int) -> list[Experience]:
        with restore_on_error(strategy), self._db.transaction() as ex:
            groups = self._groups(ex)
            sel = checked_select(strategy, groups, n, now_version)
            rows = _each_in(ex, "SELECT group_id, seq, use_count, meta, tensors FROM experiences "
                                "WHERE group_id IN ({in_})", sel.take)
            _each_in(ex, "UPDATE experiences SET use_count = use_count + 1 WHERE group_id IN ({in_})", sel.take)
            self._retire(ex, sel.remove, _USED_OR_DROPPED)
            fates = removal_fates(sel, groups)
            for name, k in (("sampled", len(rows)), ("used", fates["used"]), ("dropped", fates["dropped"])):
                self._bump(ex, name, k)
        return _decode(rows, sel)

    def _retire(self, ex: Exec, group_ids: Sequence[str], fate_sql: str) -> int:
        """Move the rows of ``group_ids`` to ``retired`` with fate ``fate_sql`` (an SQL expression); row count."""
        if not group_ids:
            return 0
        moved = _each_in(ex, "SELECT COUNT(*) FROM experiences WHERE group_id IN ({in_})", group_ids)
        _each_in(ex, f"INSERT INTO retired (eid, version, use_count, fate) SELECT eid, version, use_count, "
                     f"{fate_sql} FROM experiences WHERE group_id IN ({{in_}})", group_ids)
        _each_in(ex, "DELETE FROM experiences WHERE group_id IN ({in_})", group_ids)
        return sum(r[0] for r in moved)

    def _bump(self, ex: Exec, name: str, k: int) -> None:
        """Add ``k`` to counter ``name`` (nothing for 0: on a server every statement is a round trip)."""
        if k:
            ex("UPDATE counters SET value = value + :k WHERE name = :name", {"k": k, "name": name})

    # ------------------------------------------------------------------------------------- reading

    def _groups(self, ex: Exec) -> list[GroupMeta]:
        rows = ex("SELECT group_id, MIN(seq), COUNT(*), MIN(version), MAX(use_count), MAX(expert), "
                  "MIN(batch_index) FROM experiences GROUP BY group_id")
        return [GroupMeta(k, int(s), int(n), int(v), int(u), bool(x), int(b)) for k, s, n, v, u, x, b in rows]

    def __len__(self) -> int:
        with self._db.transaction(write=False) as ex:
            return ex("SELECT COUNT(*) FROM experiences")[0][0]

    def versions(self, *, unused: bool = False) -> dict[int, int]:
        where = "expert = 0" + (" AND use_count = 0" if unused else "")
        with self._db.transaction(write=False) as ex:
            rows = ex(f"SELECT version, COUNT(*) FROM experiences WHERE {where} GROUP BY version ORDER BY version")
        return {int(v): int(c) for v, c in rows}

    def stats(self) -> BufferStats:
        with self._db.transaction(write=False) as ex:
            available = ex("SELECT COUNT(*) FROM experiences")[0][0]
            counts = dict(ex("SELECT name, value FROM counters"))
        return BufferStats(available, *(counts[k] for k in BufferStats._fields[1:]))

    def ledger(self) -> dict[str, LedgerEntry]:
        with self._db.transaction(write=False) as ex:
            live = ex("SELECT eid, version, use_count FROM experiences")
            gone = ex("SELECT eid, version, use_count, fate FROM retired")
        out = {eid: LedgerEntry(fate, int(u), int(v)) for eid, v, u, fate in gone}
        out.update({eid: LedgerEntry("available", int(u), int(v)) for eid, v, u in live})
        return out

    def close(self) -> None:
        """Close this process's connections (the file and its contents stay)."""
        self._db.close()


def _encode(e: Experience) -> dict[str, Any]:
    blob, meta = e.to_bytes()
    return {"eid": e.eid, "group_id": e.group_id, "version": e.version, "batch_index": e.batch_index,
            "use_count": e.use_count, "expert": int(e.expert), "meta": meta, "tensors": blob}


def _decode(rows: list, sel: Selection) -> list[Experience]:
    """Experiences in ``sel.take`` order (rows by insertion within a group), with the new use count."""
    order = {k: i for i, k in enumerate(sel.take)}
    out = []
    for gid, _seq, use_count, meta, blob in sorted(rows, key=lambda r: (order[r[0]], r[1])):
        e = Experience.from_bytes(bytes(blob), meta)
        e.use_count = int(use_count) + 1
        e.replayed = e.replayed or gid in sel.replayed
        out.append(e)
    return out


# ------------------------------------------------------------------------------------------- classes


class SQLiteBuffer(_SQLStore):
    """The default buffer for runs: a SQLite file (e.g. ``run_dir / "buffer.sqlite"``), WAL mode.

    Reopening the same path (in any process) sees exactly the rows written and not yet removed, with
    their use counts and the counters. Picklable: a child process reopens the file by path.
    """

    def __init__(self, path: str | os.PathLike, capacity: int | None = None, eviction: str = "oldest",
                 *, timeout: float = 60.0):
        self.path = Path(path)
        self.timeout = timeout
        super().__init__(_SQLiteDB(self.path, timeout), capacity, eviction)

    def __reduce__(self):
        return _reopen_sqlite, (str(self.path), self.capacity, self.eviction, self.timeout)

    def __repr__(self) -> str:
        return f"SQLiteBuffer({str(self.path)!r}, capacity={self.capacity}, eviction={self.eviction!r})"


class SQLBuffer(_SQLStore):
    """The same buffer behind an SQLAlchemy URL (``sqlite:///run/buffer.sqlite``,
    ``postgresql://user@host/db``): one buffer per database. Needs ``pip install sqlalchemy``."""

    def __init__(self, url: str, capacity: int | None = None, eviction: str = "oldest", *, timeout: float = 60.0):
        self.url, self.timeout = url, timeout
        super().__init__(_AlchemyDB(url, timeout), capacity, eviction)

    def __reduce__(self):
        return _reopen_sql, (self.url, self.capacity, self.eviction, self.timeout)

    def __repr__(self) -> str:
        return f"SQLBuffer({self.url!r}, capacity={self.capacity}, eviction={self.eviction!r})"


def _reopen_sqlite(path, capacity, eviction, timeout):
    return SQLiteBuffer(path, capacity, eviction, timeout=timeout)


def _reopen_sql(url, capacity, eviction, timeout):
    return SQLBuffer(url, capacity, eviction, timeout=timeout)
