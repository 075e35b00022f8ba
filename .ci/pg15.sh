#!/usr/bin/env bash
# Runs the given test command against a throwaway Debian PostgreSQL 15 server.
set -euo pipefail
PG15=/usr/lib/postgresql/15/bin
PORT=${PG15_PORT:-54315}
dir=$(mktemp -d /tmp/crmsync-pg15-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$dir"
stop() { as_pg "$PG15/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap stop EXIT
# The locale docs/operations.md asks for: Unicode case, code point order, whatever this
# machine's LANG.
as_pg "$PG15/initdb" -D "$dir/data" -A trust -U postgres --encoding=UTF8 --locale=C.UTF-8 >/dev/null
as_pg "$PG15/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
  -o "-p $PORT -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
echo "PostgreSQL 15 on 127.0.0.1:$PORT: $(as_pg "$PG15/postgres" --version)"
CRMSYNC_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$PORT/postgres" "$@"
