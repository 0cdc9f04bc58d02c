"""Progress bars on a terminal (rich), for backup, restore, verify and run.

Only when stdout is a TTY, not with --json and not with --no-progress: pipes, files and
management stacks see exactly the output they saw before. rich is imported here only, and
only when bars are shown (CLI start-up time). Backups are fed by libvirt's job statistics
(`virDomainGetJobStats`, polled on a connection of our own, as `virsh domjobinfo` does);
restores by qemu-img's own progress and verify by images checked (see observe.py).
A display problem never fails the operation: the bars just stop.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

POLL_SECONDS = 0.5


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
    """unit: bytes (libvirt job data), count (images verified) or percent (qemu-img)."""
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


def job_data(stats: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """(processed, total) bytes of a running job from virDomainGetJobStats, or None."""
    for done_key, total_key in (("disk_processed", "disk_total"), ("data_processed", "data_total")):
        total = stats.get(total_key)
        if total:
            return int(stats.get(done_key) or 0), int(total)
    return None


class JobPoller:
    """Polls libvirt's statistics of the jobs of some domains on its own connection (a thread)."""

    def __init__(self, uri: Optional[str], bars: Any):
        self.uri = uri
        self.bars = bars
        self.tracked: Dict[str, Tuple[int, str]] = {}      # uuid or name -> (task id, label)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def track(self, key: str, task: int) -> None:
        with self._lock:
            self.tracked[key] = (task, key)

    def untrack(self, key: str) -> None:
        with self._lock:
            self.tracked.pop(key, None)

    def start(self) -> "JobPoller":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        try:
            import libvirt

            from virtbackup.virt import host
            conn = host.connect(self.uri)
        except Exception:  # noqa: BLE001 -- no bars is all a display problem may cost
            return
        try:
            while not self._stop.wait(POLL_SECONDS):
                with self._lock:
                    items = list(self.tracked.items())
                for key, (task, _label) in items:
                    try:
                        dom = host.lookup_domain(conn, key)
                        if not dom.isActive():
                            self.bars.update(task, state="shut off: offline backup (private QEMU)")
                            continue
                        data = job_data(dom.jobStats())
                    except Exception:  # noqa: BLE001 -- e.g. the domain was undefined meanwhile
                        continue
                    if data is not None:
                        self.bars.update(task, completed=data[0], total=data[1], state="")
        finally:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass


@contextmanager
def backup(uri: Optional[str], domain: str, on: bool) -> Iterator[None]:
    """A bar for one domain's backup while inside."""
    if not on:
        yield
        return
    bars = _bars()
    poller = JobPoller(uri, bars)
    with bars:
        task = bars.add_task(f"backup {domain}", total=None, state="")
        poller.track(domain, task)
        poller.start()
        try:
            yield
        finally:
            poller.close()


@contextmanager
def observed(title: str, on: bool) -> Iterator[None]:
    """One bar per thing the core reports on (restore: each disk's convert; verify: images)."""
    if not on:
        yield
        return
    from virtbackup import observe
    bars = _bars("percent" if title == "restore" else "count")
    tasks: Dict[str, int] = {}

    def update(what: str, done: float, total: float) -> None:
        if what not in tasks:
            tasks[what] = bars.add_task(f"{title} {what}", total=total, state="")
        bars.update(tasks[what], completed=done, total=total)

    with bars, observe.observing(update):
        yield


class RunDisplay:
    """`run`: a row per domain (queued, backup with libvirt's job progress, prune, result)."""

    def __init__(self, uri: Optional[str]):
        self.bars = _bars()
        self.poller = JobPoller(uri, self.bars)
        self.tasks: Dict[str, int] = {}

    def __enter__(self) -> "RunDisplay":
        self.bars.start()
        self.poller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.poller.close()
        self.bars.stop()

    def watch(self, domain: str, phase: str, uuid: Optional[str]) -> None:
        task = self.tasks.get(domain)
        if task is None:
            task = self.tasks[domain] = self.bars.add_task(domain, total=None, state=phase)
        if phase == "backup" and uuid:
            self.bars.update(task, state="backup")
            self.poller.track(uuid, task)
            return
        if uuid:
            self.poller.untrack(uuid)
        if phase in ("queued", "prune"):
            self.bars.update(task, state=phase)
        else:                                   # ok, failed, skipped: the row is finished
            total = next((t.total for t in self.bars.tasks if t.id == task), None)
            if total:
                self.bars.update(task, completed=total, state=phase)
            else:
                self.bars.update(task, state=phase)
