#!/usr/bin/env bash
# Runs every benchmark, one JSON line each (`make bench` runs this under scripts/with-test-services.sh,
# which exports DATABASE_URL and REDIS_URL for a throw-away PostgreSQL and Redis). Root: the container,
# micro-VM, layer and network benchmarks use runc, libvirt, loop mounts and network namespaces.
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
failed=()
for bench in \
  bench/bench_layers.py \
  bench/bench_backups.py \
  bench/bench_volumes_api.py \
  bench/bench_container_start.py \
  bench/api_workload_start.py \
  bench/bench_app_second.py \
  bench/bench_microvm.py \
  bench/bench_network.py \
  bench/api_list.py \
  bench/bench_desired_plan.py \
  bench/bench_desired_plan_db.py \
  bench/bench_desired_reconcile.py \
  bench/bench_metrics.py; do
  echo "== $bench" >&2
  "$py" "$bench" || failed+=("$bench")
done
# The create path of a joined host (host API over HTTP, a layer store of its own): warm, and first starts
# without the layers beside skopeo copy from the portal's /v2/.
echo "== bench/api_workload_start.py (BENCH_HOST_API=1)" >&2
BENCH_HOST_API=1 "$py" bench/api_workload_start.py || failed+=("api_workload_start.py (host API)")
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
