#!/bin/bash
# Set up this host (idempotent), then run the demo: a throwaway domain, full + inc + diff,
# every point restored and checked byte for byte, domain removed.
# --guest: the same with a real tiny Linux guest: quiesce, consistency, a restore drill (slower: TCG).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-host.sh"
if [ "${1:-}" = "--guest" ]; then
    exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo_guest.py"
fi
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py"
