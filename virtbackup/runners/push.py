"""The push runner: one libvirt push backup job for all disks of a running domain.

libvirt starts QEMU's blockdev-backup jobs into the targets the engine pre-created
(REUSE_EXTERNAL) and creates the plan's checkpoint at the same instant. The job's end is
waited for through libvirt events (host.JobWatch), never by sleeping.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import libvirt

from virtbackup import observe
from virtbackup.errors import BackupFailed, HostError, Interrupted
from virtbackup.qemu import qemu_img
from virtbackup.runners.base import (
    Notify,
    abort_job,
    checkpoint_prefix,
    clear_leftover_job,
    completed_stats,
    job_gone,
    job_writes_into,
    received,
)
from virtbackup.runners.plan import BackupPlan, Transport
from virtbackup.virt import host, monitor, xmlbuild
from virtbackup.virt.host import DomainHandle

if TYPE_CHECKING:
    from virtbackup.virt.quiesce import Quiescer

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5      # progress: how often each disk's copy job is asked where it is


class PushRunner:
    """libvirt push mode: backupBegin with REUSE_EXTERNAL targets, events for the end."""

    transport: Transport = "push"
    nbd_tls: Optional[bool] = None      # no network crossed

    def __init__(self, handle: DomainHandle, points_dir: Path, notify: Notify, quiesce: Optional["Quiescer"] = None,
                 max_speed: Optional[int] = None):
        self.handle = handle
        self.points_dir = points_dir
        self.notify = notify
        self.quiesce = quiesce          # freezes the guest for backupBegin (quiesce.py)
        self.max_speed = max_speed      # bytes/s per disk (block-job-set-speed)
        self.interrupted: Optional[str] = None
        self.warnings: List[str] = []
        self.transfer: Dict[str, Dict[str, Any]] = {}     # nothing to report: QEMU copies
        self._watch: Optional[host.JobWatch] = None
        self._plan: Optional[BackupPlan] = None

    def preflight(self) -> None:
        """Nothing to refuse before planning: a foreign job is refused at start."""

    def interrupt(self, signal_name: str) -> None:
        self.interrupted = signal_name
        if self._watch is not None:
            self._watch.interrupt(signal_name)

    def start(self, plan: BackupPlan) -> None:
        self._plan = plan
        clear_leftover_job(self.handle.conn, self.handle.dom, self.points_dir, checkpoint_prefix(plan.checkpoint),
                           self.notify)
        bxml = xmlbuild.backup_xml(
            [xmlbuild.BackupDisk(dp.disk.target, dp.target.path, full=dp.mode == "full",
                                 encryption=dp.target.encryption) for dp in plan.disks],
            plan.base_checkpoint)
        cxml = xmlbuild.checkpoint_xml(plan.checkpoint, plan.description,
                                       {dp.disk.target: dp.tracks for dp in plan.disks})
        if self.interrupted:
            raise Interrupted(f"backup {observe.interruption(self.interrupted)}; nothing was recorded")
        self._watch = host.JobWatch(self.handle.conn, self.handle.dom)
        if self.interrupted:            # arrived while the watch was made: the wait must see it
            self._watch.interrupt(self.interrupted)
        try:
            # frozen right before the point in time, thawed as soon as backupBegin has fixed it
            with self.quiesce.frozen(self.handle.dom) if self.quiesce else nullcontext():
                host.call(self.handle.dom.backupBegin, bxml, cxml, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        except libvirt.libvirtError as e:
            raise BackupFailed(f"backup could not start: {host.libvirt_message(e)}") from e
        if self.max_speed:
            self._limit_speed(self.max_speed)

    def _limit_speed(self, speed: int) -> None:
        """Bound each disk's copy to `speed` bytes/s: libvirt has no speed in its backup API, so
        QMP `block-job-set-speed` on the backup jobs it started (found through
        `query-block-jobs`; only backup jobs run while our backup does: libvirt allows one job
        per domain). QEMU applies it to the copy requests it starts after it: block-copy starts
        its first requests (up to 64, of 1 MiB or, with copy_file_range, more) at once when the
        job starts, and those go at full speed. A job that already finished needs no limit."""
        dom = self.handle.dom
        try:
            jobs = [j for j in monitor.qmp(dom, "query-block-jobs") or [] if j.get("type") == "backup"]
            for j in jobs:
                monitor.qmp(dom, "block-job-set-speed", {"device": j["device"], "speed": speed})
                log.info("copy of %s limited to %d bytes/s", j["device"], speed)
        except HostError as e:
            if job_gone(dom):
                return
            self.warnings.append(f"could not limit the copy speed: {e}")
            log.warning("could not limit the copy speed: %s", e)

    def _follow(self, plan: BackupPlan) -> threading.Event:
        """Copy progress events while the job runs (only when someone listens): each disk's
        QEMU backup job ("backup-<disk>-<node>", query-block-jobs: offset of len) as its share
        of the disk's virtual size; libvirt's own job statistics only sum all disks. Set the
        returned event to stop."""
        stop = threading.Event()
        sizes = {dp.disk.target: dp.virtual_size for dp in plan.disks}
        for disk, size in sizes.items():
            observe.emit("copy", disk, 0, size)
        dom = self.handle.dom

        def poll() -> None:
            while not stop.wait(POLL_SECONDS):
                try:
                    jobs = monitor.qmp(dom, "query-block-jobs") or []
                except HostError:
                    continue        # e.g. the job just ended; the wait says how
                for j in jobs:
                    device, length = str(j.get("device", "")), int(j.get("len") or 0)
                    disk = next((d for d in sizes if device.startswith(f"backup-{d}-")), None)
                    if disk is not None and length > 0 and not stop.is_set():
                        observe.emit("copy", disk, sizes[disk] * int(j.get("offset") or 0) / length, sizes[disk])

        observe.thread(poll, "progress").start()
        return stop

    def wait(self) -> None:
        assert self._watch is not None and self._plan is not None
        watch, dom = self._watch, self.handle.dom
        following = self._follow(self._plan) if observe.listening() else None
        try:
            watch.wait(lambda: job_gone(dom))
            if watch.io_paused and not job_gone(dom):
                # the guest is paused until the job is gone: end it now (the engine resumes it)
                abort_job(self.handle.conn, dom, watch=watch)
                raise BackupFailed(f"backup job failed: {watch.reason}")
            if watch.interrupted:
                self.notify(f"{received(watch.interrupted)}: aborting the backup job")
                abort_job(self.handle.conn, dom, watch=watch)
                raise Interrupted(f"backup {observe.interruption(watch.interrupted)}; nothing was recorded")
            stats = completed_stats(dom, watch)
        finally:
            if following is not None:
                following.set()
            watch.close()
            self._watch = None
        log.debug("job stats %s", stats)
        jtype = stats.get("type")
        if jtype == libvirt.VIR_DOMAIN_JOB_COMPLETED and stats.get("success", True):
            qemu_img.wait_released([str(dp.target.path) for dp in self._plan.disks])
            for dp in self._plan.disks:
                observe.finish("copy", dp.disk.target, dp.virtual_size)
            self._compress(self._plan)
            return
        try:
            stopped = not dom.isActive()
        except libvirt.libvirtError:
            stopped = False
        cause = "the domain stopped during the backup" if stopped else watch.reason
        errmsg = "; ".join(m for m in (cause, stats.get("errmsg")) if m) or {
            libvirt.VIR_DOMAIN_JOB_CANCELLED: "the job was cancelled"}.get(
            int(jtype or 0), "libvirt reported no outcome for the job")
        raise BackupFailed(f"backup job failed: {errmsg}")

    def _compress(self, plan: BackupPlan) -> None:
        """libvirt's backup job writes plain clusters: a compressed chain's targets are rewritten
        as compressed clusters (qemu_img.recompress: a twin renamed over the target) once the
        job has released them, before the engine hashes and records anything; a failure or a
        cancel leaves nothing the rollback of the .partial dir does not remove."""
        for dp in plan.disks:
            t = dp.target
            if t.compression is None:
                continue
            if self.interrupted:
                raise Interrupted(f"backup {observe.interruption(self.interrupted)}; nothing was recorded")
            try:
                qemu_img.recompress(t.path, t.compression)
            except (HostError, OSError) as e:
                raise BackupFailed(f"disk {dp.disk.target}: compressing the copy failed: {e}") from e
            log.info("disk %s: compressed (%s)", dp.disk.target, t.compression)

    def abort(self) -> bool:
        """After libvirtd restarted the connection is dead but the domain and our job live on in
        the new daemon: reconnect first. Only a job writing into our directory is aborted."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        try:
            self.handle.reconnect_if_lost()
        except Exception as e:   # noqa: BLE001 - abort never raises; the caller reports
            log.warning("cannot reconnect to abort the job: %s", host.libvirt_message(e))
            return False
        dom = self.handle.dom
        if job_writes_into(dom, self.points_dir, checkpoint_prefix(self._plan.checkpoint) if self._plan else None):
            return abort_job(self.handle.conn, dom)
        return True
