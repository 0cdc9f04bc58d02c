"""Per-run logs in the backup directory: BACKUP_DIR/logs/<command>-<time>-<pid>.log.

So a failed night can be understood the next morning: each backup and prune run leaves a concise
log (INFO and above: plan, what was done, warnings, the error) beside the chain. Mode 0600 in a
0700 directory (it names guest disks and paths), never written through a symlink (the directory
is opened with O_NOFOLLOW and must be owned by root or us and not writable by other users, and
the file is created with O_EXCL|O_NOFOLLOW relative to it), and rotated: only the newest KEEP
logs of each command stay.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from virtbackup import env

LOG_DIR = "logs"
KEEP = 30
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)
_root = logging.getLogger("virtbackup")


def _open_dir(backup_dir: Path, warn: Callable[[str], None]) -> Optional[int]:
    """An fd of BACKUP_DIR/logs (created 0700), or None when it is not a real directory."""
    path = backup_dir / LOG_DIR
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        warn(f"no run log: cannot create {path}: {e.strerror}")
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and os.path.islink(path)):
            why = "it is a symlink; not followed"
        elif e.errno == errno.ENOTDIR:
            why = "it is not a directory"
        else:
            why = e.strerror or str(e)
        warn(f"no run log: {path} is not usable ({why})")
        return None
    problem = env.unsafe_dir(os.fstat(fd))
    if problem:         # another user could rename and swap what we rotate and write there
        os.close(fd)
        warn(f"no run log: {path} is not usable ({problem})")
        return None
    return fd


def _rotate(dir_fd: int, command: str) -> None:
    """Keep the newest KEEP logs of `command` (names sort by time); regular files only."""
    mine = sorted(n for n in os.listdir(dir_fd) if n.startswith(f"{command}-") and n.endswith(".log"))
    for name in mine[:-KEEP] if len(mine) > KEEP else []:
        try:
            if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


@contextmanager
def run_log(backup_dir: Path, command: str,
            warn: Optional[Callable[[str], None]] = None) -> Iterator[Optional[Path]]:
    """Attach a file log for one run of `command` in BACKUP_DIR; an error ending the run is
    logged before it propagates. A log that cannot be written never fails the run, but is
    never silent either: `warn` gets one line saying why (e.g. logs/ is a symlink)."""
    def problem(msg: str) -> None:
        log.warning("%s", msg)
        if warn is not None:
            warn(msg)

    dir_fd = _open_dir(backup_dir, problem)
    handler: Optional[logging.Handler] = None
    path: Optional[Path] = None
    if dir_fd is not None:
        try:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            name = f"{command}-{stamp}-{os.getpid()}.log"
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            stream = os.fdopen(fd, "a", encoding="utf-8")
            handler = logging.StreamHandler(stream)
            handler.setLevel(logging.INFO)
            # only this run's records: runs of other domains may go on in other threads
            me = threading.get_ident()
            handler.addFilter(lambda record: record.thread == me)
            handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%dT%H:%M:%S"))
            path = backup_dir / LOG_DIR / name
            _rotate(dir_fd, command)
        except OSError as e:
            problem(f"no run log in {backup_dir / LOG_DIR}: {e.strerror}")
        finally:
            os.close(dir_fd)
    old_level = _root.level
    if handler is not None:
        _root.addHandler(handler)
        if _root.getEffectiveLevel() > logging.INFO:
            _root.setLevel(logging.INFO)
    try:
        yield path
    except BaseException as e:
        _root.error("%s failed: %s: %s", command, type(e).__name__, e)
        raise
    finally:
        if handler is not None:
            _root.removeHandler(handler)
            _root.setLevel(old_level)
            handler.close()
