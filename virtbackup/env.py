"""The environment virtbackup reads, in one place: the programs it runs and where its run-time files go
(the run directory, private temp dirs that a later run cleans up when a killed one left them).

Tests and unusual hosts override the QEMU programs (a wrapper, another build) and the run
directory (a private one per test session); docs/reference.md lists every variable. Read at
call time, not at import, so a caller that sets one before the operation is heard.
"""

from __future__ import annotations

import os
import stat
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


# --- directories virtbackup creates its own files in ------------------------------------------
def unsafe_dir(st: os.stat_result) -> Optional[str]:
    """Why a directory is no place for virtbackup to create or replace files in (None: it is).

    It must be owned by root or by this user, and no other user may write to it unless it is
    sticky (/tmp, /dev/shm: others can't rename or remove what we created there). Otherwise
    another user could swap names under us between two steps (a symlink where our file was, a
    directory renamed away), and we would write, chmod or remove through them as root."""
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {st.st_uid}, not by root or this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (f"other users can write to it (mode {stat.S_IMODE(st.st_mode):04o}) and it is not sticky")
    return None


def open_dir(path: Path, follow: bool = True) -> int:
    """An O_DIRECTORY fd of `path` (the last component not followed unless `follow`); the caller
    checks it with `unsafe_dir(os.fstat(fd))` and then works relative to the fd, so the directory
    checked is the one written into."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    return os.open(path, flags)


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
