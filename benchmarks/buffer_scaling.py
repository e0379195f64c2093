"""Benchmark: buffer put / sample latency versus the number of concurrent writer processes, SQLite vs PostgreSQL.

    .venv/bin/python benchmarks/buffer_scaling.py [--writers 1 2 4 8] [--backends sqlite postgres]
        [--groups 40] [--group-size 8] [--tokens 320] [--batch 64] [--pg-url URL] [--out FILE.json]

W writer processes (the explorers) each put ``--groups`` groups of ``--group-size`` rows (one row:
``--tokens`` response tokens with their log-probs, the size of a real rollout) as fast as they can, while
the main process (the trainer) samples ``--batch`` rows at a time with the FIFO strategy until every row
was sampled. Each put and each non-empty sample is timed from the call to its return (lock waits
included). Rows: p50 / p95 latency in ms, and the aggregate rows put per second from "go" to the last put.
A saturation test: real explorers put a group every few seconds, far below these rates.

Every (backend, W) starts from an empty database: SQLite a new file (WAL, synchronous=NORMAL, the run
default); PostgreSQL a new database on the server at ``--pg-url``, or else on a server this script starts
with scripts/setup_postgres.sh in a temporary directory (server defaults: fsync and synchronous_commit on;
``--pg-options "-c synchronous_commit=off"`` gives SQLite's durability, which does not sync each commit).
At the end every row must have been sampled exactly once (checked from the ledger).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_groups(w: int, n_groups: int, k: int, tokens: int) -> list:
    import torch

    from offpolicy.data.experience import Experience

    g = torch.Generator().manual_seed(w)
    prompt = torch.randint(0, 32000, (64,), generator=g)
    return [[Experience(prompt, torch.randint(0, 32000, (tokens,), generator=g), torch.ones(tokens),
                        -torch.rand(tokens, generator=g), float(j), f"w{w}g{i}", f"t{i}", version=i,
                        eid=f"w{w}g{i}-{j}") for j in range(k)] for i in range(n_groups)]


def writer(where: str, w: int, n_groups: int, k: int, tokens: int, ready, go, results) -> None:
    import torch

    torch.set_num_threads(1)
    from offpolicy.data.buffer import open_buffer

    groups = make_groups(w, n_groups, k, tokens)
    buf = open_buffer(where)
    ready.put(w)
    go.wait()
    lat = []
    for grp in groups:
        t = time.perf_counter()
        buf.put(grp)
        lat.append(time.perf_counter() - t)
    results.put((w, lat, time.time()))
    buf.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def measure(where: str, n_writers: int, args) -> dict:
    from offpolicy.data.buffer import open_buffer
    from offpolicy.data.sampling import make_strategy

    buf = open_buffer(where)  # creates the tables before the writers start
    ctx = mp.get_context("forkserver")  # writers fork from one process that imported torch once
    ctx.set_forkserver_preload(["torch", "offpolicy.data.buffer", "offpolicy.data.sql_buffer"])
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=writer, args=(where, w, args.groups, args.group_size, args.tokens, ready, go, results))
             for w in range(n_writers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    fifo = make_strategy("fifo")
    total = n_writers * args.groups * args.group_size
    start = time.time()
    go.set()
    sample_lat, got, done = [], 0, []
    while got < total:
        t = time.perf_counter()
        batch = buf.sample(args.batch, fifo, now_version=10**6)
        dt = time.perf_counter() - t
        if batch:
            sample_lat.append(dt)
            got += len(batch)
        elif len(done) < n_writers:
            while not results.empty():
                done.append(results.get())
            time.sleep(0.001)
        elif len(buf) < args.batch:  # the writers are done; the remainder is less than a batch
            got += len(buf.sample(len(buf), fifo, now_version=10**6)) if len(buf) else 0
            break
    while len(done) < n_writers:
        done.append(results.get(timeout=300))
    for p in procs:
        p.join()
    put_lat = [x for _, lat, _ in done for x in lat]
    last_put = max(t for _, _, t in done)
    ledger = buf.ledger()
    ok = len(ledger) == total and all(e.fate == "used" and e.use_count == 1 for e in ledger.values())
    buf.close()
    return {"writers": n_writers, "load_avg_1min": os.getloadavg()[0], "rows": total, "put_p50_ms": pct(put_lat, 0.5), "put_p95_ms": pct(put_lat, 0.95),
            "sample_p50_ms": pct(sample_lat, 0.5), "sample_p95_ms": pct(sample_lat, 0.95),
            "rows_put_per_s": total / (last_put - start), "exactly_once": ok}


def start_postgres(options: str) -> tuple[str, str]:
    where = tempfile.mkdtemp(prefix="offpolicy-pg-bench-")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup_postgres.sh"), "start", where], check=True,
                         capture_output=True, text=True, env={**os.environ, "PG_OPTIONS": options})
    return out.stdout.strip().splitlines()[-1], where


def new_database(server_url: str, name: str) -> str:
    import sqlalchemy

    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def round_trips(url: str, args) -> dict:
    """Statements per put / sample / empty sample on a server (each one round trip), and one round trip's
    latency (median ``SELECT 1``): on a loaded machine that latency, not the server's work, sets a put's."""
    import sqlalchemy

    from offpolicy.data.sampling import make_strategy
    from offpolicy.data.sql_buffer import SQLBuffer

    buf = SQLBuffer(url)
    engine = buf._db._get_engine()
    count = [0]
    sqlalchemy.event.listen(engine, "before_cursor_execute", lambda *a: count.__setitem__(0, count[0] + 1))
    out = {}
    groups = make_groups(0, 2, args.group_size, args.tokens)
    for name, op in (("put", lambda: buf.put(groups[0])), ("put_2", lambda: buf.put(groups[1])),
                     ("sample", lambda: buf.sample(2 * args.group_size, make_strategy("fifo"), now_version=9)),
                     ("empty_sample", lambda: buf.sample(args.group_size, make_strategy("fifo"), now_version=9))):
        count[0] = 0
        op()
        out[f"statements_{name}"] = count[0]
    with engine.connect() as conn:
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            conn.execute(sqlalchemy.text("SELECT 1"))
            lat.append(time.perf_counter() - t)
    buf.close()
    out.pop("statements_put_2")
    return {**out, "select1_p50_ms": pct(lat, 0.5), "select1_p95_ms": pct(lat, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--groups", type=int, default=40, help="groups each writer puts")
    ap.add_argument("--group-size", type=int, default=8, help="rows per group (per put)")
    ap.add_argument("--tokens", type=int, default=320, help="response tokens per row")
    ap.add_argument("--batch", type=int, default=64, help="rows per sample")
    ap.add_argument("--pg-url", help="an existing server (the URL of any database on it); default: start one")
    ap.add_argument("--pg-options", default="", help="server options when this script starts the server")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    rows, server, pg_dir = [], args.pg_url, None
    tmp = Path(tempfile.mkdtemp(prefix="offpolicy-bench-"))
    try:
        if "postgres" in args.backends and server is None:
            server, pg_dir = start_postgres(args.pg_options)
        print("| backend | writers | rows | put p50 ms | put p95 ms | sample p50 ms | sample p95 ms | rows put/s | "
              "exactly once | load avg |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        if "postgres" in args.backends:
            rt = round_trips(new_database(server, "bench_round_trips"), args)
            rows.append({"backend": "postgres", **rt})
            print(f"postgres: {rt}  (load average {os.getloadavg()[0]:.1f})", flush=True)
        for backend in args.backends:
            for n in args.writers:
                where = (str(tmp / f"w{n}.sqlite") if backend == "sqlite" else
                         new_database(server, f"bench_w{n}"))
                r = {"backend": backend, **measure(where, n, args)}
                rows.append(r)
                print(f"| {backend} | {n} | {r['rows']} | {r['put_p50_ms']:.1f} | {r['put_p95_ms']:.1f} | "
                      f"{r['sample_p50_ms']:.1f} | {r['sample_p95_ms']:.1f} | {r['rows_put_per_s']:.0f} | "
                      f"{r['exactly_once']} | {r['load_avg_1min']:.1f} |", flush=True)
    finally:
        if pg_dir is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "setup_postgres.sh"), "stop", pg_dir], capture_output=True)
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
