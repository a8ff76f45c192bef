#!/usr/bin/env bash
# Runs a command with a private Redis and a temporary PostgreSQL cluster on loopback, then removes both.
# Usage: scripts/with-test-services.sh CMD [ARGS...]   (exports DATABASE_URL and REDIS_URL to CMD)
set -euo pipefail
redis_port=${BULKHEAD_TEST_REDIS_PORT:-6399}
pg_port=${BULKHEAD_TEST_PG_PORT:-55432}
work=$(mktemp -d /tmp/bulkhead-test-services.XXXXXX)
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

cleanup() {
  if [[ -f "$work/pg/postmaster.pid" ]]; then
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [[ -f "$work/redis.pid" ]]; then
    kill "$(cat "$work/redis.pid")" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# A leftover server from an interrupted run would hold the ports: stop it.
redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
for stale in /tmp/bulkhead-test-services.*/pg; do
  # Line 4 of postmaster.pid is the port: only a cluster on our port is in our way.
  if [[ -f "$stale/postmaster.pid" && "$(sed -n 4p "$stale/postmaster.pid")" == "$pg_port" ]]; then
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$stale" -m immediate -w stop >/dev/null 2>&1 || true
  fi
done

redis-server --port "$redis_port" --bind 127.0.0.1 --daemonize yes --pidfile "$work/redis.pid" \
  --dir "$work" --save '' --appendonly no --maxmemory-policy noeviction --logfile "$work/redis.log"

mkdir -p "$work/pg"
chown postgres:postgres "$work" "$work/pg"
runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg" -A trust -U postgres --no-sync -E UTF8 >/dev/null
# Durability is pointless for a throw-away test cluster; speed is not.
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
  -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null

for _ in $(seq 50); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.1
done

export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/bulkhead"
export REDIS_URL="redis://127.0.0.1:$redis_port/0"
"$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres bulkhead
"$@"
