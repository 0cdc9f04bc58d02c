"""The push runner: one libvirt push backup job for all disks of a running domain.

libvirt starts QEMU's blockdev-backup jobs into the targets the engine pre-created
(REUSE_EXTERNAL) and creates the plan's checkpoint at the same instant. The job's end is
waited for through libvirt events (host.JobWatch), never by sleeping.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import libvirt
from lxml import etree

from . import host, monitor, qemuimg, xmlbuild
from .chain import PARTIAL_SUFFIX
from .errors import BackupFailed, HostError, Interrupted
from .host import DomainHandle
from .plan import BackupPlan, Transport
from .runner import Notify

if TYPE_CHECKING:
    from .quiesce import Quiescer

log = logging.getLogger(__name__)


def job_gone(dom: libvirt.virDomain) -> bool:
    """No job runs on the domain any more (or the domain stopped)."""
    try:
        if not dom.isActive():
            return True
        return bool(dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False   # daemon unreachable for now; keep waiting for its answer


def job_writes_into(dom: libvirt.virDomain, points_dir: Path, prefix: Optional[str] = None) -> bool:
    """True when the domain's running backup job is one of ours: a push job writing into
    points_dir/*.partial, or (given the chain's checkpoint `prefix`) a pull job whose scratch
    files carry one of the chain's checkpoint names (pull.scratch_path)."""
    try:
        if job_gone(dom):
            return False
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False
    root = etree.fromstring(xml.encode())
    if root.get("mode") == "pull":
        return bool(prefix) and any(str(prefix) in Path(s.get("file") or "").name
                                    for s in root.iterfind("./disks/disk/scratch"))
    dirs = [Path(t.get("file") or "/").parent for t in root.iterfind("./disks/disk/target")]
    return any(d.parent == points_dir and d.name.endswith(PARTIAL_SUFFIX) for d in dirs)


def checkpoint_prefix(checkpoint: str) -> str:
    """The chain's checkpoint prefix (`virtbackup-<dir id>-`) of one of its checkpoint names."""
    return checkpoint[:len(checkpoint) - len(checkpoint.rsplit("-", 1)[-1])]


def abort_job(conn: libvirt.virConnect, dom: libvirt.virDomain, timeout: float = 60.0,
              watch: Optional[host.JobWatch] = None) -> bool:
    """Abort the domain's job and wait (bounded) until libvirt has ended it; False on timeout.

    `watch`: the caller's open JobWatch (a connection takes one close callback only)."""
    own = watch is None
    w = host.JobWatch(conn, dom) if watch is None else watch
    try:
        w.done.clear()
        log.debug("libvirt abortJob(%s)", dom.name())
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass
        return w.wait(lambda: job_gone(dom), check_every=0.5, timeout=timeout)
    finally:
        if own:
            w.close()


def _completed_stats(dom: libvirt.virDomain, watch: host.JobWatch) -> Dict[str, Any]:
    try:
        stats: Dict[str, Any] = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        stats = {}
    if not stats or stats.get("type") in (None, libvirt.VIR_DOMAIN_JOB_NONE):
        stats = dict(watch.params)
    return stats


def _operation_name(op: Optional[int]) -> str:
    names = {getattr(libvirt, n): n[25:].lower().replace("_", " ")
             for n in dir(libvirt) if n.startswith("VIR_DOMAIN_JOB_OPERATION_")}
    return names.get(op, "unknown") if op is not None else "unknown"


class PushRunner:
    """libvirt push mode: backupBegin with REUSE_EXTERNAL targets, events for the end."""

    transport: Transport = "push"

    def __init__(self, handle: DomainHandle, points_dir: Path, notify: Notify, quiesce: Optional["Quiescer"] = None,
                 max_speed: Optional[int] = None):
        self.handle = handle
        self.points_dir = points_dir
        self.notify = notify
        self.quiesce = quiesce          # freezes the guest for backupBegin (quiesce.py)
        self.max_speed = max_speed      # bytes/s per disk (block-job-set-speed)
        self.interrupted: Optional[str] = None
        self.warnings: List[str] = []
        self._watch: Optional[host.JobWatch] = None
        self._plan: Optional[BackupPlan] = None

    def preflight(self) -> None:
        """Nothing to refuse before planning: a foreign job is refused at start."""

    def interrupt(self, signal_name: str) -> None:
        self.interrupted = signal_name
        if self._watch is not None:
            self._watch.interrupt(signal_name)

    def _clear_leftover_job(self) -> None:
        dom = self.handle.dom
        if job_gone(dom):
            return
        prefix = checkpoint_prefix(self._plan.checkpoint) if self._plan else None
        if job_writes_into(dom, self.points_dir, prefix):
            # Left by a run of this directory that was killed mid-job (we hold its locks now):
            # nobody will read what it writes, and it blocks ours.
            self.notify("aborting the backup job left by an interrupted run")
            if not abort_job(self.handle.conn, dom):
                raise BackupFailed("the backup job left by an interrupted run did not end within 60 s")
            return
        try:
            op = dom.jobStats().get("operation")
        except libvirt.libvirtError:
            op = None
        raise BackupFailed(f"another job ({_operation_name(op)}) is running on domain "
                           f"'{dom.name()}'; try again when it has ended")

    def start(self, plan: BackupPlan) -> None:
        self._plan = plan
        self._clear_leftover_job()
        bxml = xmlbuild.backup_xml(
            [xmlbuild.BackupDisk(dp.disk.target, dp.target.path, full=dp.mode == "full",
                                 encryption=dp.target.encryption) for dp in plan.disks],
            plan.base_checkpoint)
        cxml = xmlbuild.checkpoint_xml(plan.checkpoint, plan.description,
                                       {dp.disk.target: True for dp in plan.disks})
        if self.interrupted:
            raise Interrupted(f"backup interrupted by {self.interrupted}; nothing was recorded")
        self._watch = host.JobWatch(self.handle.conn, self.handle.dom)
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
        per domain). QEMU applies it from the next chunk on: what it copied in the few ms before
        (and the rate limiter's first slice) goes at full speed. A job that already finished
        needs no limit."""
        dom = self.handle.dom
        try:
            jobs = monitor.qmp(dom, "query-block-jobs") or []
            for j in jobs:
                if j.get("type") == "backup":
                    monitor.qmp(dom, "block-job-set-speed", {"device": j["device"], "speed": speed})
                    log.info("copy of %s limited to %d bytes/s", j["device"], speed)
        except HostError as e:
            if job_gone(dom):
                return
            self.warnings.append(f"could not limit the copy speed: {e}")
            log.warning("could not limit the copy speed: %s", e)

    def wait(self) -> None:
        assert self._watch is not None and self._plan is not None
        watch, dom = self._watch, self.handle.dom
        try:
            watch.wait(lambda: job_gone(dom))
            if watch.interrupted:
                self.notify(f"{watch.interrupted} received: aborting the backup job")
                abort_job(self.handle.conn, dom, watch=watch)
                raise Interrupted(f"backup interrupted by {watch.interrupted}; nothing was recorded")
            stats = _completed_stats(dom, watch)
        finally:
            watch.close()
            self._watch = None
        log.debug("job stats %s", stats)
        jtype = stats.get("type")
        if jtype == libvirt.VIR_DOMAIN_JOB_COMPLETED and stats.get("success", True):
            qemuimg.wait_released([str(dp.target.path) for dp in self._plan.disks])
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
