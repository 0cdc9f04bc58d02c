"""The choices a user makes, each named once: for the CLI, job files, the API and the engine.

No imports: the CLI checks its options against these before it loads anything else.
"""

from __future__ import annotations

from typing import Literal, Tuple

RequestedLevel = Literal["auto", "full", "inc", "diff"]
REQUESTED_LEVELS: Tuple[str, ...] = ("auto", "full", "inc", "diff")

# auto: freeze through the guest agent when it answers, else a crash-consistent point (said);
# require: refuse without a frozen guest; off: never freeze.
QuiesceMode = Literal["auto", "require", "off"]
QUIESCE_MODES: Tuple[str, ...] = ("auto", "require", "off")

# How a running domain's disks are copied: push (libvirt writes the targets) or pull (libvirt
# exports the disks over NBD and virtbackup copies them); auto (the default) pulls, and pushes
# only where pull cannot run (backup.backup says when). A shut-off domain always goes offline.
BackupMode = Literal["auto", "push", "pull"]
BACKUP_MODES: Tuple[str, ...] = ("auto", "push", "pull")

# How a point's images store the guest's data: qcow2 compressed clusters (zstd or zlib, inside
# plain qcow2 that any QEMU reads) or uncompressed ("none"). A chain keeps one setting.
Compression = Literal["zstd", "zlib", "none"]
COMPRESSIONS: Tuple[str, ...] = ("zstd", "zlib", "none")
# What a new, unencrypted backup directory gets without --compress, chosen from the figures of
# scripts/benchmark.py --only compress (issue 24's rule: compress by default if zstd costs at
# most 1.3x the time). On a Debian userland, idle, 2 cores: a zstd full took 3.2x the
# uncompressed full's time (1.31 s vs 0.41 s for 220 MiB; QEMU's own `convert -c` takes as long)
# and an incremental 1.65x, for 45 % and 39 % of the bytes. So uncompressed unless asked.
DEFAULT_COMPRESSION = "none"


def has_control_chars(text: str) -> bool:
    """NUL, newline, escape, the other C0 controls or DEL: never in a path given on to a child
    process or printed in a one-line message (a job file's TOML escapes can hold any of them)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
