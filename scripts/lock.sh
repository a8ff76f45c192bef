#!/usr/bin/env bash
# Refreshes requirements.lock.txt from the ranges in pyproject.toml (runtime + dev) and requirements-build.in.
# Run it on purpose (`make lock`) when you change a dependency or want newer versions, then run
# `make test` and commit the lock with the change. Every set-up installs exactly the lock, with hashes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
uv_version=0.13.8
tools=${BULKHEAD_LOCK_TOOLS:-$root/var/lock-tools}
if [[ ! -x "$tools/bin/uv" ]] || [[ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$uv_version" ]]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q "uv==$uv_version"
fi
cd "$root"
"$tools/bin/uv" pip compile pyproject.toml requirements-build.in --extra dev \
  --generate-hashes --python-version 3.11 --no-header --upgrade -o requirements.lock.txt
echo "requirements.lock.txt refreshed; run make test before committing it"
