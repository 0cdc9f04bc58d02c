"""libvirt connection, event loop, domain and disk inspection, job start/wait.

Everything that talks to libvirtd (except QMP passthrough, see monitor.py) lives here, so the
rest of the package deals in plain data.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

import libvirt
from tenacity import retry, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from virtbackup.errors import DomainNotFound, HostError, OperationFailed, OutputExists
from virtbackup.virt.domxml import DomainXML

T = TypeVar("T")
log = logging.getLogger(__name__)
DEFAULT_URI = "qemu:///system"
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")

_loop_lock = threading.Lock()
_loop_started = False


def _silence(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves, once."""


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process).

    Must happen before a connection is opened, or that connection delivers no events.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_silence, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


# Errors that go away by themselves: a daemon restarting, another job holding the state lock.
_TRANSIENT_CODES = {
    getattr(libvirt, "VIR_ERR_OPERATION_TIMEOUT", -1),
    getattr(libvirt, "VIR_ERR_SYSTEM_ERROR", -1),
    getattr(libvirt, "VIR_ERR_RPC", -1),
    getattr(libvirt, "VIR_ERR_NO_CONNECT", -1),
    getattr(libvirt, "VIR_ERR_INTERNAL_ERROR", -1),
    getattr(libvirt, "VIR_ERR_AGENT_UNRESPONSIVE", -1),
}
_TRANSIENT_MSGS = ("cannot acquire state change lock", "connection reset", "end of file while reading data",
                   "failed to connect socket", "timeout")
# A connection whose socket is closed stays closed: retrying a call on it cannot succeed (the
# daemon restarted; the caller has to open a new connection).
_DEAD_CONNECTION_MSGS = ("client socket is closed",)


def is_dead_connection(exc: BaseException) -> bool:
    """The connection's socket is closed (the daemon restarted or dropped us): only a new
    connection helps."""
    if not isinstance(exc, libvirt.libvirtError):
        return False
    msg = (exc.get_error_message() or str(exc)).lower()
    return any(m in msg for m in _DEAD_CONNECTION_MSGS)


def is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, libvirt.libvirtError):
        return False
    msg = (exc.get_error_message() or str(exc)).lower()
    if any(m in msg for m in _DEAD_CONNECTION_MSGS):
        return False
    return any(m in msg for m in _TRANSIENT_MSGS) or (
        exc.get_error_code() in _TRANSIENT_CODES and "state change lock" in msg)


RETRY_ATTEMPTS = int(os.environ.get("VIRTBACKUP_RETRY_ATTEMPTS", "5"))
# Also bounded in time: one "cannot acquire state change lock" already took libvirt's 30 s wait.
RETRY_SECONDS = float(os.environ.get("VIRTBACKUP_RETRY_SECONDS", "45"))

transient_retry = retry(
    retry=retry_if_exception(is_transient),
    stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_SECONDS),
    wait=wait_exponential(multiplier=0.2, max=3),
    reraise=True,
)


def libvirt_message(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return str(exc)


def is_remote(uri: Optional[str]) -> bool:
    """A URI naming a host (qemu+ssh://h/system, qemu+tcp://h/system, qemu://h/system) reaches
    a libvirtd elsewhere, even when h is this machine: its files are not ours to open."""
    from urllib.parse import urlsplit
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
    return bool(urlsplit(uri).hostname)


def uri_host(uri: str) -> Optional[str]:
    from urllib.parse import urlsplit
    return urlsplit(uri).hostname


@transient_retry
def _open(uri: str) -> libvirt.virConnect:
    return libvirt.open(uri)


def connect(uri: Optional[str] = None) -> libvirt.virConnect:
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
    ensure_event_loop()
    log.debug("libvirt open %s", uri)
    try:
        conn = _open(uri)
    except libvirt.libvirtError as e:
        raise HostError(f"cannot connect to libvirt at {uri}: {libvirt_message(e)}") from None
    return conn


@contextmanager
def connection(uri: Optional[str] = None) -> Iterator[libvirt.virConnect]:
    """A libvirt connection closed on the way out (a close that fails changes nothing)."""
    conn = connect(uri)
    try:
        yield conn
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def lookup_domain(conn: libvirt.virConnect, name_or_uuid: str) -> libvirt.virDomain:
    """Find a domain by name or UUID, as virsh does."""
    try:
        if _UUID_RE.match(name_or_uuid):
            try:
                return conn.lookupByUUIDString(name_or_uuid)
            except libvirt.libvirtError:
                pass
        return conn.lookupByName(name_or_uuid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise DomainNotFound(f"domain '{name_or_uuid}' not found") from None
        raise HostError(f"cannot look up domain '{name_or_uuid}': {libvirt_message(e)}") from None


class DomainHandle:
    """A domain and the connection it was looked up on, able to reconnect.

    libvirtd may restart during a long job (QEMU and the job survive it): the engine and the
    runners then open a new connection and look the domain up again by UUID. Connections opened
    here are closed by `close()`; the caller's own connection is left to the caller.
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain):
        self.conn = conn
        self.dom = dom
        self.uri = conn.getURI()
        self.uuid = dom.UUIDString()
        self.name = dom.name()
        self._own: List[libvirt.virConnect] = []

    def alive(self) -> bool:
        try:
            return bool(self.conn.isAlive() == 1)
        except libvirt.libvirtError:
            return False

    def reconnect_if_lost(self, force: bool = False) -> bool:
        """Open a new connection when the current one is dead (`force`: a call just found its
        socket closed, which isAlive() may not know yet). True when it reconnected."""
        if not force and self.alive():
            return False
        log.info("the connection to libvirtd was lost; reconnecting to %s", self.uri)
        conn = connect(self.uri)
        self._own.append(conn)
        self.conn = conn
        self.dom = call(conn.lookupByUUIDString, self.uuid)
        return True

    def close(self) -> None:
        for conn in self._own:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
        self._own.clear()


@dataclass(frozen=True)
class Disk:
    """A disk as the running domain has it (live XML)."""

    target: str                 # "vda"
    device: str                 # disk | cdrom | floppy | lun
    type: str                   # file | block | network | volume
    format: Optional[str]       # driver type: qcow2 | raw | ...
    source: Optional[str]       # file or dev path
    alias: Optional[str]        # qdev id, e.g. "virtio-disk0"
    index: Optional[int]        # <source index='N'>: libvirt's node name is libvirt-N-format

    @property
    def node_name(self) -> Optional[str]:
        return f"libvirt-{self.index}-format" if self.index is not None else None

    def skip_reason(self) -> Optional[str]:
        """Why this disk takes no part in a backup at all (None = it does).

        Only what is not a guest's disk image: removable media, passthrough LUNs, empty drives,
        and disk types QEMU's backup job cannot read (vhost-user, NVMe passthrough, directories).
        A disk that cannot carry a dirty bitmap is still backed up (`bitmap_reason`)."""
        if self.device != "disk":
            return f"device type '{self.device}'"
        if self.type not in ("file", "block", "network", "volume"):
            return f"disk type '{self.type}' (QEMU's backup job cannot read it)"
        if self.type in ("file", "block") and not self.source:
            return "no source"
        return None

    def offline_reason(self) -> Optional[str]:
        """Why a shut-off domain's backup (a private QEMU opening images by path) cannot read
        this disk (None = it can)."""
        if self.type not in ("file", "block"):
            # a network or pool volume disk needs libvirt to open it: refused, never left out
            return (f"disk {self.target} is a '{self.type}' disk: a shut-off domain's backup opens images by "
                    "path; start the domain to back it up, or leave it out with --disk")
        if self.format not in ("qcow2", "raw"):
            return f"disk {self.target}: format '{self.format or 'unknown'}' cannot be read offline (qcow2 or raw)"
        return None

    def bitmap_reason(self) -> Optional[str]:
        """Why this disk cannot carry a persistent dirty bitmap (None = it can): such a disk is
        copied whole in every point, incrementals included, and takes no part in checkpoints."""
        if self.format != "qcow2":
            return (f"format '{self.format or 'unknown'}' cannot hold a dirty bitmap (only qcow2 can): "
                    "copied whole")
        return None


def domain_disks(xml: str) -> List[Disk]:
    """The disks of a domain's XML that have a target, as plain data."""
    return [Disk(target=d.target, device=d.device, type=d.type, format=d.format, source=d.source, alias=d.alias,
                 index=d.source_index)
            for d in DomainXML.parse(xml).disks if d.target]


@transient_retry
def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def _shown(arg: Any) -> str:
    """An argument as the debug log shows it: XML on its own lines; bytes never (a secret's value,
    e.g. the backup key given to virSecret.setValue, is bytes), only their length."""
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return f"<{len(arg)} bytes, not shown>"
    if isinstance(arg, str) and "<" in arg:
        return f"\n{arg}"
    return repr(arg)


def call(fn: Callable[..., T], *args: Any) -> T:
    """Call a libvirt method, retrying transient errors (bounded); logged at debug with its
    arguments (XML included) and how long it took."""
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("libvirt %s(%s)", name, ", ".join(_shown(a) for a in args))
    started = time.monotonic()
    try:
        return _call(fn, *args)
    finally:
        log.debug("libvirt %s took %.3fs", name, time.monotonic() - started)


class DomainEvents:
    """The libvirt events that end a wait on one domain's job: the job's own event (`job_event`,
    handled by `on_job(*event args)`, which returns True to wake), the domain stopping or
    crashing, the connection closing, and `interrupt()` (signal handlers). Each sets `wake`.
    `close()` deregisters everything (a connection takes one close callback: one watch at a time).
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, job_event: int,
                 on_job: Callable[..., bool]):
        self.conn = conn
        self.dom = dom
        self.wake = threading.Event()
        self.stopped = False            # the domain stopped or crashed
        self.closed = False             # the connection to libvirtd closed
        self.io_paused = False          # QEMU paused the guest on an I/O error (its werror policy)
        self.interrupted: Optional[str] = None
        self._ids: List[int] = []
        uuid = dom.UUIDString()

        def job(_c: Any, d: libvirt.virDomain, *args: Any) -> None:
            if d.UUIDString() == uuid and on_job(*args[:-1]):
                self.wake.set()

        def on_life(_c: Any, d: libvirt.virDomain, event: int, detail: int, _o: Any) -> None:
            if d.UUIDString() != uuid:
                return
            if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
                self.stopped = True
                self.wake.set()
            elif event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
                # a guest write failed, typically inside the job's copy-before-write filter (the
                # scratch file's or the push target's storage is full): the job must end now,
                # so that the guest can be resumed and its write go through
                self.io_paused = True
                self.wake.set()

        def on_close(_c: Any, _reason: int, _o: Any) -> None:
            self.closed = True
            self.wake.set()

        self._ids.append(conn.domainEventRegisterAny(dom, job_event, job, None))
        self._ids.append(conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_life, None))
        try:
            conn.registerCloseCallback(on_close, None)
            self._close_cb = True
        except libvirt.libvirtError:
            self._close_cb = False

    def interrupt(self, why: str) -> None:
        self.interrupted = why
        self.wake.set()

    def close(self) -> None:
        for cb in self._ids:
            try:
                self.conn.domainEventDeregisterAny(cb)
            except libvirt.libvirtError:
                pass
        if self._close_cb:
            try:
                self.conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass


class JobWatch(DomainEvents):
    """Waits for the end of a domain job through libvirt events (no sleep-polling).

    Wakes on JOB_COMPLETED (its parameters in `params`), on the domain stopping or crashing, on
    the connection closing, and on `interrupt()` (signal handlers). A slow safety check runs
    every `check_every` seconds in case an event was lost (e.g. libvirtd restarted).
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain):
        self.params: Dict[str, Any] = {}

        def on_job(params: Dict[str, Any]) -> bool:
            self.params = dict(params)
            return True

        super().__init__(conn, dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, on_job)
        self.done = self.wake

    @property
    def reason(self) -> Optional[str]:
        """Why we woke, if not JOB_COMPLETED."""
        if self.io_paused:
            return ("a guest write failed and QEMU paused the guest (I/O error): the old data it had "
                    "to copy did not fit (the scratch file's or the backup target's filesystem is full?)")
        if self.stopped:
            return "the domain stopped during the backup"
        if self.closed:
            return "the connection to libvirtd was closed during the backup"
        return None

    def wait(self, check: Callable[[], bool], check_every: float = 5.0, timeout: Optional[float] = None) -> bool:
        """Block until woken; `check()` returning True also ends the wait (safety net).

        Returns False only when `timeout` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done.wait(check_every if deadline is None
                                 else max(0.0, min(check_every, deadline - time.monotonic()))):
            if check():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True


@contextmanager
def signals_noted(note: Callable[[str], None]) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM only call `note(name)` instead of stopping the process.

    Used where a signal must not cut a step in half (the metadata commit, a private QEMU that
    has to quit cleanly) or must wake a waiter that then aborts and rolls back: there `note` is
    the operation's `observe.Cancel.cancel`, so a signal is one more source of the cancel that
    another thread can also give (the waiter registered with the handle, not with the signal).
    A signal mask would not do: libvirt's event thread leaves the signals unblocked and Python
    raises KeyboardInterrupt in the main thread anyway. Outside the main thread this does
    nothing (an embedding caller cancels through the handle).
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        note(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


# --- defining a restored domain (restore --define) ---------------------------------------------
@dataclass
class Defined:
    name: str
    uuid: str
    started: bool


def check_name_free(uri: Optional[str], name: str) -> None:
    """Refuse (exit 2) before anything is written when a domain of that name exists."""
    with connection(uri) as conn:
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise OperationFailed(f"cannot look up domain '{name}': {libvirt_message(e)}") from e
        raise OutputExists(f"domain '{name}' exists; choose another name for the restored domain")


def define(uri: Optional[str], xml: str) -> Defined:
    """Define the domain; exit 1 naming libvirt's reason when it refuses."""
    with connection(uri) as conn:
        log.debug("libvirt defineXML:\n%s", xml)
        try:
            dom = conn.defineXML(xml)
        except libvirt.libvirtError as e:
            raise OperationFailed(f"cannot define the restored domain: {libvirt_message(e)}") from e
        return Defined(dom.name(), dom.UUIDString(), False)


def start(uri: Optional[str], name: str) -> None:
    with connection(uri) as conn:
        log.debug("libvirt create(%s)", name)
        try:
            conn.lookupByName(name).create()
        except libvirt.libvirtError as e:
            raise OperationFailed(f"domain '{name}' was defined but did not start: "
                                  f"{libvirt_message(e)}") from e
