"""The environment virtbackup reads, in one place: the programs it runs and where its run-time files go.

Tests and unusual hosts override the QEMU programs (a wrapper, another build) and the run
directory (a private one per test session); docs/reference.md lists every variable. Read at
call time, not at import, so a caller that sets one before the operation is heard.
"""

from __future__ import annotations

import os
from pathlib import Path

# program: (environment variable, default)
PROGRAMS = {
    "qemu-img": ("VIRTBACKUP_QEMU_IMG", "qemu-img"),
    "qemu-nbd": ("VIRTBACKUP_QEMU_NBD", "qemu-nbd"),
    "qemu-system": ("VIRTBACKUP_QEMU_SYSTEM", "qemu-system-x86_64"),
}


def program(name: str) -> str:
    """The command to run for one of PROGRAMS (its override, else the name found on PATH)."""
    var, default = PROGRAMS[name]
    return os.environ.get(var) or default


def run_dir() -> Path:
    """Locks, freeze markers and pull-mode sockets: $VIRTBACKUP_RUN_DIR, else /run/virtbackup."""
    return Path(os.environ.get("VIRTBACKUP_RUN_DIR") or "/run/virtbackup")
