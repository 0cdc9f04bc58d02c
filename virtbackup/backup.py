"""The backup engine: plan, prepare targets, run the copy through a runner, commit or roll back.

One engine for every way the copy runs (runners/base.py): planning (runners/plan.py), target preparation,
the commit protocol (images complete -> checkpoint XML and domain XML saved -> hashed, fsynced ->
partial directory renamed -> metadata written atomically), rollback and retiring old
checkpoints happen here, once. Which runner: a running domain gets the libvirt push job
(runners/push.py) or, in pull mode, the pull job (runners/pull.py); a shut-off one a private QEMU
(runners/offline.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import libvirt

from virtbackup import health, observe
from virtbackup.errors import (
    BackupFailed,
    ChainCorrupt,
    Interrupted,
    LevelNotPossible,
    OperationFailed,
    UsageError,
    VirtBackupError,
)
from virtbackup.options import (
    BACKUP_MODES,
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    QUIESCE_MODES,
    REQUESTED_LEVELS,
    RequestedLevel,
    has_control_chars,
)
from virtbackup.qemu import keys, qemu_img
from virtbackup.runners.base import Notify, Runner
from virtbackup.runners.offline import OfflineRunner
from virtbackup.runners.plan import BackupPlan, plan_backup
from virtbackup.runners.push import PushRunner
from virtbackup.store import crypto, runlog
from virtbackup.store.chain import (
    PARTIAL_SUFFIX,
    POINTS_DIR,
    BackupDir,
    Chain,
    DiskImage,
    Point,
    dir_lock,
    domain_lock,
    fsync_path,
    now_iso,
    point_json,
    write_private,
)
from virtbackup.store.digest import Digest
from virtbackup.virt import checkpoints, host, keysecret, xmlbuild
from virtbackup.virt.domain import LibvirtDomain, eligible_disks
from virtbackup.virt.host import DomainHandle
from virtbackup.virt.quiesce import Quiescer, recover

if TYPE_CHECKING:
    from virtbackup.runners.pull import PullRunner

log = logging.getLogger(__name__)


@dataclass
class BackupResult:
    """What one backup recorded."""

    domain: str
    point: Point
    skipped: Dict[str, str]                     # disk -> why it took no part
    removed_checkpoints: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    transfer: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # pull: per disk bytes read/written
    transport_reason: str = ""                  # why the point's transport was the one used

    def to_json(self) -> Dict[str, Any]:
        """{"domain", "point": {...point record, "size"}, "skipped", "removed_checkpoints",
        "warnings", "transfer", "transport_reason"} (the `backup --json` output)."""
        return {"domain": self.domain, "point": point_json(self.point), "skipped": self.skipped,
                "removed_checkpoints": self.removed_checkpoints, "warnings": self.warnings,
                "transfer": self.transfer, "transport_reason": self.transport_reason}


class Engine:
    """One run: plan, pre-create targets, let the runner copy, commit or roll back."""

    def __init__(self, handle: DomainHandle, bdir: BackupDir, runner: Runner, notify: Optional[Notify] = None,
                 quiesce: Optional[Quiescer] = None, key: Optional[keys.Key] = None,
                 iter_time: int = keys.DEFAULT_ITER_TIME_MS, compression: Optional[str] = None):
        self.handle = handle
        self.bdir = bdir
        self.runner = runner
        self.notify: Notify = notify or (lambda _m: None)
        self.warnings: List[str] = []
        self.quiesce = quiesce          # records the point's consistency (the runner freezes)
        self.key = key                  # set: every target is LUKS-encrypted with it
        self.iter_time = iter_time      # the chain's LUKS key derivation time
        self.compression = compression  # "zstd" | "zlib": every target holds compressed clusters
        self._paused_before = False     # the guest was paused by an I/O error before our job
        # --mode auto: given the plan, the runner to use instead of this one and why (the pull
        # cannot run here: push), or None; asked before anything is created
        self.fallback: Optional[Callable[[BackupPlan], Optional[Tuple[Runner, str]]]] = None
        self.fell_back: Optional[str] = None

    def _compressed(self, plan: BackupPlan) -> BackupPlan:
        """The plan with every target holding compressed clusters of the chain's type."""
        if self.compression is None:
            return plan
        if self.key is not None:
            raise UsageError("an encrypted chain cannot be compressed (QEMU writes no compressed "
                             "clusters into a LUKS qcow2)")
        return replace(plan, disks=tuple(replace(dp, target=replace(dp.target, compression=self.compression))
                                         for dp in plan.disks))

    def _encrypted(self, plan: BackupPlan) -> BackupPlan:
        """The plan with every target LUKS-encrypted, keyed by a libvirt secret of this UUID
        (defined only while the job runs, see _job_secret)."""
        if self.key is None:
            return plan
        enc = xmlbuild.Encryption(keys.FORMAT, str(uuidlib.uuid4()), self.iter_time)
        return replace(plan, disks=tuple(replace(dp, target=replace(dp.target, encryption=enc))
                                         for dp in plan.disks))

    @contextmanager
    def _job_secret(self, plan: BackupPlan) -> Iterator[None]:
        """The ephemeral libvirt secret a push job opens the encrypted targets with: defined
        just before the job starts, undefined when it has ended, whatever happened."""
        enc = plan.disks[0].target.encryption if plan.disks else None
        if self.key is None or enc is None or self.runner.transport != "push":
            yield
            return
        with keysecret.libvirt_secret(self.handle.conn, self.key,
                                      f"backup {plan.point_id} of {self.handle.name} into {self.bdir.path}",
                                      secret_uuid=enc.secret_uuid):
            yield

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        self.notify(msg)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log.warning("%s", msg)
        self.notify(f"warning: {msg}")

    def cleanup_leftovers(self, chain: Chain) -> List[str]:
        """Bring the chain's libvirt state in line before planning (see health.plan_repair).

        Removes what a crashed or killed earlier run left (our unneeded checkpoints, orphaned
        bitmaps, partial dirs) and redefines needed checkpoints that libvirt lost while their
        bitmaps are intact. Broken needed checkpoints stay so that planning reports them.
        """
        if self.fallback is None:       # else _run asks once the runner is settled
            self.runner.preflight()
        removed = []
        dom = self.handle.dom
        if chain.points or checkpoints.ours(dom, chain.checkpoint_prefix()):
            # (no points: only what a first backup killed before its commit can be left)
            actions = health.plan_repair(LibvirtDomain(dom), chain, fix_broken=False, bdir=self.bdir)
            health.apply_repair(dom, self.bdir, chain, actions)
            for a in actions:
                if a.error:
                    self._warn(f"{a.kind} {a.name}: {a.error}")
                else:
                    self._say(f"{a.kind} {a.name}: {a.reason}")
                    if a.kind == "delete-checkpoint":
                        removed.append(a.name)
        points_dir = self.bdir.path / POINTS_DIR
        if points_dir.is_dir():
            from virtbackup.qemu import nbdcopy
            for pid in nbdcopy.servers_of(points_dir):
                try:
                    os.kill(pid, signal.SIGTERM)
                    self._say(f"ended qemu-nbd (pid {pid}), a pull target server left by an interrupted run")
                except OSError:
                    pass
            for entry in points_dir.iterdir():
                if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
        return removed

    def run(self, chain: Chain, level: RequestedLevel, only: Sequence[str] = (),
            reason: Optional[str] = None) -> BackupResult:
        """Plan and take one backup; auto falls back to a full when the runner finds the base
        bitmap unusable after planning (e.g. it changed between the check and the job).
        `reason`: why the caller asked for this level (recorded with the point)."""
        if self.fallback is None:       # else _run asks once the runner is settled
            self.runner.preflight()
        try:
            return self._run(chain, level, only, reason)
        except LevelNotPossible as e:
            if level != "auto":
                raise
            return self._run(chain, "full", only, f"new chain: {e}")

    def _prepare(self, chain: Chain, plan: BackupPlan) -> None:
        """Empty targets for the runner, in points/NNNN.partial (mode 0700, images 0600)."""
        dom = self.handle.dom
        if checkpoints.lookup(dom, plan.checkpoint) is not None:
            # Left by a run that died between creating the job and committing: never recorded.
            warn = checkpoints.delete(dom, plan.checkpoint)
            if warn:
                raise OperationFailed(warn)
        if plan.point_id in {p.id for p in chain.points} or plan.checkpoint in {p.checkpoint for p in chain.points}:
            raise ChainCorrupt(f"chain metadata {self.bdir.metadata} is corrupt: next point id {plan.point_id} "
                               "is already recorded")
        if plan.final_dir.exists():
            # Ids >= next_seq are never recorded: this is a run that died between renaming its
            # images into place and committing. We hold the locks; it is ours to remove.
            self._say(f"removing {plan.final_dir}, left unrecorded by an interrupted run")
            shutil.rmtree(plan.final_dir)
        shutil.rmtree(plan.work_dir, ignore_errors=True)
        try:
            plan.work_dir.mkdir(parents=True, mode=0o700)
            os.chmod(plan.work_dir.parent, 0o700)
        except OSError as e:
            raise OperationFailed(f"cannot create {plan.work_dir}: {e.strerror}") from e

    def _create_targets(self, plan: BackupPlan) -> None:
        """Empty target images. An encrypted one costs ~2 s of CPU in qemu-img's LUKS set-up
        whatever the iter-time (it calibrates PBKDF2 first): one per core then."""
        def create(dp: Any) -> None:
            t = dp.target
            enc = t.encryption
            if enc is not None and self.key is None:
                raise UsageError("an encrypted target needs the key")
            qemu_img.create(t.path, t.virtual_size, t.backing_link, key=self.key if enc is not None else None,
                           iter_time=enc.iter_time_ms if enc is not None else None, compression=t.compression)
            os.chmod(t.path, 0o600)
        encrypted = any(dp.target.encryption is not None for dp in plan.disks)
        workers = max(1, min(len(plan.disks), os.cpu_count() or 1)) if encrypted else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(create, plan.disks))

    def _run(self, chain: Chain, level: RequestedLevel, only: Sequence[str], reason: Optional[str]) -> BackupResult:
        started_plan = time.monotonic()
        # a guest an I/O error paused before this run is not ours to resume (_rollback)
        self._paused_before = _ioerror_paused(self.handle.dom)
        plan = self._compressed(self._encrypted(plan_backup(LibvirtDomain(self.handle.dom), chain, self.bdir,
                                                            level, only, reason)))
        if self.fallback is not None:
            switch = self.fallback(plan)
            if switch is not None:
                self.fallback = None
                self.runner, self.fell_back = switch
                self._warn(f"--mode auto: {self.fell_back}")
            self.runner.preflight()
        log.info("plan: point %s, %s backup%s, transport %s, checkpoint %s", plan.point_id, plan.level,
                 f" from checkpoint {plan.base_checkpoint}" if plan.base_checkpoint else "",
                 self.runner.transport, plan.checkpoint)
        for dp in plan.disks:
            log.info("plan: disk %s (%s): %s%s -> %s", dp.disk.target, dp.disk.source, dp.mode,
                     f" from bitmap {dp.base_bitmap}" if dp.base_bitmap else "", dp.target.image)
        log.debug("planning took %.3fs", time.monotonic() - started_plan)
        if plan.reason:
            self._say(f"full backup: {plan.reason}")
        for disk, why in plan.skipped.items():
            self._say(f"skipping disk {disk}: {why}")
        for dp in plan.disks:
            if dp.why_full and plan.level != "full":
                self._say(f"disk {dp.disk.target} copied whole: {dp.why_full}")

        cancel = observe.cancel_handle()
        if cancel.reason is not None:
            raise Interrupted(f"backup {observe.interruption(cancel.reason)}; nothing was recorded")
        self._prepare(chain, plan)
        created = now_iso()
        started = time.monotonic()
        images: Dict[str, DiskImage] = {}
        try:
            self._create_targets(plan)
            for dp in plan.disks:
                images[dp.disk.target] = DiskImage(
                    image=dp.target.image, backing=dp.target.backing, virtual_size=dp.virtual_size, size=0,
                    digest=None, source=dp.disk.source or "", copied_full=dp.backing is None,
                    full_reason=dp.why_full if dp.backing is None and plan.level != "full" else None)
            job_started = time.monotonic()
            # a cancel (another thread, or SIGINT/SIGTERM here) wakes the wait: abort, roll back
            with self._job_secret(plan), cancel.on_cancel(self.runner.interrupt), host.signals_noted(cancel.cancel):
                self.runner.start(plan)
                self.runner.wait()
            if self.runner.interrupted:
                raise Interrupted(f"backup {observe.interruption(self.runner.interrupted)}; nothing was recorded")
            log.info("%s job done in %.3fs", self.runner.transport, time.monotonic() - job_started)
            observe.check()

            cp = checkpoints.lookup(self.handle.dom, plan.checkpoint)
            if cp is None:
                raise BackupFailed(f"checkpoint {plan.checkpoint} vanished after the backup job")
            cp_xml = checkpoints.saved_xml(cp)
            log.debug("checkpoint XML of %s:\n%s", plan.checkpoint, cp_xml)
            write_private(plan.work_dir / "checkpoint.xml", cp_xml)
            write_private(plan.work_dir / "domain.xml", self.handle.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            # hashed like the images: restore and drill use them, integrity.py checks them first
            xml_digests = {name: Digest.of_file(plan.work_dir / name) for name in ("domain.xml", "checkpoint.xml")}
            # Seal the images: fsync (the flush to disk) runs in threads while the main thread
            # hashes each file from the page cache (BLAKE3 on every core, digest.py); both
            # read the final file, and both finish before the rename and the commit.
            hashing = time.monotonic()
            paths = {dp.disk.target: dp.target.path for dp in plan.disks}
            with ThreadPoolExecutor(max_workers=max(1, len(paths))) as pool:
                flushed = [pool.submit(fsync_path, p) for p in paths.values()]
                for t, img in images.items():
                    size = paths[t].stat().st_size
                    observe.emit("hash", t, 0, size)
                    img.record_hash(paths[t])
                    img.size = size
                    if chain.encryption is None:        # an encrypted image can't be mapped without the key
                        img.data_size = qemu_img.data_size(paths[t])
                    observe.finish("hash", t, size)
                    observe.check()
                for f in flushed:
                    f.result()
            log.debug("hashing and fsync took %.3fs", time.monotonic() - hashing)
            os.rename(plan.work_dir, plan.final_dir)
            fsync_path(plan.final_dir.parent)
            observe.check()
        except BaseException as exc:
            self._rollback(plan)
            if isinstance(exc, OSError):
                raise OperationFailed(f"backup failed: {exc}") from exc
            if isinstance(exc, observe.Cancelled):
                raise Interrupted(f"backup {observe.interruption(exc.reason)}; nothing was recorded") from None
            raise

        base = plan.base
        point = Point(
            id=plan.point_id, level=plan.level, created=created, checkpoint=plan.checkpoint,
            base_checkpoint=base.checkpoint if base else None,
            parent=base.id if base else None,
            chain=plan.point_id if base is None else chain.chain_full(base).id,
            disks=images, domain_xml=f"{POINTS_DIR}/{plan.point_id}/domain.xml",
            checkpoint_xml=f"{POINTS_DIR}/{plan.point_id}/checkpoint.xml", reason=plan.reason,
            duration=round(time.monotonic() - started, 3), transport=self.runner.transport,
            nbd_tls=self.runner.nbd_tls,
            encryption=chain.encryption.format if chain.encryption is not None else None,
            compression=self.compression,
            domain_xml_digest=xml_digests["domain.xml"], checkpoint_xml_digest=xml_digests["checkpoint.xml"])
        if self.quiesce is not None:
            self.quiesce.record(point)
            self.warnings.extend(self.quiesce.warnings)
        chain.points.append(point)
        chain.next_seq += 1
        held: List[str] = []
        try:
            observe.emit("commit", None, 0, 1, "steps")
            # neither a cancel nor a signal can cut the commit in half: noted, the point is recorded
            with cancel.on_cancel(held.append), host.signals_noted(held.append):
                self.bdir.save(chain)   # the commit
        except BaseException:
            chain.points.pop()
            chain.next_seq -= 1
            self._rollback(plan)
            raise
        log.info("recorded point %s (%s) in %s", point.id, point.level, self.bdir.metadata)
        observe.finish("commit", None, 1, "steps")
        if held:
            what = held[0] if held[0].startswith("SIG") else "a cancel"
            self._warn(f"{what} arrived while point {point.id} was being recorded; the point is complete")
        removed = self._retire(chain, point)
        return BackupResult(self.handle.dom.name(), point, dict(plan.skipped), removed,
                            self.warnings + self.runner.warnings, dict(self.runner.transfer))

    def _retire(self, chain: Chain, point: Point) -> List[str]:
        """Delete this directory's checkpoints no future backup needs. The point is recorded:
        nothing here may turn the run into a failure."""
        removed: List[str] = []
        dom = self.handle.dom
        try:
            needed = set(chain.needed_checkpoints())
            # a shut-off domain: libvirt drops only the metadata; delete() takes the bitmaps
            # out of every disk's image
            sources = [d.source for d in eligible_disks(dom) if d.source]
            for name in checkpoints.ours(dom, chain.checkpoint_prefix()):
                if name not in needed:
                    warn = checkpoints.delete(dom, name, sources)
                    if warn:
                        self._warn(warn)
                    else:
                        log.info("retired checkpoint %s", name)
                        removed.append(name)
        except (KeyboardInterrupt, libvirt.libvirtError, VirtBackupError) as e:
            self._warn(f"point {point.id} is recorded, but retiring old checkpoints stopped "
                       f"({e or 'interrupted'}); the next run finishes it")
        return removed

    def _rollback(self, plan: BackupPlan) -> None:
        """Undo one failed run: its job, its checkpoint (and bitmaps), its images. Older points
        stay intact. The checkpoint is deleted only once no job can write into the targets."""
        log.info("rolling back point %s", plan.point_id)
        try:
            try:
                self.handle.reconnect_if_lost()
            except (VirtBackupError, libvirt.libvirtError) as e:
                self._warn(f"could not delete checkpoint {plan.checkpoint}: libvirtd unreachable "
                           f"({host.libvirt_message(e)}) (the next run removes it)")
                self.runner.abort()
                return
            if not self.runner.abort():
                self._warn(f"the backup job still runs after it was aborted; not deleting checkpoint "
                           f"{plan.checkpoint} (the next run removes it)")
                return
            # the failed run's bitmap exists only on the disks it backed up
            sources = [dp.disk.source for dp in plan.disks if dp.disk.source]
            try:
                warn = checkpoints.delete(self.handle.dom, plan.checkpoint, sources)
            except libvirt.libvirtError as e:
                warn = f"could not delete checkpoint {plan.checkpoint}: {host.libvirt_message(e)}"
            if warn:
                self._warn(warn + " (the next run removes it)")
            self._resume_if_paused_by_us()
        finally:
            for d in (plan.work_dir, plan.final_dir):
                shutil.rmtree(d, ignore_errors=True)

    def _resume_if_paused_by_us(self) -> None:
        """A guest write that has to copy its old data into a full target (push mode: the backup
        target; pull: the scratch file) fails with ENOSPC inside QEMU's copy-before-write filter,
        and QEMU's default error policy then pauses the guest (seen with the test guest and an
        8 MiB target). With the job gone the write goes to the disk only: resume, so a failed
        backup never leaves the guest paused. Only a pause that began during our job."""
        if self._paused_before:
            return
        dom = self.handle.dom
        try:
            if not _ioerror_paused(dom):
                return
            host.call(dom.resume)
        except libvirt.libvirtError as e:
            self._warn(f"the guest was paused by an I/O error during the backup and could not be resumed: "
                       f"{host.libvirt_message(e)}; resume it with 'virsh resume {dom.name()}'")
            return
        self._warn("the guest was paused by an I/O error during the backup (a guest write could not copy its "
                   "old data into the full backup target or scratch file); resumed it now that the job is gone")
        if self.quiesce is not None:
            self.quiesce.retry_thaw()    # a thaw the pause cut short


def _ioerror_paused(dom: libvirt.virDomain) -> bool:
    """The domain is paused because an I/O error stopped it (QEMU's werror/rerror policy)."""
    try:
        state, reason = dom.state()
    except libvirt.libvirtError:
        return False
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)


TLS_DIR_ENV = "VIRTBACKUP_NBD_TLS_DIR"
DEFAULT_TLS_DIR = "/etc/pki/virtbackup"
TLS_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def _transport_reason(transport: str, asked: Optional[str], remote: bool, scratch_dir: bool = False,
                      fell_back: Optional[str] = None) -> str:
    """Why a point's data travelled the way it did (backup --json, the run log)."""
    if transport == "offline":
        return ("the domain is shut off: a private QEMU read its images (libvirt runs backup jobs only for "
                "running domains)")
    if asked is not None:
        return f"--mode {asked} was asked for"
    if fell_back:
        return f"--mode auto: {fell_back}"
    if remote:
        return ("--mode auto pulls (the default); from a remote URI only pull is possible: the hypervisor "
                "cannot write into this host's backup directory")
    if scratch_dir:
        return "--mode auto pulls (the default), with the scratch files in --scratch-dir"
    return ("--mode auto pulls (the default): the copy-before-write of what the guest rewrites during the job "
            "goes to a scratch file, so the guest's writes do not wait for the backup target "
            "(docs/performance.md)")


def check_tls_dir(given: Optional[str]) -> str:
    """The directory of our NBD TLS client certificate (given, $VIRTBACKUP_NBD_TLS_DIR, or
    /etc/pki/virtbackup) with its three files, the key not readable by others: else exit 2."""
    d = given or os.environ.get(TLS_DIR_ENV) or DEFAULT_TLS_DIR
    if not os.path.isabs(d):
        raise UsageError(f"--nbd-tls-dir must be an absolute path, not '{d}'")
    missing = [f for f in TLS_FILES if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise UsageError(f"a pull from a remote hypervisor uses NBD over TLS: {d} lacks {', '.join(missing)} "
                         f"(the CA certificate libvirt's backup_tls_x509_cert_dir on the hypervisor trusts, and "
                         f"this client's certificate and key; --nbd-tls-dir DIR or ${TLS_DIR_ENV}); or, on a "
                         "network you trust, --insecure-nbd; nothing was changed")
    st = os.stat(os.path.join(d, "client-key.pem"))
    if st.st_mode & 0o077:
        raise UsageError(f"{os.path.join(d, 'client-key.pem')} is readable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it; nothing was changed")
    return d


def _push_if_no_room(pull: "PullRunner", handle: DomainHandle, bdir: BackupDir, notify: Notify,
                     quiesce: Optional[Quiescer], max_speed: Optional[int]
                     ) -> Callable[[BackupPlan], Optional[Tuple[Runner, str]]]:
    """--mode auto's one exception (Engine.fallback): when a local domain's pull cannot run here
    (PullRunner.obstacle: its scratch files may not fit beside the disks, their default
    directory is missing, or libnbd's Python binding or qemu-nbd is), the push job instead, and why.
    A refusal would stop a nightly job that pushing can still do; pulling anyway could fill
    the filesystem under the guest's disks."""
    def choose(plan: BackupPlan) -> Optional[Tuple[Runner, str]]:
        problem = pull.obstacle(plan)
        if problem is None:
            return None
        return (PushRunner(handle, bdir.path / POINTS_DIR, notify, quiesce, max_speed),
                f"{problem}: pushed instead, so the guest's writes wait for the backup target during the job")
    return choose


def runner_for(handle: DomainHandle, bdir: BackupDir, notify: Notify, quiesce: Optional[Quiescer] = None,
               mode: str = "push", scratch_dir: Optional[str] = None, max_speed: Optional[int] = None,
               key: Optional[keys.Key] = None, tls_dir: Optional[str] = None, insecure_nbd: bool = False,
               asked: bool = True) -> Runner:
    """The push job (or the pull job, `mode` pull) for a running domain, frozen around its start
    by `quiesce`; a private QEMU for a shut-off one (consistent by nature; it gets the key of an
    encrypted chain). `max_speed`: bytes/s per disk (push and offline: QEMU's job speed; pull:
    what our NBD client reads). The pull job's qemu-nbd targets get the key as the private QEMU does."""
    if handle.dom.isActive():
        if mode == "pull":   # libvirt exports the disks over NBD, we copy (runners/pull.py)
            from virtbackup.runners.pull import PullRunner
            return PullRunner(handle, bdir.path / POINTS_DIR, notify, scratch_dir, quiesce, max_speed, key,
                              tls_dir, insecure_nbd)
        return PushRunner(handle, bdir.path / POINTS_DIR, notify, quiesce, max_speed)
    if mode == "pull" and asked:
        notify("domain is shut off: backing up its images offline, not over NBD")
    return OfflineRunner(handle, notify, max_speed, key)


def _check_encryption(bdir: BackupDir, chain: Optional[Chain], encrypt: bool, key: Optional[keys.Key]) -> None:
    """Refuse (exit 2, nothing touched) a backup whose key does not fit the directory."""
    if encrypt and key is None:
        raise UsageError("--encrypt needs the key: --key-file FILE (or - for stdin)")
    if chain is None or not chain.points:
        if key is not None and not encrypt:
            raise UsageError(f"{bdir.path} holds no backups yet; to start an encrypted chain give "
                             "--encrypt with --key-file")
        return
    if encrypt and chain.encryption is None:
        raise UsageError(f"{bdir.path} holds unencrypted backups; an encrypted chain needs a new "
                         "backup directory")
    crypto.check_key(chain.encryption, key, f"backup directory {bdir.path}")


def _check_compression(bdir: BackupDir, chain: Optional[Chain], compress: Optional[str], encrypted: bool) -> None:
    """Exit 2 for an unknown --compress, and for compressing an encrypted chain: QEMU 7.2
    writes no compressed clusters into a LUKS qcow2 (the write fails with an I/O error)."""
    if compress is not None and compress not in COMPRESSIONS:
        raise UsageError(f"unknown compression '{compress}' ({', '.join(COMPRESSIONS)})")
    if compress in (None, "none"):
        return
    if encrypted or (chain is not None and chain.encryption is not None):
        raise UsageError(f"--compress {compress} cannot go with encryption: QEMU writes no compressed "
                         f"clusters into a LUKS-encrypted qcow2 ({bdir.path} would be encrypted); "
                         "use --compress none or an unencrypted backup directory")


def chain_compression(bdir: BackupDir, chain: Chain, compress: Optional[str], level: str,
                      reason: Optional[str]) -> Tuple[Optional[str], str, Optional[str]]:
    """(compression for the new point, level, reason). Every point of a chain (a full and the
    points layered on it) is stored alike: the chain's setting is its latest point's. Without
    `compress` a point follows it (a new directory takes DEFAULT_COMPRESSION; an encrypted one
    none). Asking for another one starts a new chain: auto takes a full (the reason says why),
    inc and diff are refused (exit 2) — one chain, one storage, so what `list` says of a chain
    (its ratio) holds for every point of it, and no setting changes in the middle of a chain
    unnoticed."""
    last = chain.latest
    if compress is None:
        if last is not None:
            return last.compression, level, reason
        if chain.encryption is not None:
            return None, level, reason
        return (None if DEFAULT_COMPRESSION == "none" else DEFAULT_COMPRESSION), level, reason
    wanted = None if compress == "none" else compress
    if last is None or last.compression == wanted:
        return wanted, level, reason
    have = last.compression or "uncompressed"
    if level in ("inc", "diff"):
        raise UsageError(f"{bdir.path}: the chain's points are {have}; an {level} follows its chain "
                         f"(--compress {compress} starts a new chain: use --level full or auto)")
    return wanted, "full", reason or f"compression changed ({have} -> {compress}): a new chain"


def backup(uri: Optional[str], domain: str, backup_dir: Path, level: str = "auto",
           disks: Sequence[str] = (), notify: Optional[Notify] = None,
           reason: Optional[str] = None, quiesce: str = "auto", mode: Optional[str] = None,
           scratch_dir: Optional[str] = None, max_speed: Optional[int] = None,
           encrypt: bool = False,
           key: Optional[keys.Key] = None, nbd_tls_dir: Optional[str] = None,
           insecure_nbd: bool = False, compress: Optional[str] = None) -> BackupResult:
    """Take one backup of DOMAIN (running or shut off) into BACKUP_DIR; see api.backup.

    A pull from a remote hypervisor reads its NBD exports over TCP with TLS, our client
    certificate from `nbd_tls_dir` (check_tls_dir); plaintext only with `insecure_nbd` (warned
    about, and recorded in the point).

    `encrypt` with `key` starts an encrypted chain; an encrypted chain's later points need the
    same `key`, checked against the metadata before anything is touched (every transport writes
    encrypted chains).

    `compress` ("zstd", "zlib", "none"; None: the chain's own setting, DEFAULT_COMPRESSION for
    a new directory): see chain_compression."""
    if level not in REQUESTED_LEVELS:
        raise UsageError(f"unknown level '{level}' (auto, full, inc, diff)")
    if quiesce not in QUIESCE_MODES:
        raise UsageError(f"unknown quiesce mode '{quiesce}' (auto, require, off)")
    remote = host.is_remote(uri)
    asked_mode = None if mode in (None, "auto") else mode
    if mode is not None and mode not in BACKUP_MODES:
        raise UsageError(f"unknown mode '{mode}' (auto, push, pull)")
    # auto (no --mode): pull, the copy-before-write then lands in a scratch file, not in the
    # guest's write path through the backup target (docs/performance.md); a local domain whose
    # pull cannot run here pushes instead (Engine.fallback), unless --scratch-dir was given
    mode = asked_mode or "pull"
    if scratch_dir is not None:
        if mode != "pull":
            raise UsageError("--scratch-dir is for pull mode (--mode pull)")
        if not os.path.isabs(scratch_dir):
            raise UsageError(f"--scratch-dir must be an absolute path on the hypervisor, not '{scratch_dir}'")
        if has_control_chars(scratch_dir):
            raise UsageError(f"--scratch-dir must not contain control characters: {scratch_dir!r}")
    tls_dir: Optional[str] = None
    if nbd_tls_dir is not None and not nbd_tls_dir.strip():
        # an empty value must not quietly mean the default directory
        raise UsageError("--nbd-tls-dir needs a directory, not an empty string")
    if insecure_nbd or nbd_tls_dir is not None:
        if not (remote and mode == "pull"):
            raise UsageError("--insecure-nbd and --nbd-tls-dir are for a pull from a remote URI (--connect "
                             "qemu+ssh://...): a local pull never leaves this host (a unix socket)")
    if max_speed is not None and max_speed <= 0:
        raise UsageError(f"--max-speed must be a positive number of bytes per second, not {max_speed}")
    say: Notify = notify or (lambda _m: None)
    bdir = BackupDir(backup_dir)
    must_create = bdir.check_usable()
    existing = bdir.load_or_none()          # corrupt metadata -> exit 2 before libvirt is touched
    _check_encryption(bdir, existing, encrypt, key)
    _check_compression(bdir, existing, compress, encrypt or key is not None)
    # the iter-time is chosen when a chain is created (later points keep the chain's)
    new_chain = existing is None or not existing.points
    iter_time = crypto.iter_time_ms() if key is not None and new_chain else keys.DEFAULT_ITER_TIME_MS
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, domain)
        uuid = dom.UUIDString()
        if existing is not None:
            bdir.check_owner(existing, dom.name(), uuid)
        if remote and not dom.isActive():
            from virtbackup.runners.pull import refuse_remote
            refuse_remote(uri, "an offline backup")
        if remote and mode == "pull" and not insecure_nbd:
            tls_dir = check_tls_dir(nbd_tls_dir)      # before anything is written
        quiescer = Quiescer(dom, quiesce, say)
        quiescer.check()        # --quiesce=require without an agent channel: refused before anything
        with domain_lock(uuid):
            left = recover(dom, say)        # a killed run left the guest frozen: thaw first
            if left:
                say(f"warning: {left}")
            if must_create:
                bdir.create()
            log_problems: List[str] = []

            def log_problem(msg: str) -> None:
                log_problems.append(msg)
                say(f"warning: {msg}")

            with dir_lock(bdir), runlog.run_log(bdir.path, "backup", log_problem):
                log.info("backup of domain %s (%s) into %s, level %s, mode %s%s", dom.name(), uuid, bdir.path,
                         level, asked_mode or "auto", f", disks {', '.join(disks)}" if disks else "")
                chain = bdir.load_or_none()
                if chain is None:
                    # The chain id names this directory's checkpoints: record it (no points yet)
                    # before any checkpoint exists, so a run killed during the first backup leaves
                    # names the next run recognises and cleans, not a checkpoint nobody owns.
                    chain = Chain(domain_name=dom.name(), domain_uuid=uuid, path=str(bdir.path))
                    bdir.save(chain)
                bdir.check_owner(chain, dom.name(), uuid)
                if existing is None or chain.encryption != existing.encryption:
                    _check_encryption(bdir, chain, encrypt, key)   # changed before we got the lock
                if key is not None and chain.encryption is None:
                    chain.encryption = crypto.ChainEncryption.new(key, iter_time)
                if chain.encryption is not None:
                    _check_compression(bdir, chain, compress, True)
                    iter_time = chain.encryption.iter_time_ms    # the whole chain alike
                    log.info("encrypted chain: %s %s, iter-time %d ms", chain.encryption.format,
                             chain.encryption.cipher, iter_time)
                compression, level, reason = chain_compression(bdir, chain, compress, level, reason)
                if compression is not None:
                    log.info("compressed chain: %s", compression)
                chain.domain_name = dom.name()
                chain.path = str(bdir.path)
                handle = DomainHandle(conn, dom)
                try:
                    if insecure_nbd and dom.isActive():
                        say("warning: --insecure-nbd: the disks travel from the hypervisor as plaintext NBD over "
                            "TCP; anyone who reaches the port during the job can read them (recorded in the point)")
                    runner = runner_for(handle, bdir, say, quiescer, mode, scratch_dir, max_speed, key, tls_dir,
                                        insecure_nbd, asked_mode is not None)
                    engine = Engine(handle, bdir, runner, say, quiescer, key, iter_time, compression)
                    from virtbackup.runners.pull import PullRunner
                    if asked_mode is None and scratch_dir is None and not remote and isinstance(runner, PullRunner):
                        engine.fallback = _push_if_no_room(runner, handle, bdir, say, quiescer, max_speed)
                    engine.cleanup_leftovers(chain)
                    result = engine.run(chain, cast(RequestedLevel, level), disks, reason)
                    result.warnings[:0] = log_problems
                    result.transport_reason = _transport_reason(result.point.transport, asked_mode, remote,
                                                                scratch_dir is not None, engine.fell_back)
                    log.info("transport %s: %s", result.point.transport, result.transport_reason)
                    log.info("done: point %s, %s bytes written, %.3fs", result.point.id,
                             sum(i.size for i in result.point.disks.values()), result.point.duration)
                    return result
                finally:
                    handle.close()
