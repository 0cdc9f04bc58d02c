"""Progress events and cancellation of one operation, for whoever runs it (the CLI, a host agent).

A management stack runs operations in its own worker threads, several at a time, so neither
may be process-global: each API call opens a `scope` (a `contextvars.ContextVar`) holding the
caller's progress callback and `Cancel` handle, and the core reports into whatever scope it
runs in. Threads an operation starts get a copy of its context (`submit`, `thread`:
ThreadPoolExecutor tasks don't inherit contextvars by themselves), so two operations in two
threads of one process never see each other's events or cancels.

Producers (`emit`, `finish`) describe one disk's phase in bytes: `total` is constant (the
normalisation below enforces it), `done` never goes down, and the last event of a phase that
ended well has `done == total`; events are thinned to a few a second per disk. The older
`report(what, done, total)` (qemu-img's own progress, images verified) feeds the same events
and is also a cancellation point: it raises `Cancelled` once the operation was cancelled.

Signals are one source of cancellation: where an operation wakes its waits on SIGINT/SIGTERM
(`virt.host.signals_noted`), the signal calls `Cancel.cancel("SIGINT")`. Nothing here imports
libvirt or rich.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

if TYPE_CHECKING:      # concurrent.futures costs ~3 ms at start-up; `list` needs none of it
    from concurrent.futures import Executor, Future

log = logging.getLogger(__name__)
T = TypeVar("T")

# (what, done, total): e.g. ("vda.qcow2", 37.5, 100.0) or ("images", 3, 8) - the older interface
Observer = Callable[[str, float, float], None]
MIN_INTERVAL = 0.2          # seconds between two events of one disk's phase (the last one always goes)


@dataclass(frozen=True)
class ProgressEvent:
    """Where one part of an operation stands.

    `operation`: backup | restore | verify | prune | run | live-restore | drill.
    `phase`: copy (a disk's data), hash (sealing a backup image), commit (the metadata write),
    verify (images checked against their records), read (verify --deep: chains read).
    `disk`: the disk target ("vda"), or None for a phase of the whole operation.
    `done`/`total` in `unit`: bytes (copy: of the disk's virtual size, areas that need no copy
    count as soon as they are known to; hash: of the image file), images, chains or steps.
    `domain`: the domain of a backup (`run`: which domain's backup the event is from).
    """

    operation: str
    phase: str
    disk: Optional[str]
    done: int
    total: int
    unit: str = "bytes"
    domain: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"operation": self.operation, "phase": self.phase, "disk": self.disk, "done": self.done,
                "total": self.total, "unit": self.unit, "domain": self.domain}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ProgressEvent":
        return cls(str(data["operation"]), str(data["phase"]), data.get("disk"), int(data["done"]),
                   int(data["total"]), str(data.get("unit") or "bytes"), data.get("domain"))


Progress = Callable[[ProgressEvent], None]


class Cancelled(KeyboardInterrupt):
    """Raised at a cancellation point (`report`, `check`) of a cancelled operation.

    A KeyboardInterrupt, so every cleanup that already handles Ctrl-C (kill qemu-img, remove
    half-written images) handles a cancel alike; the API turns it into `errors.Interrupted`."""

    def __init__(self, operation: str, reason: str):
        super().__init__(f"{operation} {interruption(reason)}")
        self.operation = operation
        self.reason = reason


def interruption(reason: str) -> str:
    """How an operation stopped for `reason` says so: 'interrupted by SIGINT' for a signal (the
    wording the CLI has always used), 'cancelled' for `Cancel.cancel()`, else 'cancelled (reason)'."""
    if reason.startswith("SIG"):
        return f"interrupted by {reason}"
    return "cancelled" if reason == "cancelled" else f"cancelled ({reason})"


class Cancel:
    """A cancellation handle that works from any thread (and from a signal handler).

    `cancel(reason)` marks it (the first reason wins) and calls what the running operation
    registered with `on_cancel` (e.g. the backup runner's `interrupt`: the wait wakes, the job is
    aborted and the backup rolled back). Each registered function is called at most once, in the
    cancelling thread; registering after the cancel calls it at once. No locks: a signal handler
    may run in the middle of any of these methods in the main thread.
    """

    def __init__(self) -> None:
        self._reasons: List[str] = []
        self._callbacks: Dict[int, Callable[[str], None]] = {}
        self._ids = itertools.count()

    def cancel(self, reason: str = "cancelled") -> None:
        self._reasons.append(reason)
        for key in list(self._callbacks):
            self._fire(key)

    @property
    def cancelled(self) -> bool:
        return bool(self._reasons)

    @property
    def reason(self) -> Optional[str]:
        return self._reasons[0] if self._reasons else None

    def _fire(self, key: int) -> None:
        fn = self._callbacks.pop(key, None)      # dict.pop is atomic: once per registration
        reason = self.reason
        if fn is None or reason is None:
            return
        try:
            fn(reason)
        except Exception:  # noqa: BLE001 - a canceller never fails because of what it woke
            log.exception("cancel callback %r failed", fn)

    @contextmanager
    def on_cancel(self, fn: Callable[[str], None]) -> Iterator[None]:
        """While inside, a cancel calls `fn(reason)` (at once when it already happened)."""
        key = next(self._ids)
        self._callbacks[key] = fn
        try:
            if self._reasons:
                self._fire(key)
            yield
        finally:
            self._callbacks.pop(key, None)


@dataclass
class _Track:
    total: int
    done: int = 0
    at: float = 0.0
    final: bool = False


@dataclass
class _Scope:
    operation: str
    progress: Optional[Progress] = None
    cancel: Optional[Cancel] = None
    explicit_cancel: bool = False
    domain: Optional[str] = None
    observer: Optional[Observer] = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    tracks: Dict[Tuple[Optional[str], str, Optional[str]], _Track] = field(default_factory=dict)
    failed: bool = False        # the callback raised once: no more events (a display problem)


@dataclass(frozen=True)
class _Task:
    """A phase of one disk that `report()` calls inside it belong to (see `task`)."""

    phase: str
    disk: Optional[str]
    total: int
    unit: str


_scope: contextvars.ContextVar[Optional[_Scope]] = contextvars.ContextVar("virtbackup_scope", default=None)
_task: contextvars.ContextVar[Optional[_Task]] = contextvars.ContextVar("virtbackup_task", default=None)


# --- the scope (opened at the API boundary) ------------------------------------------------------
@contextmanager
def scope(operation: str, progress: Optional[Progress] = None, cancel: Optional[Cancel] = None,
          domain: Optional[str] = None) -> Iterator[_Scope]:
    """Run an operation with its own progress callback and cancel handle (in this context only).

    A scope opened inside another one keeps the outer callback and handle unless given new ones."""
    outer = _scope.get()
    if outer is not None:
        progress = progress or outer.progress
        if cancel is None and outer.cancel is not None:
            cancel = outer.cancel
        domain = domain or outer.domain
    s = _Scope(operation, progress, cancel, explicit_cancel=cancel is not None, domain=domain,
               observer=outer.observer if outer is not None else None)
    token = _scope.set(s)
    try:
        yield s
    finally:
        _scope.reset(token)


@contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Send this context's `report()` calls to `observer(what, done, total)` while inside."""
    outer = _scope.get()
    s = replace(outer, observer=observer, lock=threading.Lock(), tracks={}) if outer is not None \
        else _Scope("", observer=observer)
    token = _scope.set(s)
    try:
        yield
    finally:
        _scope.reset(token)


def cancel_handle() -> Cancel:
    """The running operation's cancel handle (made on first use when the caller gave none, so
    signals can still cancel through it)."""
    s = _scope.get()
    if s is None:
        return Cancel()
    if s.cancel is None:
        s.cancel = Cancel()
    return s.cancel


def check() -> None:
    """A cancellation point: raise `Cancelled` when the running operation was cancelled."""
    s = _scope.get()
    if s is not None and s.cancel is not None and s.cancel.reason is not None:
        raise Cancelled(s.operation or "operation", s.cancel.reason)


def cancelled() -> Optional[str]:
    """The reason the running operation was cancelled, or None."""
    s = _scope.get()
    return s.cancel.reason if s is not None and s.cancel is not None else None


# --- threads that carry the context -------------------------------------------------------------
def submit(pool: Executor, fn: Callable[..., T], *args: Any) -> "Future[T]":
    """`pool.submit(fn, *args)` running in a copy of this context (one copy per task: a context
    can't be entered by two threads at once)."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread (not started) that runs `target` in a copy of this context."""
    ctx = contextvars.copy_context()
    return threading.Thread(target=ctx.run, args=(target,), name=name, daemon=True)


# --- producing events ------------------------------------------------------------------------------
def active() -> bool:
    """Someone follows this operation (a progress callback, an observer or a cancel handle of the
    caller's): worth asking programs for their progress (which is also where a cancel is seen)."""
    s = _scope.get()
    return s is not None and (s.progress is not None or s.observer is not None or s.explicit_cancel)


def listening() -> bool:
    """A progress callback receives events: worth polling for them."""
    s = _scope.get()
    return s is not None and s.progress is not None and not s.failed


def emit(phase: str, disk: Optional[str], done: float, total: float, unit: str = "bytes",
         domain: Optional[str] = None) -> None:
    """Report where `disk`'s `phase` stands. The first total of a (domain, phase, disk) stays its
    total (a later one rescales `done`), `done` is clamped to [last done, total], and events come
    at most every MIN_INTERVAL s, except the first and the one reaching the total. The callback
    is called in the producer's thread, one call at a time per operation; if it raises, the
    operation goes on without events."""
    s = _scope.get()
    if s is None or s.progress is None or s.failed:
        return
    dom = domain or s.domain
    key = (dom, phase, disk)
    with s.lock:
        tr = s.tracks.get(key)
        if tr is None:
            tr = s.tracks[key] = _Track(max(0, int(total)), at=-1.0)
        elif total > 0 and int(total) != tr.total:
            done = done * tr.total / total
        if tr.final:
            return
        value = max(tr.done, min(int(done), tr.total))
        final = value >= tr.total
        now = time.monotonic()
        if tr.at >= 0 and not final and (value == tr.done or now - tr.at < MIN_INTERVAL):
            return
        tr.done, tr.at, tr.final = value, now, final
        event = ProgressEvent(s.operation, phase, disk, value, tr.total, unit, dom)
        try:
            s.progress(event)
        except Exception:  # noqa: BLE001 - a display problem never fails the operation
            log.debug("progress callback failed; no more progress events for this %s", s.operation,
                      exc_info=True)
            s.failed = True


def finish(phase: str, disk: Optional[str], total: Optional[float] = None, unit: str = "bytes",
           domain: Optional[str] = None) -> None:
    """`disk`'s `phase` ended well: its last event, done == total (`total` when nothing was
    reported for it yet)."""
    s = _scope.get()
    if s is None or s.progress is None:
        return
    with s.lock:
        tr = s.tracks.get((domain or s.domain, phase, disk))
        known = tr.total if tr is not None else None
    if known is None and total is None:
        return
    value = known if known is not None else total
    assert value is not None
    emit(phase, disk, value, value, unit, domain)


def forward(event: ProgressEvent) -> None:
    """Deliver an event made elsewhere (a child process's backup, for `run`) in this scope."""
    emit(event.phase, event.disk, event.done, event.total, event.unit, event.domain)


@contextmanager
def task(phase: str, disk: Optional[str], total: int, unit: str = "bytes") -> Iterator[None]:
    """`report()` calls inside belong to `disk`'s `phase` (their done/total fraction of `total`);
    leaving without an error finishes it."""
    token = _task.set(_Task(phase, disk, int(total), unit))
    try:
        yield
    finally:
        _task.reset(token)
    finish(phase, disk, total, unit)


# what report() callers say, outside a task -> (phase, unit)
_REPORTED = {"images": ("verify", "images"), "chains read": ("read", "chains")}


def report(what: str, done: float, total: float) -> None:
    """The older interface: `what` has got to done/total (a qemu-img convert in percent, images
    verified). Feeds the observer and the progress events, then is a cancellation point."""
    s = _scope.get()
    if s is None:
        return
    if s.observer is not None:
        s.observer(what, done, total)
    t = _task.get()
    if t is not None:
        emit(t.phase, t.disk, t.total * done / total if total else 0, t.total, t.unit)
    else:
        phase, unit = _REPORTED.get(what, (what, "count"))
        emit(phase, None, done, total, unit)
    check()


__all__ = ["Cancel", "Cancelled", "Observer", "Progress", "ProgressEvent", "active", "cancel_handle", "cancelled",
           "check", "emit", "finish", "forward", "interruption", "listening", "observing", "report", "scope",
           "submit", "task", "thread"]
