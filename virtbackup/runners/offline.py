"""The offline runner: backups of a shut-off domain, without libvirt starting it.

libvirt runs backup jobs only for running domains. For a shut-off one, virtbackup starts a
private `qemu-system-x86_64 -machine none` (qmp.PrivateQemu) that opens nothing but the
domain's qcow2 images (no guest, no devices, no network, no libvirt hooks) and runs the same job
over QMP that libvirt would run: one `transaction` that adds the new checkpoint's persistent
bitmap and starts one `blockdev-backup` per disk into the targets the engine pre-created. After
a clean `quit` (which stores the bitmaps in the images) the checkpoint is redefined in libvirt,
so the next backup - online or offline - continues the same chain.

Everything else (plan, targets, metadata, rollback, retiring old checkpoints) is the engine's.
While the private QEMU holds the images' write locks libvirt cannot start the domain, and if
libvirt got there first opening the images fails.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import libvirt
from lxml import etree

from virtbackup import env, observe
from virtbackup.errors import BackupFailed, Interrupted, LevelNotPossible, OperationFailed
from virtbackup.qemu import keys, qemu_img
from virtbackup.qemu.qmp import PrivateQemu, QMPError
from virtbackup.runners.base import Notify, received
from virtbackup.runners.plan import BackupPlan, Transport
from virtbackup.virt import bitmaps, checkpoints, host, xmlbuild
from virtbackup.virt.domxml import DomainXML
from virtbackup.virt.host import DomainHandle

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class JobDisk:
    """One disk's part in the private QEMU's job."""

    target: str          # "vda"
    image: str           # the domain's disk image
    driver: str          # QEMU protocol driver for the image: file | host_device
    dest: Path           # pre-created qcow2 in the .partial point dir
    full: bool           # sync=full (else sync=bitmap from the base checkpoint's bitmap)
    encrypted: bool = False     # the target is LUKS: opened with the key's secret object
    format: str = "qcow2"       # the image's format driver: qcow2, or raw (copied whole, no bitmap)
    compress: bool = False      # the job writes compressed clusters (blockdev-backup compress)

    @property
    def tracks(self) -> bool:
        """The new checkpoint's persistent bitmap goes into this image (qcow2 only)."""
        return self.format == "qcow2"

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
    return bitmaps.header_flags(Path(image))


class OfflineRunner:
    """The copy of a shut-off domain's disks, run by a private QEMU over QMP."""

    transport: Transport = "offline"
    nbd_tls: Optional[bool] = None      # no network crossed

    def __init__(self, handle: DomainHandle, notify: Notify, max_speed: Optional[int] = None,
                 key: Optional[keys.Key] = None):
        self.handle = handle
        self.notify = notify
        self.max_speed = max_speed
        self.key = key                  # of an encrypted chain: the targets are LUKS
        self.interrupted: Optional[str] = None
        self.warnings: List[str] = []
        self.transfer: Dict[str, Dict[str, Any]] = {}     # nothing to report: QEMU copies
        self._qemu: Optional[PrivateQemu] = None
        self._plan: Optional[BackupPlan] = None
        self._disks: List[JobDisk] = []

    # -- checks --------------------------------------------------------------------------------
    def _inactive_disks(self) -> Dict[str, host.Disk]:
        xml = self.handle.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        return {d.target: d for d in host.domain_disks(xml)}

    def _emulator(self) -> str:
        emulator = DomainXML.parse(self.handle.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).emulator
        return emulator if emulator and os.access(emulator, os.X_OK) else env.program("qemu-system")

    def _refuse_if_started(self) -> None:
        if self.handle.dom.isActive():
            raise OperationFailed(f"domain '{self.handle.dom.name()}' was started during the offline backup; "
                                  "nothing was recorded, run the backup again")

    def preflight(self) -> None:
        """Before planning: an image someone else has open would read as 'in-use' (inconsistent)."""
        self._refuse_if_started()
        for d in self._inactive_disks().values():
            if d.skip_reason() is None and d.type in ("file", "block") and d.source \
                    and qemu_img.image_in_use(d.source):
                raise OperationFailed(f"disk {d.target} image {d.source} is in use by another process; "
                                      "it cannot be backed up offline now")

    def interrupt(self, signal_name: str) -> None:
        """Noted; the wait sees it within 0.25 s and QEMU is quit cleanly (never killed)."""
        self.interrupted = signal_name

    def _check_interrupt(self) -> None:
        if self.interrupted:
            self.notify(f"{received(self.interrupted)}: stopping the offline backup")
            raise Interrupted(f"backup {observe.interruption(self.interrupted)}; nothing was recorded")

    def _job_disks(self, plan: BackupPlan) -> List[JobDisk]:
        """The plan's disks as they are defined now (the definition may have changed)."""
        disks = self._inactive_disks()
        out = []
        for dp in plan.disks:
            name = dp.disk.target
            d = disks.get(name)
            if d is None or not d.source:
                raise BackupFailed(f"disk {name} is no longer part of the domain")
            if d.skip_reason():
                raise BackupFailed(f"disk {name} cannot be backed up offline: {d.skip_reason()}")
            if d.offline_reason():
                raise BackupFailed(str(d.offline_reason()))
            if dp.target.encryption is not None and self.key is None:
                raise BackupFailed(f"disk {name}: the target is encrypted but the runner has no key")
            out.append(JobDisk(name, d.source, "host_device" if d.type == "block" else "file",
                               dp.target.path, full=dp.mode == "full",
                               encrypted=dp.target.encryption is not None, format=d.format or "qcow2",
                               compress=dp.target.compression is not None))
        if not out:
            raise BackupFailed("no disk takes part in the backup")
        return out

    # -- the runner protocol ---------------------------------------------------------------------
    def start(self, plan: BackupPlan) -> None:
        self._plan = plan
        self._disks = disks = self._job_disks(plan)
        self._refuse_if_started()
        for d in disks:
            # A bitmap of this name can only be left by a run that died before recording the
            # point: the name is ours and was never committed.
            if d.tracks and plan.checkpoint in image_bitmaps(d.image):
                warn = checkpoints.remove_bitmap_offline(d.image, plan.checkpoint)
                if warn:
                    raise BackupFailed(warn)
        self.notify(f"domain '{self.handle.name}' is shut off: backing up its images with a private "
                    "QEMU (libvirt does not start the domain)")
        # The engine notes signals from here until wait() returns: a Ctrl-C must not kill QEMU
        # halfway (a QEMU killed with the images open leaves every bitmap inconsistent).
        self._qemu = qemu = PrivateQemu(self._emulator())
        qemu.start()
        self._open_images(qemu, disks)
        # We hold the images' write locks now: libvirt cannot start the domain until we quit.
        self._refuse_if_started()
        if plan.base_checkpoint is not None:
            self._check_base_bitmaps(qemu, disks, plan.base_checkpoint)
        self._check_interrupt()
        self._start_jobs(qemu, disks, plan.base_checkpoint, plan.checkpoint)

    def wait(self) -> None:
        assert self._qemu is not None and self._plan is not None
        plan, qemu = self._plan, self._qemu
        self._wait_jobs(qemu, [d.job_id for d in self._disks])
        self._qemu = None
        if not qemu.close():
            raise BackupFailed("the private QEMU did not exit cleanly; the images' bitmaps may be "
                               "inconsistent (the next backup then starts a new chain)")
        for d in self._disks:
            if d.tracks and not bitmaps.stored_ok(Path(d.image), plan.checkpoint):
                raise BackupFailed(f"bitmap {plan.checkpoint} was not stored correctly in {d.image}")
        self._redefine(plan)

    def abort(self) -> bool:
        """Quit the private QEMU cleanly (never a kill unless it hangs)."""
        qemu, self._qemu = self._qemu, None
        if qemu is not None and not qemu.close():
            msg = ("the private QEMU had to be killed; the images' bitmaps may be inconsistent "
                   "(the next backup then starts a new chain)")
            self.warnings.append(msg)
            self.notify(f"warning: {msg}")
        return True

    # -- the job -------------------------------------------------------------------------------
    def _start_jobs(self, qemu: PrivateQemu, disks: List[JobDisk], base: Optional[str], cp_name: str) -> None:
        """One transaction, one point in time: the new bitmap on every disk + every copy job.

        bitmap-mode=never: the base bitmap is only read, as libvirt's backups leave it.
        """
        # Optional copy-rate limit in bytes/s per disk: `backup --max-speed` (spares a busy host's
        # storage); tests also set it through the environment to keep a job running long enough
        # to interrupt it.
        speed = self.max_speed or int(os.environ.get("VIRTBACKUP_OFFLINE_SPEED", "0") or 0)
        actions: List[Dict[str, Any]] = []
        for d in disks:
            if d.tracks:
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": d.src_node, "name": cp_name, "persistent": True}})
        for d in disks:
            job: Dict[str, Any] = {"job-id": d.job_id, "device": d.src_node, "target": d.dest_node}
            if speed > 0:
                job["speed"] = speed
            if d.compress:
                job["compress"] = True      # compressed clusters, the type the target's header says
            if d.full:
                job["sync"] = "full"
            else:
                job.update({"sync": "bitmap", "bitmap": base, "bitmap-mode": "never"})
            actions.append({"type": "blockdev-backup", "data": job})
        try:
            qemu.execute("transaction", {"actions": actions})
        except QMPError as e:
            raise BackupFailed(f"backup could not start: {e.desc}") from e

    def _add_key(self, qemu: PrivateQemu) -> None:
        """The key as a QEMU secret object, read from a 0600 file that exists only for the
        object-add (QMP runs over a pipe that can't pass a descriptor; the logged QMP command
        names the file, never the key)."""
        if self.key is None:
            return
        with keys.key_file(self.key) as path:
            try:
                qemu.execute("object-add", {"qom-type": "secret", "id": keys.SECRET_ID,
                                            "file": str(path), "format": "raw"})
            except QMPError as e:
                raise BackupFailed(f"cannot give the private QEMU the key: {e.desc}") from e

    def _open_images(self, qemu: PrivateQemu, disks: List[JobDisk]) -> None:
        if any(d.encrypted for d in disks):
            self._add_key(qemu)
        for d in disks:
            try:
                qemu.execute("blockdev-add", {"driver": d.format, "node-name": d.src_node,
                                              "file": {"driver": d.driver, "filename": d.image}})
            except QMPError as e:
                if "lock" in e.desc:
                    self._refuse_if_started()
                    raise OperationFailed(f"disk {d.target} image {d.image} is in use by another process "
                                          f"({e.desc}); it cannot be backed up offline now") from e
                raise BackupFailed(f"cannot open disk {d.target} image {d.image}: {e.desc}") from e
            dest: Dict[str, Any] = {"driver": "qcow2", "node-name": d.dest_node, "backing": None,
                                    "file": {"driver": "file", "filename": str(d.dest)}}
            if d.encrypted:
                dest["encrypt"] = {"format": keys.FORMAT, "key-secret": keys.SECRET_ID}
            try:
                qemu.execute("blockdev-add", dest)
            except QMPError as e:
                raise BackupFailed(f"cannot open backup target {d.dest}: {e.desc}") from e

    def _check_base_bitmaps(self, qemu: PrivateQemu, disks: List[JobDisk], base: str) -> None:
        """Re-check the base bitmap as QEMU loaded it (planning read the headers unlocked)."""
        nodes = {n["node-name"]: n for n in qemu.execute("query-named-block-nodes", {"flat": True})}
        found = bitmaps.problem({d.target: bitmaps.from_qmp(nodes.get(d.src_node, {})) for d in disks},
                                [d.target for d in disks if not d.full], base)
        if found:
            raise LevelNotPossible(f"cannot continue the chain offline: {found}; take a full backup")

    def _progress(self, qemu: PrivateQemu, sizes: Dict[str, int]) -> None:
        """Each running job's offset of len (query-block-jobs) as its disk's share of the
        virtual size, a copy event per disk (only asked when someone listens)."""
        try:
            jobs = qemu.execute("query-block-jobs") or []
        except QMPError:
            return
        for j in jobs:
            job, length = str(j.get("device", "")), int(j.get("len") or 0)
            if job in sizes and length > 0:
                disk = job[len("backup-"):]
                observe.emit("copy", disk, sizes[job] * int(j.get("offset") or 0) / length, sizes[job])

    def _wait_jobs(self, qemu: PrivateQemu, job_ids: List[str]) -> None:
        """Wait for every job's end (no sleeps: blocks on QMP events); first error wins."""
        pending = set(job_ids)
        errors: List[str] = []
        plan = self._plan
        sizes = {f"backup-{dp.disk.target}": dp.virtual_size for dp in plan.disks} if plan else {}
        following = observe.listening()
        if following:
            for job_id, size in sizes.items():
                observe.emit("copy", job_id[len("backup-"):], 0, size)
        polled = 0.0
        while pending:
            self._check_interrupt()
            if following and time.monotonic() - polled >= 0.5:
                polled = time.monotonic()
                self._progress(qemu, sizes)
            ev = qemu.next_event(0.25)
            if ev is None:
                continue
            data = ev.get("data") or {}
            job = data.get("device") or data.get("id")
            if ev.get("event") == "BLOCK_JOB_COMPLETED" and job in pending:
                pending.discard(job)
                if data.get("error"):
                    errors.append(str(data["error"]))
                elif job in sizes:
                    observe.finish("copy", str(job)[len("backup-"):], sizes[job])
            elif ev.get("event") == "BLOCK_JOB_CANCELLED" and job in pending:
                pending.discard(job)
                errors.append("the job was cancelled")
            if errors and pending:
                # One disk failed: the point is lost anyway; stop the others (quit cancels them).
                break
        if errors:
            raise BackupFailed(f"backup job failed: {errors[0]}")

    def _redefine(self, plan: BackupPlan) -> None:
        """Make libvirt know the checkpoint whose bitmaps the job just stored.

        libvirtd may have restarted while the private QEMU copied (which it doesn't disturb at
        all): reconnect rather than lose a finished copy to a dead connection."""
        cxml = xmlbuild.checkpoint_xml(plan.checkpoint, plan.description,
                                       {dp.disk.target: dp.tracks for dp in plan.disks})
        created = str(int(time.time()))
        for attempt in (1, 2):
            lost = attempt == 2 or not self.handle.alive()
            if lost:
                self.notify("the connection to libvirtd was lost during the copy; reconnecting")
            try:
                self.handle.reconnect_if_lost(force=attempt == 2)
            except libvirt.libvirtError as e:
                raise BackupFailed(f"domain {self.handle.uuid} vanished during the offline backup: "
                                   f"{host.libvirt_message(e)}") from e
            dom = self.handle.dom
            try:
                if attempt == 2 and checkpoints.lookup(dom, plan.checkpoint) is not None:
                    return      # the first attempt went through; only its reply was lost
                root = etree.fromstring(xmlbuild.redefine_xml(cxml, checkpoints.current(dom)).encode())
                etree.SubElement(root, "creationTime").text = created
                host.call(dom.checkpointCreateXML, xmlbuild.to_string(root),
                          libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
                return
            except libvirt.libvirtError as e:
                # the socket closed before isAlive() knew: once more on a new connection
                if attempt == 1 and host.is_dead_connection(e):
                    continue
                raise BackupFailed(f"cannot redefine checkpoint: {host.libvirt_message(e)}") from e
