"""Application-consistent points: freeze the guest's filesystems through the QEMU guest agent right
before the backup's point in time and thaw right after it.

libvirt 9.0 has no quiesce flag for checkpoints or backup jobs (reference F1), so this brackets
`backupBegin` (which returns once the point in time is fixed) with fsfreeze/fsthaw.

Linux fsfreeze has no timeout: a tool that dies between freeze and thaw leaves the guest frozen.
So the thaw runs on every path the process survives (exceptions, SIGINT/SIGTERM are held until
it is done), and a marker file in the run dir exists while the guest may be frozen: the next run
on that domain (backup or `virtbackup thaw`) finds it and thaws first.

Freeze and thaw go through libvirt's agent passthrough (`qemuAgentCommand`) rather than
`virDomainFSFreeze`: only the passthrough takes a timeout, and libvirt's default agent timeout
blocks forever on a hung agent. (libvirt logs the domain as tainted by a custom agent command.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import libvirt
import libvirt_qemu

from virtbackup import env
from virtbackup.errors import OperationFailed, UsageError
from virtbackup.options import QUIESCE_MODES
from virtbackup.store.chain import replace_file
from virtbackup.virt.domxml import AGENT_CHANNEL, DomainXML

APPLICATION = "application"
CRASH = "crash"

Notify = Callable[[str], None]
log = logging.getLogger(__name__)


class QuiesceFailed(OperationFailed):
    """`--quiesce require` and the guest could not be frozen: nothing was recorded (exit 1)."""

    kind = "quiesce-failed"


def freeze_timeout() -> int:
    """Seconds the agent gets to freeze (and to thaw); `VIRTBACKUP_FREEZE_TIMEOUT`, default 30."""
    try:
        return max(1, int(os.environ.get("VIRTBACKUP_FREEZE_TIMEOUT", "30")))
    except ValueError:
        return 30


@dataclass
class Consistency:
    """What a point records about how consistent its data is, and why."""

    consistency: str                      # application | crash
    reason: str
    frozen_seconds: Optional[float] = None
    filesystems: int = 0


def has_agent_channel(domain_xml: str) -> bool:
    return DomainXML.parse(domain_xml).has_agent_channel


def agent_command(dom: libvirt.virDomain, execute: str, arguments: Optional[Dict[str, Any]] = None,
                  timeout: int = 5) -> Any:
    """One guest agent command through libvirt (`virsh qemu-agent-command`); its "return" value.
    The one place virtbackup talks to a guest agent (quiesce here, restore drills)."""
    cmd: Dict[str, Any] = {"execute": execute}
    if arguments is not None:
        cmd["arguments"] = arguments
    log.debug("guest agent %s: %s", dom.name(), execute)
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0)
    return json.loads(reply).get("return")


def _message(e: BaseException) -> str:
    if isinstance(e, libvirt.libvirtError):
        return " ".join((e.get_error_message() or str(e)).split())
    return str(e)


def _no_agent_connected(e: BaseException) -> bool:
    """libvirt knows no agent is connected: nothing can have been frozen through it just now."""
    msg = _message(e).lower()
    return "not connected" in msg or "not configured" in msg


# -- the marker -----------------------------------------------------------------------------------
def marker_path(uuid: str) -> Path:
    return env.run_dir() / f"frozen-{uuid}.json"


def _write_marker(dom: libvirt.virDomain) -> Path:
    """The freeze marker, written like every file of ours: in the checked run directory, a temp
    file created exclusively and never through a link, renamed over a marker of ours only."""
    path = marker_path(dom.UUIDString())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"pid": os.getpid(), "domain": dom.name(), "uuid": dom.UUIDString(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    replace_file(path, json.dumps(data).encode(), 0o600, "a freeze marker",
                 ours=lambda head: head.startswith(b'{"pid": '))
    return path


def read_marker(uuid: str) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(marker_path(uuid).read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}          # unreadable: still a marker (the guest may be frozen)


def _remove_marker(uuid: str) -> None:
    try:
        marker_path(uuid).unlink()
    except FileNotFoundError:
        pass


def _who(marker: Dict[str, Any]) -> str:
    parts = [f"pid {marker['pid']}" if marker.get("pid") else "",
             f"since {marker['since']}" if marker.get("since") else ""]
    return ", ".join(p for p in parts if p) or "unknown run"


def _thaw(dom: libvirt.virDomain, timeout: int, attempts: int = 3) -> int:
    """Thaw; a few attempts (an agent busy finishing the freeze answers the next one)."""
    last: Optional[BaseException] = None
    for i in range(attempts):
        try:
            return int(agent_command(dom, "guest-fsfreeze-thaw", timeout=timeout) or 0)
        except libvirt.libvirtError as e:
            last = e
            if _no_agent_connected(e):
                break
            time.sleep(0.5 * (i + 1))
    assert last is not None
    raise last


def recover(dom: libvirt.virDomain, notify: Notify) -> Optional[str]:
    """Thaw a guest that an earlier run left frozen (its marker is still there).

    Call with the domain lock held. Returns a warning when the guest could not be thawed (the
    marker stays for the next run / `virtbackup thaw`), else None.
    """
    uuid = dom.UUIDString()
    marker = read_marker(uuid)
    if marker is None:
        return None
    who = _who(marker)
    if not dom.isActive():
        _remove_marker(uuid)
        notify(f"an interrupted run ({who}) had frozen domain '{dom.name()}'; it has been shut off since, "
               "nothing is frozen")
        return None
    try:
        n = _thaw(dom, freeze_timeout(), attempts=1)    # a hung agent must not hold up every run
    except libvirt.libvirtError as e:
        if _no_agent_connected(e):
            _remove_marker(uuid)
            notify(f"an interrupted run ({who}) may have frozen domain '{dom.name()}'; its agent is not "
                   f"connected now, so nothing is frozen through it ({_message(e)})")
            return None
        return (f"domain '{dom.name()}' may still be frozen by an interrupted run ({who}) and could not "
                f"be thawed: {_message(e)}; run 'virtbackup thaw {dom.name()}'")
    _remove_marker(uuid)
    notify(f"thawed {n} filesystem(s) of domain '{dom.name()}' left frozen by an interrupted run ({who})")
    return None


# -- the freeze around the point in time ------------------------------------------------------------
@contextmanager
def _signals_held() -> Iterator[List[int]]:
    """SIGINT/SIGTERM wait until the block is left, then are delivered to whatever handler was there.

    The thaw must not be skipped by a KeyboardInterrupt or by SIGTERM's default action. Outside
    the main thread signals can't be handled here (Python delivers them to the main thread).
    """
    held: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def note(signum: int, _frame: object) -> None:
        held.append(signum)

    old = {int(sig): signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


class Quiescer:
    """One run's quiesce decision (mode) and its outcome (`result`, recorded in the point)."""

    def __init__(self, dom: libvirt.virDomain, mode: str = "auto", notify: Optional[Notify] = None,
                 timeout: Optional[int] = None):
        if mode not in QUIESCE_MODES:
            raise UsageError(f"unknown quiesce mode '{mode}' (auto, require, off)")
        self.dom = dom
        self.mode = mode
        self._notify = notify or (lambda _m: None)
        self.timeout = timeout or freeze_timeout()
        self.result: Consistency = Consistency(CRASH, "not quiesced")
        self.warnings: List[str] = []
        self._thaw_failed: Optional[str] = None   # the warning of a thaw that failed (retry_thaw)
        self._active = bool(dom.isActive())
        self._channel = has_agent_channel(dom.XMLDesc(0))

    def check(self) -> None:
        """Before anything is created: refuse `require` when no agent can ever answer; decide the rest."""
        if not self._active:
            self.result = Consistency(APPLICATION, "the domain was shut off (its disks were not in use)")
            return
        if self.mode == "off":
            self.result = Consistency(CRASH, "quiesce off")
        elif not self._channel:
            if self.mode == "require":
                raise QuiesceFailed(f"cannot quiesce domain '{self.dom.name()}': it has no guest agent channel "
                                    f"({AGENT_CHANNEL}); nothing was recorded (--quiesce=auto or off takes a "
                                    "crash-consistent backup)")
            self.result = Consistency(CRASH, "the domain has no guest agent channel")

    def notify(self, msg: str) -> None:
        """Say it (stderr via the caller) and log it (the run log). Never raises: saying a thing
        must not be what leaves a guest frozen (stderr on a full device, a closed pipe)."""
        (log.warning if msg.startswith("warning: ") else log.info)("%s", msg)
        try:
            self._notify(msg)
        except Exception as e:  # noqa: BLE001 -- any failure to say it; the run log has it
            log.warning("could not say %r: %s", msg, e)

    @property
    def wants_freeze(self) -> bool:
        return self._active and self.mode != "off" and self._channel

    @contextmanager
    def frozen(self, dom: Optional[libvirt.virDomain] = None) -> Iterator[None]:
        """Freeze (per mode), run the body (the job start), thaw. The thaw always runs.

        `dom`: the domain as the runner has it now (after a reconnect it is a new object)."""
        if dom is not None:
            self.dom = dom
        if not self.wants_freeze:
            yield
            return
        with _signals_held():
            name, uuid = self.dom.name(), self.dom.UUIDString()
            # a marker still here: an earlier run's freeze that recover() could not thaw; keep it
            inherited = read_marker(uuid) is not None
            if not inherited:
                _write_marker(self.dom)
            t0 = time.monotonic()
            try:
                n = int(agent_command(self.dom, "guest-fsfreeze-freeze", timeout=self.timeout) or 0)
            except libvirt.libvirtError as e:
                self._after_failed_freeze(e, inherited)
                timed_out = time.monotonic() - t0 >= self.timeout - 0.5
                why = (f"guest agent did not freeze within {self.timeout}s: {_message(e)}" if timed_out
                       else f"guest agent could not freeze: {_message(e)}")
                if self.mode == "require":
                    raise QuiesceFailed(f"cannot quiesce domain '{name}': {why}; nothing was recorded") from None
                self.result = Consistency(CRASH, why)
                self.notify(f"warning: {why}; the backup goes on crash-consistent")
                yield
                return
            frozen_at = time.monotonic()
            if n == 0:
                self._thaw_or_warn(name, uuid)
                why = "the guest agent froze no filesystem"
                if self.mode == "require":
                    raise QuiesceFailed(f"cannot quiesce domain '{name}': {why}; nothing was recorded")
                self.result = Consistency(CRASH, why)
                self.notify(f"warning: {why}; the backup goes on crash-consistent")
                yield
                return
            try:
                self.notify(f"froze {n} filesystem(s) of domain '{name}' in {frozen_at - t0:.2f}s")
                yield
            finally:
                thawed = self._thaw_or_warn(name, uuid)
                secs = round(time.monotonic() - frozen_at, 3)
                self.result = Consistency(APPLICATION, f"froze {n} filesystem(s) through the guest agent",
                                          frozen_seconds=secs, filesystems=n)
                if thawed:
                    self.notify(f"thawed domain '{name}': frozen for {secs:.2f}s")

    def _after_failed_freeze(self, e: BaseException, inherited: bool) -> None:
        """A freeze that failed may still happen later (a timeout): thaw, or keep the marker.

        A guest that is already frozen and not by virtbackup (no marker of ours) is left as it
        is: another tool froze it and will thaw it.
        """
        uuid = self.dom.UUIDString()
        if _no_agent_connected(e) or ("frozen state" in _message(e) and not inherited):
            _remove_marker(uuid)
            return
        self._thaw_or_warn(self.dom.name(), uuid, attempts=1)   # an agent that timed out rarely answers now

    def _thaw_or_warn(self, name: str, uuid: str, attempts: int = 3) -> bool:
        try:
            _thaw(self.dom, self.timeout, attempts)
        except libvirt.libvirtError as e:
            if _no_agent_connected(e):
                _remove_marker(uuid)
                return True
            msg = (f"could not thaw domain '{name}': {_message(e)}; it may still be frozen: run "
                   f"'virtbackup thaw {name}' (the next backup of it also thaws first)")
            self.warnings.append(msg)
            self.notify(f"warning: {msg}")
            self._thaw_failed = msg
            return False
        _remove_marker(uuid)
        return True

    def retry_thaw(self) -> None:
        """Try again a thaw that failed, e.g. because the guest was paused (an I/O error) while
        the agent answered; the engine calls this once it has resumed the guest. On success the
        earlier warning is taken back and the marker removed."""
        failed, self._thaw_failed = self._thaw_failed, None
        if failed is None:
            return
        name, uuid = self.dom.name(), self.dom.UUIDString()
        if failed in self.warnings:
            self.warnings.remove(failed)
        if self._thaw_or_warn(name, uuid):
            self.notify(f"thawed domain '{name}' on a second attempt")

    def record(self, point: Any) -> None:
        """Put the outcome on the point (its optional chain fields)."""
        point.consistency = self.result.consistency
        point.consistency_reason = self.result.reason
        point.frozen_seconds = self.result.frozen_seconds


# -- `virtbackup thaw DOMAIN` -------------------------------------------------------------------------
@dataclass
class ThawResult:
    domain: str
    filesystems: int
    marker: Optional[Dict[str, Any]]     # what an interrupted run left, if anything
    marker_removed: bool

    def to_json(self) -> Dict[str, Any]:
        """{"domain", "filesystems", "marker", "marker_removed"} (the `thaw --json` output)."""
        return asdict(self)


def thaw(uri: Optional[str], domain: str) -> ThawResult:
    """Thaw a domain's filesystems through its agent (the admin's way out after a killed run)."""
    from virtbackup.errors import LockBusy
    from virtbackup.store.chain import domain_lock
    from virtbackup.virt import host
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, domain)
        name, uuid = dom.name(), dom.UUIDString()
        marker = read_marker(uuid)
        if not dom.isActive():
            if marker is not None:
                _remove_marker(uuid)
            raise UsageError(f"domain '{name}' is not running: a shut-off guest has no frozen filesystems")
        if not has_agent_channel(dom.XMLDesc(0)):
            raise UsageError(f"domain '{name}' has no guest agent channel ({AGENT_CHANNEL}): "
                             "virtbackup cannot have frozen it")
        try:
            n = _thaw(dom, freeze_timeout())
        except libvirt.libvirtError as e:
            raise OperationFailed(f"cannot thaw domain '{name}': {_message(e)}") from None
        removed = False
        if marker is not None:
            try:
                with domain_lock(uuid):      # a run in progress keeps its marker (it thaws itself)
                    _remove_marker(uuid)
                    removed = True
            except LockBusy:
                pass
        return ThawResult(name, n, marker, removed)
