"""One exception hierarchy. Each class carries the process exit code the CLI uses.

Exit codes (documented in docs/reference.md and the man page):
  0  success
  1  the operation failed (backup job failed or was interrupted, verify found damage, lock held)
  2  bad usage or bad input (unknown domain/point/disk, missing or corrupt BACKUP_DIR, wrong domain)
"""

from __future__ import annotations

EXIT_OK = 0      # documented beside the others (docs/reference.md)
EXIT_FAILED = 1
EXIT_USAGE = 2


class VirtBackupError(Exception):
    """Base of every error virtbackup reports; `str()` is the one-line message."""

    exit_code = EXIT_FAILED
    kind = "error"

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line

    @property
    def message(self) -> str:
        return str(self)


# --- exit 2: bad usage / bad input -------------------------------------------------------------
class UsageError(VirtBackupError):
    exit_code = EXIT_USAGE
    kind = "usage"


class DomainNotFound(UsageError):
    kind = "domain-not-found"


class BackupDirError(UsageError):
    """BACKUP_DIR missing, not a directory, unwritable, or holding another domain's backups."""

    kind = "backup-dir"


class ChainCorrupt(UsageError):
    """The chain metadata cannot be read or does not make sense; nothing is changed."""

    kind = "chain-corrupt"


class PointNotFound(UsageError):
    kind = "point-not-found"


class DiskNotFound(UsageError):
    kind = "disk-not-found"


class LevelNotPossible(UsageError):
    """`--level inc/diff` asked for but the chain cannot be continued safely."""

    kind = "level-not-possible"


class OutputExists(UsageError):
    kind = "output-exists"


class NoSpace(UsageError):
    """What would be written does not fit where it would go: refused before writing (nothing was
    changed; another destination is the fix, as for `OutputExists`)."""

    kind = "no-space"


class UnsafePath(UsageError):
    """A symlink where virtbackup expects its own file or directory: refused, never followed."""

    kind = "unsafe-path"


# --- exit 1: the operation failed ---------------------------------------------------------------
class OperationFailed(VirtBackupError):
    kind = "failed"


class BackupFailed(OperationFailed):
    kind = "backup-failed"


class Interrupted(OperationFailed):
    kind = "interrupted"


class LockBusy(OperationFailed):
    kind = "locked"


class RestoreFailed(OperationFailed):
    kind = "restore-failed"


class DamageFound(OperationFailed):
    """An image does not match its recorded hash, size or backing link: refused, never read on."""

    kind = "damaged"


class HostError(OperationFailed):
    """libvirt or a QEMU tool failed in a way the user cannot fix by changing input."""

    kind = "host"


# --- files (single-file restore) ------------------------------------------------------------------
class GuestPathError(UsageError):
    """A FS:PATH that is malformed, escapes with `..`, or names nothing in the point."""

    kind = "guest-path"


class FilesystemNotFound(UsageError):
    kind = "filesystem-not-found"


class FilesystemUnreadable(UsageError):
    """Encrypted, swap, or a type the appliance cannot mount: nothing to read there."""

    kind = "filesystem-unreadable"


class PointDamaged(OperationFailed):
    """An image of the point's chain is missing or differs from what was recorded at backup time."""

    kind = "point-damaged"
