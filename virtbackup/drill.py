"""Restore drills: boot a restore point as a throwaway domain and ask its guest agent.

A checksum says the bytes are the ones that were written; only a boot says they are a system
that starts. The point is booted on instant-restore overlays (qcow2 files in a private temp dir
whose backing files are the point's images, opened read-only by QEMU), as a transient domain
with a new name and UUID, started with AUTODESTROY: libvirt destroys it when our connection
closes, even if virtbackup is killed. It gets no network interfaces, host devices, shared
filesystems or host-side character devices, so it can't reach anything the original domain uses.
Nothing is written to the backup directory.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import threading
import time
import uuid as uuidlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from lxml import etree

from virtbackup import env, observe
from virtbackup.errors import DamageFound, Interrupted, UsageError, VirtBackupError
from virtbackup.qemu import qemu_img
from virtbackup.store import integrity
from virtbackup.store.chain import BackupDir, shared_lock
from virtbackup.virt.domxml import AGENT_CHANNEL, DomainXML
from virtbackup.virt.quiesce import agent_command, has_agent_channel

Notify = Callable[[str], None]
NAME_PREFIX = "virtbackup-drill-"
# devices that reach the host or the original domain's resources
_HOST_DEVICES = ("interface", "hostdev", "filesystem", "redirdev", "smartcard", "shmem", "vsock", "graphics",
                 "serial", "console", "parallel", "tpm")


@dataclass
class DrillResult:
    point: str
    domain: str                         # the throwaway domain's name (gone when this is returned)
    ok: bool
    stage: Optional[str] = None         # where it failed: start | agent | check
    message: Optional[str] = None       # why it failed
    start_seconds: Optional[float] = None   # until QEMU ran the guest
    agent_seconds: Optional[float] = None   # from the start until the agent answered
    check: Optional[str] = None
    check_exit: Optional[int] = None
    check_stdout: str = ""
    check_stderr: str = ""
    console: str = ""                   # the guest console's last lines, on failure

    @property
    def failure(self) -> Optional[str]:
        """The one-line error of a failed drill (None when it passed)."""
        return None if self.ok else f"drill failed at {self.stage}: {self.message}"

    def to_json(self) -> Dict[str, Any]:
        """Every field (the `verify --boot --json` output)."""
        return asdict(self)


TMP_PREFIX = "virtbackup-drill-"


def drill_domain_xml(saved_xml: str, name: str, overlays: Dict[str, Path], console_log: Path) -> str:
    """The throwaway domain: the point's saved XML, new identity, disks on the overlays, nothing of the host.

    The domain type (kvm or qemu/TCG) is kept as saved; the agent channel is kept (libvirt makes
    a new socket); a serial console to a file in the drill's temp dir replaces every other
    character device.
    """
    from virtbackup.virt.restoredom import restored_domain_xml
    xml, _notes = restored_domain_xml(saved_xml, name, overlays, str(uuidlib.uuid4()))
    dom = DomainXML.parse(xml)
    for tag in _HOST_DEVICES:
        dom.remove_devices(tag)

    def not_the_agent(ch: etree._Element) -> bool:
        target = ch.find("target")
        return ch.get("type") != "unix" or target is None or target.get("name") != AGENT_CHANNEL

    dom.remove_devices("channel", not_the_agent)
    dom.add_file_serial(console_log)
    dom.set_text("description", "virtbackup restore drill (throwaway; destroyed when the drill ends)", after="uuid")
    return dom.to_string()


def _console_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip())


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM ends the drill like Ctrl-C does: by an exception, so the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise Interrupted("drill interrupted by SIGTERM; the throwaway domain and its overlays were removed")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def drill(backup_dir: Path, point_id: Optional[str] = None, timeout: float = 300, check: Optional[str] = None,
          uri: Optional[str] = None, notify: Optional[Notify] = None) -> DrillResult:
    """Boot one point; see the module docstring. Bad input raises (exit 2); a failed drill is a result.

    The backup dir's shared lock is held throughout: the overlays read the chain's images, so a
    prune must not replace them while the throwaway domain runs."""
    if not timeout or timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout}")
    if check is not None and not check.strip():
        raise UsageError("--check needs a command")
    bdir = BackupDir(Path(backup_dir))
    bdir.load()          # a backup dir (exit 2 otherwise) before a lock file is made in it
    with shared_lock(bdir):
        try:
            return _drill(backup_dir, point_id, timeout, check, uri, notify)
        except observe.Cancelled as e:      # the cleanup has run
            raise Interrupted(f"drill {observe.interruption(e.reason)}; the throwaway domain and its "
                              "overlays were removed") from None


def _drill(backup_dir: Path, point_id: Optional[str], timeout: float, check: Optional[str],
           uri: Optional[str], notify: Optional[Notify]) -> DrillResult:
    import libvirt

    from virtbackup.virt import host
    say = notify or (lambda _m: None)
    bdir = BackupDir(Path(backup_dir))
    chain = bdir.load()
    point = chain.point(point_id)
    if chain.encryption is not None:
        # the drill boots overlays on the backup images: the domain would need the key in libvirt
        raise UsageError(f"a restore drill of an encrypted backup would need its key stored in libvirt; "
                         f"restore a decrypted copy and boot that: virtbackup restore {bdir.path} OUTPUT_DIR "
                         "--key-file FILE --define NAME --start")
    # the saved XML is what the throwaway domain is built from: a changed one is never read further
    xml_damage = integrity.check_xml(bdir, chain, integrity.point_xml(point))
    if xml_damage:
        raise DamageFound(f"point {point.id} can't be drilled: damaged " + "; ".join(
            f"{d.image}: {d.problem}" for d in xml_damage) + "; nothing was started")
    try:
        saved_xml = bdir.resolve(point.domain_xml).read_text()
        agent = has_agent_channel(saved_xml)
    except OSError as e:
        raise UsageError(f"point {point.id}: cannot read its domain XML {point.domain_xml}: {e.strerror}") from None
    except etree.LxmlError as e:
        raise UsageError(f"point {point.id}: its domain XML {point.domain_xml} is unusable: {e}") from None
    if not agent:
        raise UsageError(f"point {point.id}: its domain has no guest agent channel ({AGENT_CHANNEL}), so a drill "
                         "can't tell that it booted" + (" and no --check can run" if check else "")
                         + "; add the channel (and qemu-guest-agent in the guest) to drill later points")
    name = f"{NAME_PREFIX}{secrets.token_hex(4)}"
    result = DrillResult(point.id, name, False, check=check)
    env.remove_dead_tempdirs(TMP_PREFIX)         # what a killed drill left (overlays, console log)
    tmp = env.owned_tempdir(TMP_PREFIX)
    conn = None
    dom = None
    try:
        with _sigterm_raises():
            try:
                # Never boot damage: every image the overlays read matches its record first.
                damage = integrity.check_images(bdir, chain, integrity.chain_images(chain, point, sorted(point.disks)),
                                                progress="images")
                if damage:
                    raise DamageFound("damaged image(s): " + "; ".join(f"{d.where}: {d.problem}" for d in damage))
                overlays: Dict[str, Path] = {}
                for disk, img in sorted(point.disks.items()):
                    overlays[disk] = tmp / f"{disk}.qcow2"
                    qemu_img.create(overlays[disk], img.virtual_size, backing=os.path.realpath(bdir.resolve(img.image)))
                xml = drill_domain_xml(saved_xml, name, overlays, tmp / "console.log")
            except (VirtBackupError, etree.LxmlError, ValueError) as e:
                result.stage, result.message = "start", f"cannot prepare the throwaway domain: {e}"
                return result
            observe.check()
            conn = host.connect(uri)
            say(f"drill: starting point {point.id} as throwaway domain {name} (overlays in {tmp})")
            t0 = time.monotonic()
            try:
                dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
            except libvirt.libvirtError as e:
                result.stage, result.message = "start", f"the domain did not start: {host.libvirt_message(e)}"
                return result
            result.start_seconds = round(time.monotonic() - t0, 2)
            say(f"drill: running after {result.start_seconds:.2f}s; waiting up to {timeout:.0f}s for its guest agent")
            last = "no answer"
            while True:
                observe.check()         # a cancel (another thread) ends the drill like Ctrl-C
                try:
                    if not dom.isActive():
                        result.stage, result.message = "agent", "the domain stopped before its guest agent answered"
                        break
                    agent_command(dom, "guest-ping", timeout=max(1, min(5, int(timeout - (time.monotonic() - t0)))))
                    result.agent_seconds = round(time.monotonic() - t0, 2)
                    break
                except libvirt.libvirtError as e:
                    last = host.libvirt_message(e)
                if time.monotonic() - t0 >= timeout:
                    result.stage, result.message = ("agent", f"the guest agent did not answer within {timeout:.0f}s "
                                                    f"(last: {' '.join(last.split())})")
                    break
                time.sleep(0.5)
            if result.stage:
                result.console = _console_tail(tmp / "console.log")
                return result
            say(f"drill: guest agent answered {result.agent_seconds:.2f}s after the start")
            if check is None:
                result.ok = True
                return result
            say(f"drill: running check {check!r} in the guest")
            _run_check(dom, check, timeout, result)
            result.ok = result.stage is None
            return result
    finally:
        with host.signals_noted(lambda _s: None):    # the cleanup is not to be cut short
            if dom is not None:
                try:
                    dom.destroy()       # transient: destroyed = gone
                except libvirt.libvirtError:
                    pass
            if conn is not None:
                try:
                    conn.close()        # AUTODESTROY would also take the domain down here
                except libvirt.libvirtError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)


def _run_check(dom: object, check: str, timeout: float, result: DrillResult) -> None:
    import libvirt
    t0 = time.monotonic()
    try:
        pid = agent_command(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", check], "capture-output": True},
                            timeout=30)["pid"]
        while True:
            st: dict = agent_command(dom, "guest-exec-status", {"pid": pid}, timeout=30)
            if st.get("exited"):
                break
            if time.monotonic() - t0 > timeout:
                result.stage, result.message = "check", f"check {check!r} still running after {timeout:.0f}s"
                return
            observe.check()
            time.sleep(0.2)
    except libvirt.libvirtError as e:
        result.stage, result.message = "check", f"could not run check {check!r}: {' '.join(str(e).split())}"
        return
    result.check_stdout = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
    result.check_stderr = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
    code = st.get("exitcode")
    result.check_exit = int(code) if code is not None else 128 + int(st.get("signal", 0))
    if result.check_exit != 0:
        detail = " ".join((result.check_stderr or result.check_stdout).split())[:200]
        result.stage = "check"
        result.message = f"check {check!r} exited with {result.check_exit}" + (f": {detail}" if detail else "")
