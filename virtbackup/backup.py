"""Plan and run one backup of a running domain (push mode, one job for all disks)."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import libvirt

from . import checkpoints, host, qemuimg, xmlbuild
from .chain import (PARTIAL_SUFFIX, POINTS_DIR, BackupDir, Chain, DiskImage, Point, dir_lock, domain_lock,
                    file_sha256, fsync_path, now_iso, write_private)
from .errors import (BackupFailed, ChainCorrupt, DiskNotFound, Interrupted, LevelNotPossible,
                     OperationFailed, UsageError, VirtBackupError)

Notify = Callable[[str], None]


@dataclass
class DiskPlan:
    disk: host.Disk
    virtual_size: int
    backing: Optional[DiskImage]        # image to layer on; None = full copy of this disk
    why_full: Optional[str] = None      # reason a disk is copied whole inside an inc/diff


@dataclass
class Plan:
    level: str                          # full | inc | diff
    base: Optional[Point]               # point whose checkpoint the changes are counted from
    disks: List[DiskPlan]
    skipped: Dict[str, str]             # disk target -> reason it takes no part
    reason: Optional[str] = None        # why auto chose a full


@dataclass
class BackupResult:
    domain: str
    point: Point
    skipped: Dict[str, str]
    removed_checkpoints: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def _bitmap_problem(dom: libvirt.virDomain, disks: Sequence[host.Disk], checkpoint: str) -> Optional[str]:
    """Why the checkpoint's bitmaps can't be trusted on these disks (None = they can)."""
    from . import health
    try:
        by_disk = health.disk_bitmaps(dom, list(disks))
    except VirtBackupError as e:
        return f"cannot inspect bitmaps: {e}"
    return health.bitmap_problem(by_disk, [d.target for d in disks], checkpoint)


def plan_backup(dom: libvirt.virDomain, chain: Optional[Chain], level: str,
                only: Sequence[str] = ()) -> Plan:
    """Decide level, base and per-disk targets. Never plans an incremental from a doubtful bitmap."""
    all_disks = host.domain_disks(dom.XMLDesc(0))
    known = {d.target for d in all_disks}
    for name in only:
        if name not in known:
            raise DiskNotFound(f"domain has no disk '{name}' (disks: {', '.join(sorted(known)) or 'none'})")
    skipped: Dict[str, str] = {}
    chosen: List[host.Disk] = []
    for d in all_disks:
        if only and d.target not in only:
            continue
        why = d.skip_reason()
        if why:
            if d.target in only:
                raise UsageError(f"disk {d.target} cannot be backed up: {why}")
            skipped[d.target] = why
        else:
            chosen.append(d)
    if not chosen:
        raise UsageError("no disk of the domain can be backed up (only qcow2 disks can)")
    sizes = {d.target: host.call(dom.blockInfo, d.target)[0] for d in chosen}

    def full(reason: Optional[str]) -> Plan:
        return Plan("full", None, [DiskPlan(d, sizes[d.target], None) for d in chosen], skipped, reason)

    if level == "full":
        return full(None)

    last = chain.latest if chain else None
    problem: Optional[str] = None
    base: Optional[Point] = None
    tracked: List[str] = []
    if chain is None or last is None:
        problem = "there is no previous backup in this directory"
    else:
        base = last if level in ("inc", "auto") else chain.chain_full(last)
        cp = checkpoints.lookup(dom, base.checkpoint)
        if cp is None:
            problem = f"checkpoint {base.checkpoint} of point {base.id} is not known to libvirt"
        else:
            tracked = checkpoints.tracked_disks(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
            continuing = [d for d in chosen if d.target in base.disks and d.target in tracked]
            problem = _bitmap_problem(dom, continuing, base.checkpoint) if continuing else \
                "no disk of the previous point takes part in this backup"
    if problem:
        if level == "auto":
            return full(f"new chain: {problem}")
        raise LevelNotPossible(f"cannot take a{'n incremental' if level == 'inc' else ' differential'} "
                               f"backup: {problem}; take a full backup (--level full or auto)")
    assert base is not None and chain is not None
    plans = []
    for d in chosen:
        prev = base.disks.get(d.target)
        if prev is None:
            plans.append(DiskPlan(d, sizes[d.target], None, "disk is new since the base point"))
        elif d.target not in tracked:
            # e.g. a prune made this point the chain's base with an older checkpoint that
            # predates the disk: nothing records its changes, so copy it whole
            plans.append(DiskPlan(d, sizes[d.target], None, f"checkpoint {base.checkpoint} does not track it"))
        elif prev.virtual_size != sizes[d.target]:
            plans.append(DiskPlan(d, sizes[d.target], None,
                                  f"disk was resized ({prev.virtual_size} -> {sizes[d.target]} bytes)"))
        else:
            plans.append(DiskPlan(d, sizes[d.target], prev))
    return Plan("inc" if level == "auto" else level, base, plans, skipped)


def _job_gone(dom: libvirt.virDomain) -> bool:
    try:
        if not dom.isActive():
            return True
        return dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    except libvirt.libvirtError:
        return False   # daemon unreachable for now; keep waiting for its answer


def _job_writes_into(dom: libvirt.virDomain, points_dir: Path) -> bool:
    """True when the domain's running backup job writes into points_dir/*.partial: a job of ours."""
    from lxml import etree
    try:
        if _job_gone(dom):
            return False
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False
    dirs = [Path(t.get("file") or "/").parent for t in etree.fromstring(xml.encode()).iterfind("./disks/disk/target")]
    return any(d.parent == points_dir and d.name.endswith(PARTIAL_SUFFIX) for d in dirs)


def _abort_job(conn: libvirt.virConnect, dom: libvirt.virDomain, timeout: float = 60.0,
               watch: Optional[host.JobWatch] = None) -> bool:
    """Abort the domain's job and wait (bounded) until libvirt has ended it; False on timeout.

    `watch`: the caller's open JobWatch (a connection takes one close callback only)."""
    own = watch is None
    w = host.JobWatch(conn, dom) if watch is None else watch
    try:
        w.done.clear()
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass
        return w.wait(lambda: _job_gone(dom), check_every=0.5, timeout=timeout)
    finally:
        if own:
            w.close()


def _completed_stats(dom: libvirt.virDomain, watch: host.JobWatch) -> Dict:
    try:
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        stats = {}
    if not stats or stats.get("type") in (None, libvirt.VIR_DOMAIN_JOB_NONE):
        stats = dict(watch.params)
    return stats


class Backup:
    """One run: plan, pre-create targets, start the job, wait, commit or roll back."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, bdir: BackupDir,
                 notify: Optional[Notify] = None):
        self.conn = conn
        self.dom = dom
        self.bdir = bdir
        self.notify = notify or (lambda _m: None)
        self.warnings: List[str] = []

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.notify(f"warning: {msg}")

    def cleanup_leftovers(self, chain: Chain) -> List[str]:
        """Bring the chain's libvirt state in line before planning (see health.plan_repair).

        Removes what a crashed or killed earlier run left (our unneeded checkpoints, orphaned
        bitmaps, partial dirs) and redefines needed checkpoints that libvirt lost while their
        bitmaps are intact. Broken needed checkpoints stay so that planning reports them.
        """
        from . import health
        removed = []
        if chain.points:
            actions = health.plan_repair(self.dom, chain, fix_broken=False, bdir=self.bdir)
            health.apply_repair(self.dom, self.bdir, chain, actions)
            for a in actions:
                if a.error:
                    self._warn(f"{a.kind} {a.name}: {a.error}")
                else:
                    self.notify(f"{a.kind} {a.name}: {a.reason}")
                    if a.kind == "delete-checkpoint":
                        removed.append(a.name)
        points_dir = self.bdir.path / POINTS_DIR
        if points_dir.is_dir():
            for entry in points_dir.iterdir():
                if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
        return removed

    def run(self, chain: Chain, level: str, only: Sequence[str], reason: Optional[str] = None) -> BackupResult:
        plan = plan_backup(self.dom, chain if chain.points else None, level, only)
        plan.reason = plan.reason or reason
        if plan.reason:
            self.notify(f"full backup: {plan.reason}")
        for disk, why in plan.skipped.items():
            self.notify(f"skipping disk {disk}: {why}")
        for dp in plan.disks:
            if dp.why_full and plan.level != "full":
                self.notify(f"disk {dp.disk.target} copied in full: {dp.why_full}")

        point_id = chain.new_point_id()
        cp_name = chain.checkpoint_name(point_id)
        if checkpoints.lookup(self.dom, cp_name) is not None:
            # Left by a run that died between creating the job and committing: never recorded.
            warn = checkpoints.delete(self.dom, cp_name)
            if warn:
                raise OperationFailed(warn)
        final_dir = self.bdir.point_dir(point_id)
        work_dir = self.bdir.point_dir(point_id, partial=True)
        if point_id in {p.id for p in chain.points} or cp_name in {p.checkpoint for p in chain.points}:
            raise ChainCorrupt(f"chain metadata {self.bdir.metadata} is corrupt: next point id {point_id} "
                               "is already recorded")
        if final_dir.exists():
            # Ids >= next_seq are never recorded: this is a run that died between renaming its
            # images into place and committing. We hold the locks; it is ours to remove.
            self.notify(f"removing {final_dir}, left unrecorded by an interrupted run")
            shutil.rmtree(final_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        try:
            work_dir.mkdir(parents=True, mode=0o700)
            os.chmod(work_dir.parent, 0o700)
        except OSError as e:
            raise OperationFailed(f"cannot create {work_dir}: {e.strerror}") from None

        created = now_iso()
        started = time.monotonic()
        images: Dict[str, DiskImage] = {}
        try:
            bdisks = []
            for dp in plan.disks:
                t = dp.disk.target
                target = work_dir / f"{t}.qcow2"
                image = f"{POINTS_DIR}/{point_id}/{t}.qcow2"
                qemuimg.create(target, dp.virtual_size,
                               self.bdir.backing_link(image, dp.backing.image if dp.backing else None))
                os.chmod(target, 0o600)
                images[t] = DiskImage(
                    image=image,
                    backing=dp.backing.image if dp.backing else None,
                    virtual_size=dp.virtual_size, size=0, sha256="", source=dp.disk.source or "",
                    copied_full=dp.backing is None)
                bdisks.append(xmlbuild.BackupDisk(t, target, full=dp.backing is None))
            bxml = xmlbuild.backup_xml(bdisks, plan.base.checkpoint if plan.base else None)
            cxml = xmlbuild.checkpoint_xml(
                cp_name, f"virtbackup {plan.level} backup {point_id} into {self.bdir.path}",
                {dp.disk.target: True for dp in plan.disks})
            self._run_job(bxml, cxml, cp_name)
            host.wait_released([str(work_dir / f"{t}.qcow2") for t in images])

            cp = checkpoints.lookup(self.dom, cp_name)
            if cp is None:
                raise BackupFailed(f"checkpoint {cp_name} vanished after the backup job")
            write_private(work_dir / "checkpoint.xml", checkpoints.saved_xml(cp))
            write_private(work_dir / "domain.xml", self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            # plain SHA-256 of each image file (checkable with sha256sum); disks hashed in
            # parallel threads (hashlib releases the GIL), one per core at most
            paths = {t: work_dir / f"{t}.qcow2" for t in images}
            with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
                digests = dict(zip(paths, pool.map(file_sha256, paths.values())))
            for t, img in images.items():
                fsync_path(paths[t])
                img.size = paths[t].stat().st_size
                img.sha256 = digests[t]
            os.rename(work_dir, final_dir)
            fsync_path(final_dir.parent)
        except BaseException as exc:
            self._rollback(cp_name, work_dir, final_dir, plan)
            if isinstance(exc, OSError):
                raise OperationFailed(f"backup failed: {exc}") from None
            raise

        base = plan.base
        point = Point(
            id=point_id, level=plan.level, created=created, checkpoint=cp_name,
            base_checkpoint=base.checkpoint if base else None,
            parent=base.id if base else None,
            chain=point_id if plan.level == "full" else chain.chain_full(base).id,  # type: ignore[arg-type]
            disks=images, domain_xml=f"{POINTS_DIR}/{point_id}/domain.xml",
            checkpoint_xml=f"{POINTS_DIR}/{point_id}/checkpoint.xml", reason=plan.reason,
            duration=round(time.monotonic() - started, 3))
        chain.points.append(point)
        chain.next_seq += 1
        held: List[str] = []
        try:
            with host.signals_noted(held.append):   # a signal can't cut the commit in half
                self.bdir.save(chain)   # the commit
        except BaseException:
            chain.points.pop()
            chain.next_seq -= 1
            self._rollback(cp_name, work_dir, final_dir, plan)
            raise
        if held:
            self._warn(f"{held[0]} arrived while point {point_id} was being recorded; the point is complete")

        # Recorded. Nothing from here on may turn the run into a failure.
        removed: List[str] = []
        try:
            needed = set(chain.needed_checkpoints())
            # a shut-off domain: libvirt drops only the metadata; delete() takes the bitmaps
            # out of every disk's image
            from .health import eligible_disks
            sources = [d.source for d in eligible_disks(self.dom) if d.source]
            for name in checkpoints.ours(self.dom, chain.checkpoint_prefix()):
                if name not in needed:
                    warn = checkpoints.delete(self.dom, name, sources)
                    if warn:
                        self._warn(warn)
                    else:
                        removed.append(name)
        except (KeyboardInterrupt, libvirt.libvirtError, VirtBackupError) as e:
            self._warn(f"point {point_id} is recorded, but retiring old checkpoints stopped "
                       f"({e or 'interrupted'}); the next run finishes it")
        return BackupResult(self.dom.name(), point, plan.skipped, removed, self.warnings)

    def _run_job(self, bxml: str, cxml: str, cp_name: str) -> None:
        if not _job_gone(self.dom):
            if _job_writes_into(self.dom, self.bdir.path / POINTS_DIR):
                # Left by a run of this directory that was killed mid-job (we hold its locks now):
                # nobody will read what it writes, and it blocks ours.
                self.notify("aborting the backup job left by an interrupted run")
                if not _abort_job(self.conn, self.dom):
                    raise BackupFailed("the backup job left by an interrupted run did not end within 60 s")
            else:
                try:
                    op = self.dom.jobStats().get("operation")
                except libvirt.libvirtError:
                    op = None
                names = {getattr(libvirt, n): n[25:].lower().replace("_", " ")
                         for n in dir(libvirt) if n.startswith("VIR_DOMAIN_JOB_OPERATION_")}
                raise BackupFailed(f"another job ({names.get(op, 'unknown')}) is running on domain "
                                   f"'{self.dom.name()}'; try again when it has ended")
        watch = host.JobWatch(self.conn, self.dom)
        try:
            with host.signals_noted(watch.interrupt):   # wake the wait: abort, roll back
                try:
                    host.call(self.dom.backupBegin, bxml, cxml, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
                except libvirt.libvirtError as e:
                    raise BackupFailed(f"backup could not start: {host.libvirt_message(e)}") from None
                watch.wait(lambda: _job_gone(self.dom))
                if watch.interrupted:
                    self.notify(f"{watch.interrupted} received: aborting the backup job")
                    _abort_job(self.conn, self.dom, watch=watch)
                    raise Interrupted(f"backup interrupted by {watch.interrupted}; nothing was recorded")
            stats = _completed_stats(self.dom, watch)
        finally:
            watch.close()
        jtype = stats.get("type")
        if jtype == libvirt.VIR_DOMAIN_JOB_COMPLETED and stats.get("success", True):
            return
        try:
            stopped = not self.dom.isActive()
        except libvirt.libvirtError:
            stopped = False
        cause = "the domain stopped during the backup" if stopped else watch.reason
        errmsg = "; ".join(m for m in (cause, stats.get("errmsg")) if m) or {
            libvirt.VIR_DOMAIN_JOB_CANCELLED: "the job was cancelled"}.get(
            jtype, "libvirt reported no outcome for the job")  # type: ignore[arg-type]
        raise BackupFailed(f"backup job failed: {errmsg}")

    def _rollback(self, cp_name: str, work_dir: Path, final_dir: Path, plan: Plan) -> None:
        """Undo one failed run: its checkpoint (and bitmaps), its images. Older points stay intact.

        After a libvirtd restart the connection is dead but the domain and our job live on in the
        new daemon: reconnect. Only a job writing into our directory is aborted, and it has ended
        before its checkpoint is deleted.
        """
        conn, dom, fresh = self.conn, self.dom, None
        try:
            alive = conn.isAlive() == 1
        except libvirt.libvirtError:
            alive = False
        try:
            if not alive:
                try:
                    conn = fresh = host.connect(conn.getURI())
                    dom = conn.lookupByUUIDString(dom.UUIDString())
                except (VirtBackupError, libvirt.libvirtError) as e:
                    self._warn(f"could not delete checkpoint {cp_name}: libvirtd unreachable "
                               f"({host.libvirt_message(e)}) (the next run removes it)")
                    return
            if _job_writes_into(dom, self.bdir.path / POINTS_DIR) and not _abort_job(conn, dom):
                self._warn(f"the backup job still runs after it was aborted; not deleting checkpoint {cp_name} "
                           "(the next run removes it)")
                return
            # the failed run's bitmap exists only on the disks it backed up
            sources = [dp.disk.source for dp in plan.disks if dp.disk.source]
            try:
                warn = checkpoints.delete(dom, cp_name, sources)
            except libvirt.libvirtError as e:
                warn = f"could not delete checkpoint {cp_name}: {host.libvirt_message(e)}"
            if warn:
                self._warn(warn + " (the next run removes it)")
        finally:
            for d in (work_dir, final_dir):
                shutil.rmtree(d, ignore_errors=True)
            if fresh is not None:
                try:
                    fresh.close()
                except libvirt.libvirtError:
                    pass


def backup(uri: Optional[str], domain: str, backup_dir: Path, level: str = "auto",
           disks: Sequence[str] = (), notify: Optional[Notify] = None) -> BackupResult:
    if level not in ("auto", "full", "inc", "diff"):
        raise UsageError(f"unknown level '{level}' (auto, full, inc, diff)")
    bdir = BackupDir(backup_dir)
    must_create = bdir.check_usable()
    existing = bdir.load_or_none()          # corrupt metadata -> exit 2 before libvirt is touched
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, domain)
        uuid = dom.UUIDString()
        if existing is not None:
            bdir.check_owner(existing, dom.name(), uuid)
        with domain_lock(uuid):
            if must_create:
                bdir.create()
            with dir_lock(bdir):
                chain = bdir.load_or_none() or Chain(domain_name=dom.name(), domain_uuid=uuid)
                bdir.check_owner(chain, dom.name(), uuid)
                chain.domain_name = dom.name()
                chain.path = str(bdir.path)
                if dom.isActive():
                    job = Backup(conn, dom, bdir, notify)
                else:   # shut off: same plan and metadata, the job runs in a private QEMU (offline.py)
                    from .offline import OfflineBackup
                    job = OfflineBackup(conn, dom, bdir, notify)
                job.cleanup_leftovers(chain)
                return job.run(chain, level, disks)
