"""Soak test: kill a training run with SIGKILL at random points, resume it, repeat; count lost and
duplicated experiences from the buffer's consumption log.

    .venv/bin/python scripts/soak.py [--kills 10] [--steps 120] [--mode sync|async] [--seed 0]

"Lost": an experience neither consumed nor still in the buffer, other than the rows a resume rolled back
because they were written after its checkpoint. "Duplicated": an experience handed to the trainer more
than once.
The final metrics are also compared with an uninterrupted run of the same seed (sync mode).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--mode", choices=["sync", "async"], default="sync")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from offpolicy.data.sql_buffer import SQLiteBuffer
    from offpolicy.train.checkpoint import latest_checkpoint
    from offpolicy.train.metrics import read_metrics

    base = [f"train.steps={args.steps}", "checkpoint.every=10", "buffer.kind=sqlite", "run.progress=false",
            "run.loggers=[]", "eval.every=20", f"train.seed={args.seed}"]
    if args.mode == "async":
        base += ["pipeline.mode=async", "pipeline.sync_offset=1", "train.threads=1"]
    out = Path(args.out or tempfile.mkdtemp(prefix="offpolicy-soak-"))
    cli = [sys.executable, "-m", "offpolicy.cli", "train"]
    ref = out / "reference"
    subprocess.run([*cli, *base, f"run.dir={ref}"], check=True, capture_output=True)

    run_dir = out / "soaked"
    rng = random.Random(args.seed)
    proc = subprocess.Popen([*cli, *base, f"run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kills, resumed_from = 0, []
    step_of = lambda p: -1 if p is None else int(p.name.split("-")[1])  # noqa: E731
    while kills < args.kills:
        t0 = time.monotonic()
        seen = step_of(latest_checkpoint(run_dir))
        # wait for a checkpoint newer than the one resumed from, then kill at a random point after it
        while step_of(latest_checkpoint(run_dir)) <= seen and proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        resumed_from.append(int(latest_checkpoint(run_dir).name.split("-")[1]))
        proc = subprocess.Popen([*cli, "--resume", str(run_dir)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    assert proc.wait() == 0, "the last resume failed"

    ledger = SQLiteBuffer(run_dir / "buffer.db").ledger()
    duplicated = sum(e.use_count > 1 for e in ledger.values())
    # A resume from checkpoint c may roll back (drop) only rows written after c: their versions lie in
    # [c - bound - 1, c + checkpoint interval + bound]. Any other row not consumed (or still there) is lost.
    bound, every = (1 if args.mode == "async" else 0), 10
    legit = lambda v: any(c - bound - 1 <= v <= c + every + bound for c in resumed_from)  # noqa: E731
    lost = sum(e.fate not in ("used", "available") and not legit(e.version) for e in ledger.values())
    rolled_back = sum(e.fate == "dropped" for e in ledger.values())
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))} for r in rows]  # noqa: E731
    same = strip(read_metrics(run_dir)) == strip(read_metrics(ref))
    steps = [r["step"] for r in read_metrics(run_dir, "train")]
    print(f"| mode | kills | resumed from steps | experiences written | rolled back (written after a "
          f"checkpoint) | lost | duplicated | steps logged 1..{args.steps} once | metrics equal an uninterrupted run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.mode} | {kills} | {resumed_from} | {len(ledger)} | {rolled_back} | {lost} | {duplicated} | "
          f"{steps == list(range(1, args.steps + 1))} | {same} |")


if __name__ == "__main__":
    main()
