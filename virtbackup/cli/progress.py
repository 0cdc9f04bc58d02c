"""Progress bars on a terminal (rich), for backup, restore, verify and run.

Only when stdout is a TTY, not with --json and not with --no-progress: pipes, files and
management stacks see exactly the output they saw before. rich is imported here only, and
only when bars are shown (CLI start-up time). The bars are fed by the operation's own progress
events (observe.ProgressEvent, the `progress` argument of the API): a backup's copy as its
engine follows the job, a restore's qemu-img progress, verify's images checked, and in `run`
each domain's backup (its child process sends them through a pipe, `backup --progress-fd`).
Nothing here talks to libvirt. A display problem never fails the operation: the bars just stop.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from virtbackup.observe import ProgressEvent

Callback = Callable[["ProgressEvent"], None]


def wanted(as_json: bool, no_progress: bool) -> bool:
    if as_json or no_progress or os.environ.get("TERM") == "dumb":
        return False
    try:
        if not sys.stdout.isatty():
            return False
        import rich.progress  # noqa: F401
    except (ImportError, ValueError, OSError):
        return False
    return True


def _bars(unit: str = "bytes") -> Any:
    """unit: bytes (copies) or count (images verified)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    amount: List[ProgressColumn] = []
    if unit == "bytes":
        amount.append(DownloadColumn())
    elif unit == "count":
        amount.append(MofNCompleteColumn())
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *amount,
                    TimeElapsedColumn(), TextColumn("{task.fields[state]}"),
                    console=Console(file=sys.stdout), transient=True)


class CopySum:
    """One bar for several disks: the sum of each disk's last copy event."""

    def __init__(self) -> None:
        self.disks: Dict[Optional[str], Tuple[int, int]] = {}
        self._lock = threading.Lock()

    def add(self, ev: "ProgressEvent") -> Tuple[int, int]:
        with self._lock:
            self.disks[ev.disk] = (ev.done, ev.total)
            return sum(d for d, _t in self.disks.values()), sum(t for _d, t in self.disks.values())


@contextmanager
def backup(domain: str, on: bool) -> Iterator[Optional[Callback]]:
    """A bar for one domain's backup while inside; yields the callback for api.backup's
    `progress` (None when no bars are shown)."""
    if not on:
        yield None
        return
    bars = _bars()
    with bars:
        task = bars.add_task(f"backup {domain}", total=None, state="")
        copied = CopySum()

        def update(ev: "ProgressEvent") -> None:
            if ev.phase == "copy":
                done, total = copied.add(ev)
                bars.update(task, completed=done, total=total, state="")
            else:
                bars.update(task, state=ev.phase)        # hash, commit

        yield update


@contextmanager
def observed(title: str, on: bool) -> Iterator[Optional[Callback]]:
    """A bar per thing the operation reports on (restore: each disk's copy, as its image
    `<disk>.qcow2`; verify: images checked, chains read); yields the `progress` callback."""
    if not on:
        yield None
        return
    bars = _bars("bytes" if title == "restore" else "count")
    tasks: Dict[Tuple[str, Optional[str]], int] = {}

    def update(ev: "ProgressEvent") -> None:
        key = (ev.phase, ev.disk)
        if key not in tasks:
            what = f"{ev.disk}.qcow2" if ev.disk is not None and ev.unit == "bytes" else ev.unit
            tasks[key] = bars.add_task(f"{title} {what}", total=ev.total, state="")
        bars.update(tasks[key], completed=ev.done, total=ev.total)

    with bars:
        yield update


@contextmanager
def to_fd(fd: Optional[int]) -> Iterator[Optional[Callback]]:
    """`backup --progress-fd FD` (how `run` follows its child backups): each event as one JSON
    line on FD; yields the callback (None without FD). A reader that went away stops the lines."""
    if fd is None:
        yield None
        return
    os.set_inheritable(fd, False)          # no program this backup starts (qemu-nbd) holds it open
    out = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    broken = False

    def write(ev: "ProgressEvent") -> None:
        nonlocal broken
        if broken:
            return
        try:
            out.write(json.dumps(ev.to_json()) + "\n")
        except OSError:
            broken = True

    try:
        yield write
    finally:
        try:
            out.close()
        except OSError:
            pass


class RunDisplay:
    """`run`: a row per domain (queued, backup with its copy progress, prune, result)."""

    def __init__(self) -> None:
        self.bars = _bars()
        self.tasks: Dict[str, int] = {}
        self.copied: Dict[str, CopySum] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "RunDisplay":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def _task(self, domain: str, state: str) -> int:
        with self._lock:
            task = self.tasks.get(domain)
            if task is None:
                task = self.tasks[domain] = self.bars.add_task(domain, total=None, state=state)
            return task

    def watch(self, domain: str, phase: str, uuid: Optional[str]) -> None:
        """The run's Watcher: what each domain is doing."""
        task = self._task(domain, phase)
        if phase in ("queued", "backup", "prune"):
            self.bars.update(task, state=phase)
        else:                                   # ok, failed, skipped: the row is finished
            total = next((t.total for t in self.bars.tasks if t.id == task), None)
            if total:
                self.bars.update(task, completed=total, state=phase)
            else:
                self.bars.update(task, state=phase)

    def progress(self, ev: "ProgressEvent") -> None:
        """The run's progress callback: a domain's backup events fill its row."""
        if ev.domain is None or ev.phase != "copy":
            return
        task = self._task(ev.domain, "backup")
        with self._lock:
            copied = self.copied.setdefault(ev.domain, CopySum())
        done, total = copied.add(ev)
        self.bars.update(task, completed=done, total=total)
