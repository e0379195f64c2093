"""A real PostgreSQL server for the SQL buffer tests, started once per session by scripts/setup_postgres.sh
(which installs PostgreSQL with apt-get where it is missing and we are root).

Tests that use ``pg_url`` are skipped, with the script's reason, only where PostgreSQL is missing and cannot
be installed (the script's exit status 3) or its Python driver is missing; ``OFFPOLICY_REQUIRE_POSTGRES=1``
(for CI) makes that a failure too. A server that is installed but does not start is an error, not a skip.
"""

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup_postgres.sh"
_databases = itertools.count()


def _unavailable(reason: str):
    if os.environ.get("OFFPOLICY_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"OFFPOLICY_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """SQLAlchemy URL of the session's server's database ``offpolicy`` (its superuser ``postgres``, no password)."""
    try:
        import psycopg  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as e:
        _unavailable(f"the PostgreSQL buffer needs sqlalchemy and psycopg (pip install 'offpolicy[sql]'): {e}")
    # not under pytest's tmp_path: as root the server runs as user postgres, who cannot enter /tmp/pytest-of-root
    where = tempfile.mkdtemp(prefix="offpolicy-pg-")
    out = subprocess.run(["bash", str(SCRIPT), "start", where], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        shutil.rmtree(where, ignore_errors=True)
        detail = " | ".join(out.stderr.strip().splitlines()[-3:])
        if out.returncode == 3:
            _unavailable(f"PostgreSQL is not installed and cannot be installed here: {detail}")
        pytest.fail(f"scripts/setup_postgres.sh start failed (exit {out.returncode}): {detail}")
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", where], capture_output=True, timeout=120)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server):
    """A new, empty database on the session's server for one test (dropped afterwards); its SQLAlchemy URL."""
    import sqlalchemy

    admin = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    name = f"t{os.getpid()}_{next(_databases)}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield sqlalchemy.engine.make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # FORCE: a child process that died holding a connection must not block this
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
