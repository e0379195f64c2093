#!/usr/bin/env bash
# A throwaway PostgreSQL server for the SQL buffer's tests and benchmarks (tests/data/conftest.py runs it).
#
#   scripts/setup_postgres.sh install            install PostgreSQL (apt-get) if its server programs are missing
#   scripts/setup_postgres.sh start DIR [DB]     install if needed, create a cluster in DIR (once), start it on
#                                                127.0.0.1 at a free port and on a unix socket in DIR, create
#                                                database DB (default offpolicy); the last line printed is the
#                                                SQLAlchemy URL, e.g. postgresql+psycopg://postgres@127.0.0.1:41234/offpolicy
#   scripts/setup_postgres.sh stop DIR           stop the server of DIR (DIR itself is left for the caller)
#
# Every command is idempotent: `start` on a running cluster prints its URL again. The cluster trusts local
# connections (no password) and listens on 127.0.0.1 only: for tests, never for a shared server
# (docs/scaling.md says how to set one up). PostgreSQL refuses to run as root, so as root the server runs as
# the user `postgres` (created if missing) and DIR is handed to it; DIR's parents must let that user in
# (a directory made by `mktemp -d` under /tmp does).
#
# Environment: PG_BINDIR (where initdb, pg_ctl and postgres are; default: the newest /usr/lib/postgresql/*/bin,
# else PATH), PG_PORT (default: a free port), PG_OPTIONS (more server options, e.g. "-c fsync=off").
# Exit status 3: PostgreSQL is missing and cannot be installed here (callers skip on it).
set -euo pipefail

die() { echo "setup_postgres: $1" >&2; exit "${2:-1}"; }

find_bindir() {
  local d
  if [[ -n "${PG_BINDIR:-}" ]]; then
    [[ -x "$PG_BINDIR/initdb" && -x "$PG_BINDIR/pg_ctl" && -x "$PG_BINDIR/postgres" ]] && { echo "$PG_BINDIR"; return; }
    die "PG_BINDIR=$PG_BINDIR lacks initdb, pg_ctl or postgres"
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && { echo "$d"; return; }
  done
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null && command -v postgres >/dev/null; then
    dirname "$(command -v initdb)"
    return
  fi
  return 1
}

install_postgres() {
  find_bindir >/dev/null && return 0
  [[ "$(id -u)" == 0 ]] || die "PostgreSQL server programs (initdb, pg_ctl, postgres) not found, and only root can apt-get install postgresql" 3
  command -v apt-get >/dev/null || die "PostgreSQL server programs not found and there is no apt-get to install them" 3
  echo "setup_postgres: installing postgresql with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } >&2 \
    || die "apt-get install postgresql failed" 3
  find_bindir >/dev/null || die "postgresql installed but initdb/pg_ctl/postgres still not found" 3
}

# as_owner CMD...: run CMD as the cluster's owner (`postgres` when we are root, else ourselves)
as_owner() {
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  local p
  for _ in $(seq 50); do
    p=$(( 20000 + RANDOM % 40000 ))
    (echo >"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  die "no free port found"
}

url_of() { echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$1/port")/$2"; }

start() {
  local dir=$1 db=${2:-offpolicy} bin port try
  [[ "$db" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "database name '$db' must be a plain identifier"
  install_postgres
  bin=$(find_bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    chown -R postgres: "$dir"
  fi
  if [[ ! -f "$dir/data/PG_VERSION" ]]; then
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  if ! as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    for try in 1 2 3; do  # another process may take the port between the probe and the bind
      port=${PG_PORT:-$(free_port)}
      if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
           -o "-p $port -k $dir -c listen_addresses=127.0.0.1 ${PG_OPTIONS:-}" start >&2; then
        as_owner bash -c "echo $port >'$dir/port'"
        break
      fi
      [[ $try == 3 || -n "${PG_PORT:-}" ]] && { tail -20 "$dir/server.log" >&2 || true; die "the server did not start"; }
    done
  fi
  port=$(cat "$dir/port")
  if ! as_owner "$bin/createdb" -h "$dir" -p "$port" -U postgres "$db" 2>"$dir/createdb.err"; then
    grep -q "already exists" "$dir/createdb.err" || { cat "$dir/createdb.err" >&2; die "createdb $db failed"; }
  fi
  url_of "$dir" "$db"
}

stop() {
  local dir=$1 bin
  bin=$(find_bindir) || return 0
  [[ -f "$dir/data/PG_VERSION" ]] || return 0
  if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2
  fi
}

case "${1:-}" in
  install) install_postgres; echo "$(find_bindir)" ;;
  start) [[ $# -ge 2 ]] || die "usage: $0 start DIR [DB]"; start "$2" "${3:-}" ;;
  stop) [[ $# -ge 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | start DIR [DB] | stop DIR" 2 ;;
esac
