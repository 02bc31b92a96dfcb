#!/usr/bin/env bash
# A throwaway PostgreSQL server for the mixture-search tests (issue 22): initdb into a temporary directory, listen on
# 127.0.0.1 at a free port (and a unix socket in that directory), trust authentication, one database.
#
#   eval "$(scripts/postgres.sh start)"     # prints: export HFWEIGHT_TEST_POSTGRES_URL=postgresql://...
#   pytest tests/test_search.py
#   scripts/postgres.sh stop                # stops the server and removes the directory
#
# State (the directory and the URL) is kept in $HFWEIGHT_POSTGRES_STATE (default /tmp/hfweight-postgres.state), so
# `stop` finds the server `start` made. The binaries come from $PG_BIN (default: the newest /usr/lib/postgresql/*/bin,
# else PATH). PostgreSQL refuses to run as root: as root the server runs as the `postgres` user (runuser), which must
# exist (the Debian/Ubuntu package creates it).
set -euo pipefail

STATE="${HFWEIGHT_POSTGRES_STATE:-/tmp/hfweight-postgres.state}"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)}"
pg() { # run a PostgreSQL binary, as `postgres` when we are root
  local tool="$1"; shift
  local exe="${PG_BIN:+$PG_BIN/}$tool"
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$exe" "$@"; else "$exe" "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
  if [ -f "$STATE" ]; then
    echo "postgres.sh: a server is already recorded in $STATE; run '$0 stop' first." >&2
    exit 1
  fi
  local dir port url
  dir="$(mktemp -d /tmp/hfweight-pg.XXXXXX)"
  chmod 755 "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
  port="$(free_port)"
  pg initdb -D "$dir/data" -U hfweight --auth=trust --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; exit 1; }
  pg pg_ctl -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50" start >/dev/null \
    || { cat "$dir/server.log" >&2; rm -rf "$dir"; exit 1; }
  pg createdb -h 127.0.0.1 -p "$port" -U hfweight hfweight
  url="postgresql://hfweight@127.0.0.1:$port/hfweight"
  printf 'DIR=%s\nURL=%s\n' "$dir" "$url" >"$STATE"
  echo "$url" >"$dir/url"
  echo "export HFWEIGHT_TEST_POSTGRES_URL=$url"
}

stop() {
  if [ ! -f "$STATE" ]; then
    echo "postgres.sh: no server recorded in $STATE." >&2
    return 0
  fi
  local dir
  dir="$(sed -n 's/^DIR=//p' "$STATE")"
  if [ -n "$dir" ] && [ -d "$dir/data" ]; then
    pg pg_ctl -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
  case "$dir" in /tmp/hfweight-pg.*) rm -rf "$dir" ;; esac
  rm -f "$STATE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) sed -n 's/^URL=//p' "$STATE" ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
