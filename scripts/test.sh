#!/bin/bash
# Set up this host (idempotent), run the static checks (ruff, mypy), then the whole test suite
# (unit + integration on the real libvirtd, including the installed-wheel test). Extra arguments
# go to pytest. Any failing step fails the command; pytest's "no tests collected" (exit 5) too.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-host.sh" || exit 1
cd "$ROOT"
static=0
echo "test.sh: ruff" >&2
.venv/bin/ruff check virtbackup tests scripts || static=1
echo "test.sh: mypy" >&2
.venv/bin/mypy || static=1
if [ "$static" != 0 ]; then
    echo "test.sh: static checks failed" >&2
    exit 1
fi
.venv/bin/python -m pytest -q --timeout=300 --durations=25 "$@"
rc=$?
if [ "$rc" = 5 ]; then
    echo "test.sh: no tests were collected" >&2
    exit 1
fi
exit "$rc"
