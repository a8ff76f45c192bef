#!/usr/bin/env bash
# Runs the benchmarks, one JSON line each. Those needing PostgreSQL run under scripts/with-test-services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BULKHEAD_TEST_PG_PORT=55452 BULKHEAD_TEST_REDIS_PORT=6419 scripts/with-test-services.sh .venv/bin/python bench/bench_desired_plan_db.py
