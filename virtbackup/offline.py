"""Backups of a shut-off domain, without libvirt starting it.

libvirt runs backup jobs only for running domains. For a shut-off one, virtbackup starts a
private `qemu-system-x86_64 -machine none` that opens nothing but the domain's qcow2 images
(no guest, no devices, no network, no libvirt hooks) and runs the same job over QMP that libvirt
would run: one `transaction` that adds the new checkpoint's persistent bitmap and starts one
`blockdev-backup` per disk into the targets that `Backup.run` pre-created. After a clean `quit`
(which stores the bitmaps in the images) the checkpoint is redefined in libvirt, so the next
backup — online or offline — continues the same chain.

Everything else (plan, targets, metadata, rollback, retiring old checkpoints) is `Backup`'s;
this module only swaps how the job runs. While the private QEMU holds the images' write locks
libvirt cannot start the domain, and if libvirt got there first opening the images fails.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import libvirt
from lxml import etree

from . import checkpoints, host, qemuimg, xmlbuild
from .backup import Backup, BackupResult
from .chain import Chain
from .errors import BackupFailed, HostError, Interrupted, LevelNotPossible, OperationFailed

QEMU_SYSTEM = os.environ.get("VIRTBACKUP_QEMU_SYSTEM", "qemu-system-x86_64")
START_TIMEOUT = 30.0        # greeting + capabilities: QEMU -machine none starts in ~50 ms
COMMAND_TIMEOUT = 120.0     # one QMP command (opening images, the transaction)
QUIT_TIMEOUT = 120.0        # `quit` closes the images: flushes caches, writes the bitmaps


class QMPError(HostError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, desc: str):
        super().__init__(f"QMP {command} failed: {desc}")
        self.command = command
        self.desc = desc


class PrivateQemu:
    """A `qemu-system -machine none` child driven over QMP on its stdin/stdout.

    QMP on stdio (not a unix socket): nothing to wait for or clean up on disk, and no other
    process can connect to it. The child gets its own session so a terminal's Ctrl-C reaches
    only virtbackup (which then quits QEMU cleanly), and - through setpriv, when present -
    SIGTERM if virtbackup itself dies, which QEMU answers with a clean exit: images closed,
    bitmaps stored, locks released.
    """

    def __init__(self, binary: str):
        self.binary = binary
        self.proc: Optional[subprocess.Popen] = None
        self._buf = b""
        self._events: List[Dict[str, Any]] = []
        self._stderr: Optional[IO[bytes]] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        cmd = [self.binary, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
               "-qmp", "stdio"]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, start_new_session=True)
        except OSError as e:
            raise HostError(f"cannot start {self.binary}: {e.strerror}") from None
        greeting = self._read_message(START_TIMEOUT)
        if "QMP" not in greeting:
            raise HostError(f"{self.binary} did not greet with QMP: {greeting}")
        self.execute("qmp_capabilities", timeout=START_TIMEOUT)

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> bool:
        """Quit cleanly (images closed, bitmaps stored); kill only if that fails. True = clean."""
        if self.proc is None:
            return True
        clean = False
        try:
            if self.alive():
                try:
                    self.execute("quit", timeout=QUIT_TIMEOUT)
                except HostError:
                    pass   # EOF before the reply: it may still have exited cleanly
                try:
                    clean = self.proc.wait(QUIT_TIMEOUT) == 0
                except subprocess.TimeoutExpired:
                    clean = False
            else:
                clean = False
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
        return clean

    # -- protocol ----------------------------------------------------------------------------
    def _read_message(self, timeout: Optional[float]) -> Dict[str, Any]:
        """Next JSON message; raises HostError on EOF or timeout. timeout=None: wait forever."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise HostError(f"private QEMU did not answer within {timeout:.0f}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                why = self.stderr_tail()
                raise HostError(f"private QEMU exited (status {self.proc.returncode})"
                                + (f": {why}" if why else ""))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise HostError(f"private QEMU sent something that is not QMP: {line[:200]!r}") from None

    def execute(self, command: str, arguments: Optional[Dict[str, Any]] = None,
                timeout: float = COMMAND_TIMEOUT) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        msg: Dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise HostError(f"private QEMU is gone ({self.stderr_tail() or 'no message'})") from None
        while True:
            reply = self._read_message(timeout)
            if "event" in reply:
                self._events.append(reply)
            elif "error" in reply:
                raise QMPError(command, str(reply["error"].get("desc", reply["error"])))
            elif "return" in reply:
                return reply["return"]

    def next_event(self, timeout: Optional[float]) -> Optional[Dict[str, Any]]:
        """The next asynchronous event, or None when `timeout` passes without one."""
        if self._events:
            return self._events.pop(0)
        assert self.proc is not None and self.proc.stdout is not None
        if b"\n" not in self._buf and timeout is not None:
            ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], timeout)
            if not ready:
                return None
        msg = self._read_message(None)
        return msg if "event" in msg else None


@dataclass(frozen=True)
class JobDisk:
    """One disk's part in the job, read back from the <domainbackup> XML that Backup.run built."""

    target: str          # "vda"
    image: str           # the domain's disk image
    driver: str          # QEMU protocol driver for the image: file | host_device
    dest: Path           # pre-created qcow2 in the .partial point dir
    full: bool           # sync=full (else sync=bitmap from the base checkpoint's bitmap)

    @property
    def src_node(self) -> str:
        return f"src-{self.target}"

    @property
    def dest_node(self) -> str:
        return f"tgt-{self.target}"

    @property
    def job_id(self) -> str:
        return f"backup-{self.target}"


def image_bitmaps(image: str) -> Dict[str, List[str]]:
    """Persistent bitmaps stored in a qcow2 that nobody has open: name -> flags."""
    info = qemuimg.info(Path(image), force_share=True)
    bms = ((info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or []
    return {b["name"]: list(b.get("flags") or []) for b in bms}


def current_checkpoint(dom: libvirt.virDomain) -> Optional[str]:
    """libvirt's current checkpoint, which a new one must name as parent.

    libvirt has no API for it. It is the newest checkpoint created (or redefined) that has not
    been deleted since, and deleting the current one makes its parent current: so it is a leaf,
    and of the leaves the one created last.
    """
    best: Optional[str] = None
    best_time = -1
    for cp in host.call(dom.listAllCheckpoints, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES):
        root = etree.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN).encode())
        created = int(root.findtext("creationTime") or 0)
        if created >= best_time:
            best, best_time = cp.getName(), created
    return best


class OfflineBackup(Backup):
    """Backup.run for a shut-off domain: the job runs in a private QEMU instead of libvirt's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._interrupted: Optional[str] = None
        self._uri = self.conn.getURI()
        self._uuid = self.dom.UUIDString()
        self._own_conn: Optional[libvirt.virConnect] = None

    def _reconnect_if_lost(self) -> None:
        """libvirtd may restart while the private QEMU copies (which it doesn't disturb at all):
        open a new connection rather than lose a finished copy to a dead one."""
        try:
            if self.conn.isAlive():
                return
        except libvirt.libvirtError:
            pass
        self.notify("the connection to libvirtd was lost during the copy; reconnecting")
        self._own_conn = self.conn = host.connect(self._uri)
        try:
            self.dom = host.call(self.conn.lookupByUUIDString, self._uuid)
        except libvirt.libvirtError as e:
            raise BackupFailed(f"domain {self._uuid} vanished during the offline backup: "
                               f"{host.libvirt_message(e)}") from None

    def _inactive_disks(self) -> Dict[str, host.Disk]:
        xml = self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        return {d.target: d for d in host.domain_disks(xml)}

    def _emulator(self) -> str:
        root = etree.fromstring(self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
        emulator = (root.findtext("devices/emulator") or "").strip()
        return emulator if emulator and os.access(emulator, os.X_OK) else QEMU_SYSTEM

    def _refuse_if_started(self) -> None:
        if self.dom.isActive():
            raise OperationFailed(f"domain '{self.dom.name()}' was started during the offline backup; "
                                  "nothing was recorded, run the backup again")

    def _refuse_if_busy(self) -> None:
        """Before planning: an image someone else has open would read as 'in-use' (inconsistent)."""
        self._refuse_if_started()
        for d in self._inactive_disks().values():
            if d.skip_reason() is None and d.source and host.image_in_use(d.source):
                raise OperationFailed(f"disk {d.target} image {d.source} is in use by another process; "
                                      "it cannot be backed up offline now")

    def cleanup_leftovers(self, chain: Chain) -> List[str]:
        self._refuse_if_busy()
        return super().cleanup_leftovers(chain)

    def run(self, chain: Chain, level: str, only: Sequence[str], reason: Optional[str] = None) -> BackupResult:
        self._refuse_if_busy()
        self.notify(f"domain '{self.dom.name()}' is shut off: backing up its images with a private "
                    "QEMU (libvirt does not start the domain)")
        try:
            try:
                result = super().run(chain, level, only, reason)
            except LevelNotPossible as e:
                # QEMU found the base bitmap unusable after the header check passed (it changed
                # in between): the run was rolled back; auto goes on with a new chain, as online
                if level != "auto":
                    raise
                result = super().run(chain, "full", only, reason=f"new chain: {e}")
            return result
        finally:
            if self._own_conn is not None:
                try:
                    self._own_conn.close()
                except libvirt.libvirtError:
                    pass

    # -- the job -----------------------------------------------------------------------------
    def _job_disks(self, bxml: str) -> Tuple[Optional[str], List[JobDisk]]:
        root = etree.fromstring(bxml.encode())
        base = root.findtext("incremental")
        disks = self._inactive_disks()
        out = []
        for el in root.findall("disks/disk"):
            if el.get("backup") == "no":
                continue
            name = el.get("name") or ""
            target_el = el.find("target")
            d = disks.get(name)
            if d is None or not d.source or target_el is None:
                raise BackupFailed(f"disk {name} is no longer part of the domain")
            if d.skip_reason():
                raise BackupFailed(f"disk {name} cannot be backed up offline: {d.skip_reason()}")
            out.append(JobDisk(name, d.source, "host_device" if d.type == "block" else "file",
                               Path(target_el.get("file") or ""), full=base is None or el.get("backupmode") == "full"))
        if not out:
            raise BackupFailed("no disk takes part in the backup")
        return base, out

    def _run_job(self, bxml: str, cxml: str, cp_name: str) -> None:
        base, disks = self._job_disks(bxml)
        self._refuse_if_started()
        for d in disks:
            # A bitmap of this name can only be left by a run that died before recording the
            # point: the name is ours and was never committed.
            if cp_name in image_bitmaps(d.image):
                warn = checkpoints.remove_bitmap_offline(d.image, cp_name)
                if warn:
                    raise BackupFailed(warn)
        # Signals are only noted while QEMU runs and until it has quit: a Ctrl-C must not kill
        # it halfway (a QEMU killed with the images open leaves every bitmap inconsistent).
        with self._signals():
            qemu = PrivateQemu(self._emulator())
            try:
                qemu.start()
                self._open_images(qemu, disks)
                # We hold the images' write locks now: libvirt cannot start the domain until we quit.
                self._refuse_if_started()
                if base is not None:
                    self._check_base_bitmaps(qemu, disks, base)
                self._check_interrupt()
                self._start_jobs(qemu, disks, base, cp_name)
                self._wait_jobs(qemu, [d.job_id for d in disks])
            except BaseException:
                if not qemu.close():
                    self._warn("the private QEMU had to be killed; the images' bitmaps may be inconsistent "
                               "(the next backup then starts a new chain)")
                raise
            if not qemu.close():
                raise BackupFailed("the private QEMU did not exit cleanly; the images' bitmaps may be "
                                   "inconsistent (the next backup then starts a new chain)")
        for d in disks:
            flags = image_bitmaps(d.image).get(cp_name)
            if flags is None or "in-use" in flags or "auto" not in flags:
                raise BackupFailed(f"bitmap {cp_name} was not stored correctly in {d.image}")
        self._redefine(cxml)

    def _start_jobs(self, qemu: PrivateQemu, disks: List[JobDisk], base: Optional[str], cp_name: str) -> None:
        """One transaction, one point in time: the new bitmap on every disk + every copy job.

        bitmap-mode=never: the base bitmap is only read, as libvirt's backups leave it.
        """
        # Optional copy-rate limit in bytes/s per disk (spares a busy host's storage; tests use it
        # to keep a job running long enough to interrupt it).
        speed = int(os.environ.get("VIRTBACKUP_OFFLINE_SPEED", "0") or 0)
        actions: List[Dict[str, Any]] = []
        for d in disks:
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": d.src_node, "name": cp_name, "persistent": True}})
        for d in disks:
            job: Dict[str, Any] = {"job-id": d.job_id, "device": d.src_node, "target": d.dest_node}
            if speed > 0:
                job["speed"] = speed
            if d.full:
                job["sync"] = "full"
            else:
                job.update({"sync": "bitmap", "bitmap": base, "bitmap-mode": "never"})
            actions.append({"type": "blockdev-backup", "data": job})
        try:
            qemu.execute("transaction", {"actions": actions})
        except QMPError as e:
            raise BackupFailed(f"backup could not start: {e.desc}") from None

    def _open_images(self, qemu: PrivateQemu, disks: List[JobDisk]) -> None:
        for d in disks:
            try:
                qemu.execute("blockdev-add", {"driver": "qcow2", "node-name": d.src_node,
                                              "file": {"driver": d.driver, "filename": d.image}})
            except QMPError as e:
                if "lock" in e.desc:
                    self._refuse_if_started()
                    raise OperationFailed(f"disk {d.target} image {d.image} is in use by another process "
                                          f"({e.desc}); it cannot be backed up offline now") from None
                raise BackupFailed(f"cannot open disk {d.target} image {d.image}: {e.desc}") from None
            try:
                qemu.execute("blockdev-add", {"driver": "qcow2", "node-name": d.dest_node, "backing": None,
                                              "file": {"driver": "file", "filename": str(d.dest)}})
            except QMPError as e:
                raise BackupFailed(f"cannot open backup target {d.dest}: {e.desc}") from None

    def _check_base_bitmaps(self, qemu: PrivateQemu, disks: List[JobDisk], base: str) -> None:
        """Re-check the base bitmap as QEMU loaded it (planning read the headers unlocked)."""
        nodes = {n["node-name"]: n for n in qemu.execute("query-named-block-nodes", {"flat": True})}
        for d in disks:
            if d.full:
                continue
            bm = next((b for b in nodes.get(d.src_node, {}).get("dirty-bitmaps", [])
                       if b.get("name") == base), None)
            problem = None
            if bm is None:
                problem = f"bitmap {base} is missing on disk {d.target}"
            elif bm.get("inconsistent"):
                problem = f"bitmap {base} on disk {d.target} is inconsistent (QEMU stopped uncleanly)"
            elif not bm.get("recording"):
                problem = f"bitmap {base} on disk {d.target} is not recording"
            if problem:
                raise LevelNotPossible(f"cannot continue the chain offline: {problem}; take a full backup")

    def _wait_jobs(self, qemu: PrivateQemu, job_ids: List[str]) -> None:
        """Wait for every job's end (no sleeps: blocks on QMP events); first error wins."""
        pending = set(job_ids)
        errors: List[str] = []
        while pending:
            self._check_interrupt()
            ev = qemu.next_event(0.25)
            if ev is None:
                continue
            data = ev.get("data") or {}
            job = data.get("device") or data.get("id")
            if ev.get("event") == "BLOCK_JOB_COMPLETED" and job in pending:
                pending.discard(job)
                if data.get("error"):
                    errors.append(str(data["error"]))
            elif ev.get("event") == "BLOCK_JOB_CANCELLED" and job in pending:
                pending.discard(job)
                errors.append("the job was cancelled")
            if errors and pending:
                # One disk failed: the point is lost anyway; stop the others (quit cancels them).
                break
        if errors:
            raise BackupFailed(f"backup job failed: {errors[0]}")

    def _redefine(self, cxml: str) -> None:
        """Make libvirt know the checkpoint whose bitmaps the job just stored."""
        self._reconnect_if_lost()
        parent = current_checkpoint(self.dom)
        root = etree.fromstring(xmlbuild.redefine_xml(cxml, parent).encode())
        created = etree.SubElement(root, "creationTime")
        created.text = str(int(time.time()))
        try:
            host.call(self.dom.checkpointCreateXML, xmlbuild.to_string(root),
                      libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        except libvirt.libvirtError as e:
            raise BackupFailed(f"cannot redefine checkpoint: {host.libvirt_message(e)}") from None

    # -- signals -----------------------------------------------------------------------------
    def _check_interrupt(self) -> None:
        if self._interrupted:
            self.notify(f"{self._interrupted} received: stopping the offline backup")
            raise Interrupted(f"backup interrupted by {self._interrupted}; nothing was recorded")

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM: note it; the job loop then stops QEMU cleanly and rolls back."""
        with host.signals_noted(lambda name: setattr(self, "_interrupted", name)):
            yield
        self._check_interrupt()
