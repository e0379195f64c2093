"""benchmarks/gpu.py --dry-run: every code path of the GPU benchmark on the CPU, and the table it writes.

The GPU numbers themselves need a GPU machine (docs/benchmarks.md, "GPU path"); this keeps the prepared
script runnable: a broken import, a renamed project function or a column that stops being filled fails here.
"""

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["size", "params M", "precision", "gen tok/s", "gen s", "gen MFU %", "train tok/s", "train s",
           "train MFU %", "step s", "CB tok/s", "CB MFU %", "timed calls"]
TEXT_COLUMNS = {"size", "precision", "timed calls"}


def _rows(table: str) -> tuple[list[str], list[dict[str, str]]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], [dict(zip(cells[0], c)) for c in cells[2:]]


def test_dry_run_writes_a_full_table(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert table in proc.stdout  # the same table is printed
    first = table.splitlines()[0]
    assert "dry run" in first and "torch " in first and "transformers " in first
    assert "Peak for MFU:" in table and "TFLOP/s" in table
    header, rows = _rows(table)
    assert header == COLUMNS
    # one row per precision of the tiniest size, every cell filled; continuous batching only where the installed
    # transformers has it, and then the table says why not
    assert [(r["size"], r["precision"]) for r in rows] == [("64x2", "autocast"), ("64x2", "bf16"), ("64x2", "fp32")]
    has_cb = "has no generate_batch" not in table
    numeric = set(COLUMNS) - TEXT_COLUMNS - (set() if has_cb else {"CB tok/s", "CB MFU %"})
    for row in rows:
        assert row["timed calls"] == ("2/2/2" if has_cb else "2/2/0"), row
        for col in numeric:
            value = float(row[col].replace(",", ""))
            assert math.isfinite(value) and value > 0, (col, row)
        # the step is generation then training
        step, gen, train = (float(row[c].replace(",", "")) for c in ("step s", "gen s", "train s"))
        assert math.isclose(step, gen + train, rel_tol=0.05)
    assert "skipped" not in table or not has_cb
