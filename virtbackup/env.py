"""The environment virtbackup reads, in one place: the programs it runs and where its run-time files go
(the run directory, private temp dirs that a later run cleans up when a killed one left them).

Tests and unusual hosts override the QEMU programs (a wrapper, another build) and the run
directory (a private one per test session); docs/reference.md lists every variable. Read at
call time, not at import, so a caller that sets one before the operation is heard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

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


def boot_dirs() -> List[str]:
    """Where a restored domain's direct-boot kernel, initrd and device tree may be: /boot,
    /var/lib/libvirt/boot and the directories in $VIRTBACKUP_BOOT_DIRS (colon-separated)."""
    extra = [d for d in os.environ.get("VIRTBACKUP_BOOT_DIRS", "").split(":") if d.startswith("/")]
    return ["/boot", "/var/lib/libvirt/boot", *extra]


# --- private temp dirs a later run can clean up -------------------------------------------------
def process_start(pid: int) -> Optional[str]:
    """A process's start time (clock ticks since boot): with the pid, it names one process."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]


def owned_tempdir(prefix: str, base: Optional[str] = None) -> Path:
    """A fresh 0700 directory `<prefix><pid>-<start>-<random>` in `base` (default: $TMPDIR or /tmp).

    The name says which process made it, so a later run can remove what a killed one left
    (`remove_dead_tempdirs`) and never what a running one still uses."""
    import tempfile  # here, not at import: every command loads this module

    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{pid}-{process_start(pid)}-", dir=base))


def remove_dead_tempdirs(prefix: str, base: Optional[str] = None) -> List[Path]:
    """Remove the `owned_tempdir`s of `prefix` whose process is gone; the ones removed.

    Only real directories of this user whose name parses; a symlink, another user's directory or
    a name of another shape is left alone."""
    import shutil
    import tempfile

    where = Path(base or tempfile.gettempdir())
    removed: List[Path] = []
    try:
        entries = list(os.scandir(where))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        parts = entry.name[len(prefix):].split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if process_start(int(parts[0])) == parts[1]:
            continue                    # its process still runs
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
