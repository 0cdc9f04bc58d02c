#!/bin/bash
# Set up this host (idempotent), then run the whole test suite (unit + integration on the real
# libvirtd). Extra arguments go to pytest. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-host.sh" || exit 1
cd "$ROOT"
.venv/bin/python -m pytest -q --timeout=300 "$@"
rc=$?
if [ "$rc" = 5 ]; then
    echo "test.sh: no tests were collected" >&2
    exit 1
fi
exit "$rc"
