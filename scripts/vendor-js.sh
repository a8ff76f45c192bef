#!/usr/bin/env bash
# Install the UI's browser libraries from frontend/package-lock.json and copy their dist files into
# frontend/static/vendor/ (generated, not tracked). Idempotent: quick when nothing changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
frontend="$root/frontend"
vendor="$frontend/static/vendor"
stamp="$frontend/node_modules/.bulkhead-lock.sha256"

lock_hash="$(sha256sum "$frontend/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$lock_hash" ]]; then
    command -v npm >/dev/null || { echo "vendor-js: npm is required (apt-get install npm)" >&2; exit 1; }
    (cd "$frontend" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_hash" > "$stamp"
fi

mkdir -p "$vendor"
# source (relative to node_modules) -> name under static/vendor. Source maps too: the scripts name them,
# and the production static storage (hashed names) refuses a reference to a missing file.
files=(
    "htmx.org/dist/htmx.min.js:htmx.min.js"
    "@xterm/xterm/lib/xterm.js:xterm.js"
    "@xterm/xterm/lib/xterm.js.map:xterm.js.map"
    "@xterm/xterm/css/xterm.css:xterm.css"
    "@xterm/addon-fit/lib/addon-fit.js:addon-fit.js"
    "@xterm/addon-fit/lib/addon-fit.js.map:addon-fit.js.map"
    "uplot/dist/uPlot.iife.min.js:uPlot.iife.min.js"
    "uplot/dist/uPlot.min.css:uPlot.min.css"
)
for entry in "${files[@]}"; do
    src="$frontend/node_modules/${entry%%:*}"
    dst="$vendor/${entry##*:}"
    if [[ ! -f "$src" ]]; then
        echo "vendor-js: missing $src (delete frontend/node_modules and rerun)" >&2
        exit 1
    fi
    cmp -s "$src" "$dst" || cp "$src" "$dst"
done
