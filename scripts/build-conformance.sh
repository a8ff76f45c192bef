#!/usr/bin/env bash
# The OCI distribution-spec conformance suite (Go), built from the versions pinned in
# tests/conformance/go.{mod,sum} into var/conformance/conformance.test. Rebuilt only when they change.
set -euo pipefail
cd "$(dirname "$0")/.."
out=var/conformance
stamp="$out/inputs.sha256"
inputs=$(cat tests/conformance/go.mod tests/conformance/go.sum | sha256sum | cut -d' ' -f1)
if [[ -x "$out/conformance.test" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi
# The machine's Go lives in /usr/local/go where it is not on PATH.
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build-conformance: the Go toolchain is required (go 1.26)" >&2; exit 1; }
mkdir -p "$out"
(cd tests/conformance && GOFLAGS=-mod=readonly go test -c -o "../../$out/conformance.test" \
    github.com/opencontainers/distribution-spec/conformance)
echo "$inputs" > "$stamp"
