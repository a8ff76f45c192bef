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
# (Its password is in its own config file beside it.)
for stale in /tmp/bulkhead-test-services.*/redis.conf; do
  if [[ -f "$stale" ]] && grep -qx "port $redis_port" "$stale"; then
    REDISCLI_AUTH=$(sed -n 's/^requirepass //p' "$stale") redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  fi
done
redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
for stale in /tmp/bulkhead-test-services.*/pg; do
  # Line 4 of postmaster.pid is the port: only a cluster on our port is in our way.
  if [[ -f "$stale/postmaster.pid" && "$(sed -n 4p "$stale/postmaster.pid")" == "$pg_port" ]]; then
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$stale" -m immediate -w stop >/dev/null 2>&1 || true
  fi
done

# A password as in every profile (make run generates one, compose requires one); kept off the command line.
redis_password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
install -m 0600 /dev/null "$work/redis.conf"
printf 'port %s\nbind 127.0.0.1\ndaemonize yes\npidfile %s\ndir %s\nsave ""\nappendonly no\nmaxmemory-policy noeviction\nlogfile %s\nrequirepass %s\n' \
  "$redis_port" "$work/redis.pid" "$work" "$work/redis.log" "$redis_password" > "$work/redis.conf"
redis-server "$work/redis.conf"

mkdir -p "$work/pg"
chown postgres:postgres "$work" "$work/pg"
runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg" -A trust -U postgres --no-sync -E UTF8 >/dev/null
# Durability is pointless for a throw-away test cluster; speed is not.
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
  -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null

for _ in $(seq 50); do
  REDISCLI_AUTH=$redis_password redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done

export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/bulkhead"
export REDIS_URL="redis://:$redis_password@127.0.0.1:$redis_port/0"
"$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres bulkhead
"$@"
