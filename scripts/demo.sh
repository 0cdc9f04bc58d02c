#!/bin/bash
# Set up this host (idempotent), then run the demo: a throwaway domain, full + inc + diff,
# every point restored and checked byte for byte, domain removed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-host.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py"
