"""Pull-mode backups: libvirt exports the disks over NBD and virtbackup reads them itself.

The backup directory then only has to be reachable by this process, not by the hypervisor's
QEMU: another host (remote libvirt URIs), or storage the hypervisor does not mount. PullRunner
is a job runner (runners/base.py) beside the push and offline ones: planning, target images, metadata,
checkpoints and rollback are the engine's (backup.Engine). The job: `<domainbackup mode='pull'>`
with libvirt's NBD server (a unix socket for a local libvirtd, TCP on the host's name for a
remote one) and copy-before-write scratch files on the hypervisor, then nbdcopy.copy() per disk
into the pre-created qcow2 target, then the job is ended (libvirt deletes the scratch files).
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import libvirt
from lxml import etree

from virtbackup import env, observe
from virtbackup.errors import BackupFailed, Interrupted, NoSpace, OperationFailed, UsageError
from virtbackup.qemu import keys, nbdcopy
from virtbackup.runners.base import (
    Notify,
    abort_job,
    checkpoint_prefix,
    clear_leftover_job,
    completed_stats,
    job_gone,
    job_writes_into,
)
from virtbackup.runners.plan import BackupPlan, Transport
from virtbackup.virt import host, xmlbuild
from virtbackup.virt.host import DomainHandle

if TYPE_CHECKING:
    from virtbackup.virt.quiesce import Quiescer

log = logging.getLogger(__name__)
MiB = 1 << 20
# how a whole disk is copied: qemu-img (convert from the export, the default) or libnbd (our
# own NBD pump, as for incrementals); for scripts/benchmark.py's side-by-side figures
WHOLE_COPY_ENV = "VIRTBACKUP_PULL_WHOLE_COPY"
MAX_SOCKET_PATH = 107           # sun_path holds 108 bytes with the terminating NUL

# libvirt 9.0 needs an explicit TCP port for a pull backup's NBD server (it has no allocator);
# these are tried in random order until one is free on the host (NBD's own port first).
PORT_RANGE = os.environ.get("VIRTBACKUP_NBD_PORTS", "10809-10872")
PORT_ATTEMPTS = 8
COPY_THREADS = 4        # disks copied side by side (each: one NBD connection, 16 requests in flight)


def _ports() -> List[int]:
    lo, _, hi = PORT_RANGE.partition("-")
    ports = list(range(int(lo), int(hi or lo) + 1))
    random.shuffle(ports)
    return ports[:PORT_ATTEMPTS]


def scratch_path(scratch_dir: Optional[str], source: str, cp_name: str, disk: str, tag: str = "") -> str:
    """The scratch file of one disk on the hypervisor: in `scratch_dir`, or else beside the
    disk's image (a directory that exists on that host and has room for the disk's data).
    The name carries the checkpoint name: that is how a later run recognises a job of this
    directory (base.job_writes_into); and the run's `tag`, so that a scratch file some failure
    left behind (libvirt deletes them when a job ends) never blocks a retry of the same point."""
    where = scratch_dir or os.path.dirname(source) or "/var/lib/libvirt/images"
    return str(Path(where) / f"{cp_name}-{disk}{'-' + tag if tag else ''}.scratch")


_STALE_SCRATCH = re.compile(r"^virtbackup-[0-9a-f]{8}-\d{4,}-.+\.scratch$")


def remove_stale_scratch(where: str, prefix: str, notify: Notify) -> None:
    """Scratch files of this chain (names start with its checkpoint prefix) that a failed run
    left in `where` on this host, while no job of ours runs: removed (regular files only)."""
    try:
        names = os.listdir(where)
    except OSError:
        return
    for n in names:
        if not (n.startswith(prefix) and _STALE_SCRATCH.match(n)):
            continue
        p = os.path.join(where, n)
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
                notify(f"removed {p}, a scratch file left by an earlier run")
        except OSError as e:
            log.warning("cannot remove stale scratch file %s: %s", p, e.strerror)


@dataclass(frozen=True)
class PullTarget:
    """One disk of a pull job: where its export is copied to, and how."""

    name: str               # target dev, e.g. "vda"
    target: Path            # pre-created qcow2 (with its backing link when not whole)
    whole: bool             # copy the whole disk (full, or a disk new since the base point)
    source: str             # the disk's image on the hypervisor (the default scratch dir)
    encrypted: bool = False  # the target is LUKS (qemu-nbd opens it with the runner's key)
    compressed: bool = False  # written as compressed clusters (the type is in the target's header)


class PullRunner:
    """The pull job as a job runner (runners/base.py): start fixes the point in time, wait copies
    every export, flushes and ends the job, abort is bounded and never raises, interrupt comes
    from a cancel (any thread, or the signal handler). It never plans, creates targets or
    touches the chain."""

    transport: Transport = "pull"

    def __init__(self, handle: DomainHandle, points_dir: Path, notify: Notify,
                 scratch_dir: Optional[str] = None, quiesce: Optional["Quiescer"] = None,
                 max_speed: Optional[int] = None, key: Optional["keys.Key"] = None,
                 tls_dir: Optional[str] = None, insecure: bool = False):
        self.handle = handle
        self.key = key                  # of an encrypted chain: the targets are LUKS
        # a remote hypervisor's NBD export over TCP: TLS with the client certificates in
        # tls_dir (ca-cert.pem, client-cert.pem, client-key.pem), plaintext only if `insecure`
        self.tls_dir = tls_dir
        self.insecure = insecure
        self.nbd_tls: Optional[bool] = None     # what the point records (see chain.Point.nbd_tls)
        self.max_speed = max_speed      # bytes/s read per disk (nbdcopy.Pacer)
        self.points_dir = points_dir
        self.notify = notify
        self.scratch_dir = scratch_dir
        self.quiesce = quiesce          # freezes the guest for backupBegin, as in push mode
        self.interrupted: Optional[str] = None
        self.warnings: List[str] = []
        self.transfer: Dict[str, Dict[str, Any]] = {}   # per disk: bytes read, written, zeroed; seconds
        self._watch: Optional[host.JobWatch] = None
        self._server: Optional[xmlbuild.NbdServer] = None
        self._targets: List[PullTarget] = []
        self._prefix = ""
        self._room_checked: Optional[BackupPlan] = None   # the plan obstacle() found room for

    # -- the runner protocol ---------------------------------------------------------------------
    def interrupt(self, signal_name: str) -> None:
        self.interrupted = signal_name
        if self._watch is not None:
            self._watch.interrupt(signal_name)

    @property
    def conn(self) -> libvirt.virConnect:
        return self.handle.conn

    @property
    def dom(self) -> libvirt.virDomain:
        return self.handle.dom

    def preflight(self) -> None:
        """Before planning: the tools a pull copy needs (nbdcopy.require_tools); a foreign job is
        refused at start."""
        nbdcopy.require_tools()

    def start(self, plan: BackupPlan) -> None:
        """backupBegin in pull mode: fixes the point in time and creates the plan's checkpoint."""
        for dp in plan.disks:
            if dp.target.encryption is not None and self.key is None:
                raise BackupFailed(f"disk {dp.disk.target}: the target is encrypted but the runner has no key")
        cxml = xmlbuild.checkpoint_xml(plan.checkpoint, plan.description,
                                       {dp.disk.target: dp.tracks for dp in plan.disks})
        targets = self._targets_of(plan)
        # --mode auto asked obstacle() for this very plan a moment ago: not the bitmaps again
        problem = None if plan is self._room_checked else self._scratch_room_problem(plan, targets)
        if problem:
            raise NoSpace(f"{problem}; give --scratch-dir a filesystem with room; nothing was changed")
        self._start(targets, plan.base_checkpoint, plan.checkpoint, cxml)

    @staticmethod
    def _targets_of(plan: BackupPlan) -> List[PullTarget]:
        # the default scratch dir is beside the disk's image file; a block device's or network
        # disk's "directory" is no place for one (/dev is a small tmpfs): beside a file disk of
        # the same domain then, else libvirt's image dir (--scratch-dir chooses)
        files = [dp.disk.source for dp in plan.disks if dp.disk.type == "file" and dp.disk.source]
        return [PullTarget(dp.disk.target, dp.target.path, dp.mode == "full",
                           (dp.disk.source or "") if dp.disk.type == "file" else (files[0] if files else ""),
                           encrypted=dp.target.encryption is not None,
                           compressed=dp.target.compression is not None)
                for dp in plan.disks]

    def obstacle(self, plan: BackupPlan) -> Optional[str]:
        """Why this pull of `plan` cannot run here, or None: libnbd's Python binding or qemu-nbd
        missing (a plain `pip install` into a venv without Debian's packages has no libnbd), or
        the scratch files cannot go where they would (what start would refuse: no room, or a
        scratch directory that is missing or no directory). --mode auto asks this before the
        job, to push instead (backup.Engine.fallback): the default place of a block or network
        disk's scratch files may not exist on a host where pushing works."""
        try:
            nbdcopy.require_tools()
        except OperationFailed as e:
            return str(e)
        try:
            problem = self._scratch_room_problem(plan, self._targets_of(plan))
        except UsageError as e:
            problem = str(e).replace("; choose one with --scratch-dir", "")
        if problem:
            return f"{problem} (--scratch-dir DIR gives pull a directory with room)"
        self._room_checked = plan
        return None

    def _scratch_room_problem(self, plan: BackupPlan, targets: Sequence[PullTarget]) -> Optional[str]:
        """Why the job must not start (start raises NoSpace: exit 2, nothing changed), or None:
        the scratch files' filesystems can't hold what the guest could make them hold: the old
        data of every cluster it rewrites before we have read it, at most the data still to be
        read (a full: the disk's allocated bytes; an incremental: the base bitmap's dirty bytes).
        A fill would pause the guest (QEMU's ENOSPC policy; the run then ends the job and resumes
        it, see host.JobWatch).
        Only on this host: a remote hypervisor's filesystems are not ours to inspect."""
        if host.is_remote(self.conn.getURI()):
            return None
        dirty: Dict[str, int] = {}
        if any(dp.mode == "bitmap" for dp in plan.disks):
            from virtbackup.virt import bitmaps
            live = bitmaps.live(self.dom, [dp.disk for dp in plan.disks if dp.mode == "bitmap"])
            for dp in plan.disks:
                bm = next((b for b in live.get(dp.disk.target, []) if b.name == dp.base_bitmap), None)
                dirty[dp.disk.target] = bm.count if bm is not None and bm.count >= 0 else dp.virtual_size
        need: Dict[int, Tuple[str, int, int]] = {}       # st_dev -> (dir, bytes needed, bytes free)
        for dp, t in zip(plan.disks, targets, strict=True):
            where = os.path.dirname(scratch_path(self.scratch_dir, t.source, plan.checkpoint, t.name))
            try:
                st, vfs = os.stat(where), os.statvfs(where)
            except OSError as e:
                raise UsageError(f"scratch directory {where} for disk {t.name}: {e.strerror}; "
                                 "choose one with --scratch-dir") from None
            if not stat.S_ISDIR(st.st_mode):
                raise UsageError(f"scratch directory {where} for disk {t.name}: not a directory; "
                                 "choose one with --scratch-dir")
            if dp.mode == "full":
                n = int(host.call(self.dom.blockInfo, t.name)[1])      # allocated bytes of the disk
            else:
                n = dirty.get(t.name, dp.virtual_size)
            d, have, free = need.get(st.st_dev, (where, 0, vfs.f_bavail * vfs.f_frsize))
            need[st.st_dev] = (d, have + n, free)
        for where, n, free in need.values():
            if n > free:
                return (f"the pull job's scratch files in {where} may need up to {n / MiB:.1f} MiB (the old "
                        f"data of what the guest rewrites before it is read), {free / MiB:.1f} MiB are free")
        return None

    def _start(self, targets: Sequence[PullTarget], base: Optional[str], checkpoint: str, cxml: str) -> None:
        self._targets = list(targets)
        self._prefix = checkpoint_prefix(checkpoint)
        clear_leftover_job(self.conn, self.dom, self.points_dir, self._prefix, self.notify)
        tag = secrets.token_hex(3)
        if not host.is_remote(self.conn.getURI()):      # no job of ours runs now: its files are stale
            for where in sorted({os.path.dirname(scratch_path(self.scratch_dir, t.source, checkpoint, t.name))
                                 for t in self._targets}):
                remove_stale_scratch(where, self._prefix, self.notify)
        pdisks = [xmlbuild.PullDisk(t.name, scratch_path(self.scratch_dir, t.source, checkpoint, t.name, tag),
                                    full=t.whole) for t in self._targets]
        if self.interrupted:
            raise Interrupted(f"backup {observe.interruption(self.interrupted)}; nothing was recorded")
        self._watch = host.JobWatch(self.conn, self.dom)
        if self.interrupted:
            self._watch.interrupt(self.interrupted)
        try:
            self._server = self._begin(pdisks, base, cxml, checkpoint)
        except BaseException:
            self._watch.close()
            self._watch = None
            raise

    def wait(self) -> None:
        """Copy every export into its target, then end the job; raise unless all are complete."""
        assert self._watch is not None and self._server is not None
        watch = self._watch

        def should_stop() -> Optional[str]:
            if watch.interrupted:
                return watch.interrupted
            if watch.done.is_set():
                return watch.reason or "the backup job ended before its data was read"
            return None

        try:
            self._copy_all(self._exports(), should_stop)
            # every export read: the job must still be running, or what we read may be torn
            if should_stop() is not None or job_gone(self.dom):
                raise self._stopped()
            watch.done.clear()
            log.debug("libvirt abortJob(%s): every export read, ending the pull job", self.dom.name())
            try:
                self.dom.abortJob()      # ends a pull job: the normal way to finish it
            except libvirt.libvirtError as e:
                raise BackupFailed(f"could not end the backup job: {host.libvirt_message(e)}") from None
            if not watch.wait(lambda: job_gone(self.dom), check_every=0.5, timeout=60):
                raise BackupFailed("the backup job did not end within 60 s after all data was read")
            if watch.interrupted:
                raise Interrupted(f"backup {observe.interruption(watch.interrupted)}; nothing was recorded")
            stats = completed_stats(self.dom, watch)
        finally:
            watch.close()
            self._watch = None
            self._remove_socket()
        # libvirt reports an ended pull job as completed (errmsg 'Operation canceled'); a failed
        # copy-before-write on the host (e.g. its scratch file's storage filled up) as failed
        if stats.get("type") not in (None, libvirt.VIR_DOMAIN_JOB_COMPLETED) or not stats.get("success", True):
            raise BackupFailed(f"backup job failed: {stats.get('errmsg') or 'libvirt reported a failure'}")

    def abort(self) -> bool:
        """End our job if it still runs (libvirt then deletes the scratch files); False when it
        did not end in time. After a libvirtd restart: reconnect first. Never raises."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._remove_socket()
        try:
            self.handle.reconnect_if_lost()
        except Exception as e:   # noqa: BLE001 - abort never raises; the caller reports
            log.warning("cannot reconnect to abort the job: %s", host.libvirt_message(e))
            return False
        try:
            if job_writes_into(self.dom, self.points_dir, self._prefix or None):
                return abort_job(self.conn, self.dom)
        except (libvirt.libvirtError, OSError):
            return False
        return True

    # -- the parts ---------------------------------------------------------------------------------
    def _servers(self, checkpoint: str) -> List[xmlbuild.NbdServer]:
        """Servers to try in order: the unix socket, or TCP ports on the remote host."""
        uri = self.conn.getURI()
        if not host.is_remote(uri):
            rd = env.run_dir()
            sock = str(rd / f"nbd-{checkpoint}.sock")
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise UsageError(f"the pull job's NBD socket {sock} would be {len(os.fsencode(sock))} bytes long, over "
                                 f"the {MAX_SOCKET_PATH} a unix socket path can have: give VIRTBACKUP_RUN_DIR a "
                                 "shorter directory; nothing was changed")
            rd.mkdir(mode=0o700, parents=True, exist_ok=True)
            return [xmlbuild.NbdServer(socket=sock)]
        name = host.uri_host(uri) or "localhost"
        return [xmlbuild.NbdServer(host=name, port=p, tls=not self.insecure) for p in _ports()]

    def _begin(self, disks: List[xmlbuild.PullDisk], base: Optional[str], cxml: str,
               checkpoint: str) -> xmlbuild.NbdServer:
        last = ""
        for server in self._servers(checkpoint):
            if server.socket:
                try:
                    os.unlink(server.socket)   # a stale socket of a killed run of ours
                except FileNotFoundError:
                    pass
            bxml = xmlbuild.pull_backup_xml(disks, base, server)
            log.debug("libvirt backupBegin(%s) pull:\n%s%s", self.dom.name(), bxml, cxml)
            try:
                with self.quiesce.frozen(self.dom) if self.quiesce else nullcontext():
                    host.call(self.dom.backupBegin, bxml, cxml, 0)
                log.info("pull job started; NBD server %s%s", server.socket or f"{server.host}:{server.port}",
                         " (TLS)" if server.tls else "")
                self.nbd_tls = None if server.socket else server.tls
                return server
            except libvirt.libvirtError as e:
                last = host.libvirt_message(e)
                if server.port and "in use" in last.lower():
                    continue            # that port is taken on the host: try the next one
                try:
                    stopped = not self.dom.isActive()
                except libvirt.libvirtError:
                    stopped = False
                if stopped:
                    raise BackupFailed("backup job failed: the domain stopped during the backup") from None
                raise BackupFailed(f"backup could not start: {last}") from None
        raise BackupFailed(f"backup could not start: no free NBD port in {PORT_RANGE} on the host ({last})")

    def _remove_socket(self) -> None:
        """QEMU removes its socket when the job ends, but not when it dies with the domain."""
        if self._server is not None and self._server.socket:
            try:
                os.unlink(self._server.socket)
            except FileNotFoundError:
                pass

    def _exports(self) -> Dict[str, Tuple[str, Optional[str]]]:
        """disk -> (export name, bitmap export) as libvirt actually set them up."""
        try:
            xml = self.dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            raise self._stopped("the backup job vanished before its data was read") from None
        root = etree.fromstring(xml.encode())
        return {el.get("name") or "": (el.get("exportname") or el.get("name") or "", el.get("exportbitmap"))
                for el in root.iterfind("disks/disk") if el.get("backup") != "no"}

    def _copy_all(self, exports: Dict[str, Tuple[str, Optional[str]]], should_stop: nbdcopy.StopCheck) -> None:
        """Copy every disk's export into its target, the disks side by side (one thread each,
        at most COPY_THREADS); the first failure stops the others. Returns once all ended."""
        server = self._server
        assert server is not None
        failed = threading.Event()

        def stop() -> Optional[str]:
            return should_stop() or ("another disk's copy failed" if failed.is_set() else None)

        def one(t: PullTarget) -> nbdcopy.CopyStats:
            try:
                export, bitmap = exports.get(t.name, (t.name, None))
                if not t.whole and not bitmap:
                    raise BackupFailed(f"libvirt exported disk {t.name} without its dirty bitmap")
                ep = nbdcopy.Endpoint(export, socket=server.socket, host=server.host, port=server.port,
                                      tls=server.tls, tls_certificates=self.tls_dir if server.tls else None)

                def progress(done: int, size: int) -> None:
                    observe.emit("copy", t.name, done, size)

                if t.whole and os.environ.get(WHOLE_COPY_ENV, "qemu-img") != "libnbd":
                    # a whole disk: qemu-img convert reads the export and writes the qcow2 itself
                    return nbdcopy.convert_whole(ep, t.target, should_stop=stop, max_speed=self.max_speed,
                                                 progress=progress if observe.listening() else None,
                                                 key=self.key if t.encrypted else None, compress=t.compressed)
                return nbdcopy.copy(ep, t.target, None if t.whole else f"qemu:dirty-bitmap:{bitmap}",
                                    should_stop=stop, max_speed=self.max_speed,
                                    progress=progress if observe.listening() else None,
                                    key=self.key if t.encrypted else None, compress=t.compressed)
            except BaseException:
                failed.set()
                raise

        errors: List[BaseException] = []
        with ThreadPoolExecutor(max_workers=max(1, min(len(self._targets), COPY_THREADS))) as pool:
            # each copy reports into this operation's progress (its context, copied per task)
            futures = {t.name: observe.submit(pool, one, t) for t in self._targets}
            for name, fut in futures.items():
                try:
                    st = fut.result()
                except BaseException as exc:  # noqa: BLE001 - collected; the most telling one is raised below
                    errors.append(exc)
                    continue
                self.transfer[name] = {"read": st.read, "written": st.written, "zeroed": st.zeroed,
                                       "seconds": st.seconds}
                log.info("disk %s: %d bytes read over NBD, %d written, %d zeroed, %d extents in %.3fs",
                         name, st.read, st.written, st.zeroed, st.extents, st.seconds)
                self.notify(f"disk {name}: {st.read} bytes read over NBD, {st.written} written, "
                            f"{st.zeroed} zeroed in {st.seconds:.2f}s")
        if not errors:
            return
        for err in errors:    # a real failure beats the copies it stopped
            if isinstance(err, nbdcopy.NbdError):
                msg = str(err)
                raise self._stopped(f"lost the NBD connection: {msg}"
                                    if "connect" in msg or "lost" in msg else msg) from None
        for err in errors:
            if not isinstance(err, nbdcopy.CopyStopped):
                raise err
        raise self._stopped()

    def _stopped(self, detail: Optional[str] = None) -> OperationFailed:
        """The error for a copy that ended early, by the most telling cause."""
        watch = self._watch
        why = self.interrupted or (watch.interrupted if watch is not None else None)
        if why:
            return Interrupted(f"backup {observe.interruption(why)}; nothing was recorded")
        try:
            stopped = not self.dom.isActive()
        except libvirt.libvirtError:
            stopped = False
        if stopped:
            return BackupFailed("backup job failed: the domain stopped during the backup")
        if watch is not None and watch.io_paused:
            # the scratch file is where copy-before-write puts the old data in pull mode
            return BackupFailed("backup job failed: a guest write failed and QEMU paused the guest (I/O error): "
                                "the old data it had to copy did not fit in the scratch file's filesystem; "
                                "give --scratch-dir a filesystem with room for what the guest rewrites "
                                "during a backup")
        if watch is not None and watch.reason:
            return BackupFailed(f"backup job failed: {watch.reason}")
        if (watch is not None and watch.done.is_set()) or job_gone(self.dom):
            errmsg = completed_stats(self.dom, watch).get("errmsg") if watch is not None else None
            return BackupFailed("backup job failed: the job ended before its data was read"
                                + (f" ({errmsg})" if errmsg else ""))
        return BackupFailed(f"backup failed: {detail or 'the NBD copy stopped'}")


def refuse_remote(uri: Optional[str], what: str) -> None:
    """Exit 2 up front for what needs the hypervisor's files on this host (or ours on it)."""
    if host.is_remote(uri):
        raise UsageError(f"{what} is not possible with a remote libvirt URI ({uri}): {_WHY[what]}")


_WHY = {
    "status of a shut-off domain": "its bitmaps are only in its image files on that host; start the "
                                   "domain or run virtbackup on that host",
    "repair of a shut-off domain": "its bitmaps are only in its image files on that host; start the "
                                   "domain or run virtbackup on that host",
    "an offline backup": "it reads the shut-off domain's image files, which are on that host; start the "
                         "domain (pull mode backs it up over NBD) or run virtbackup on that host",
    "restore --instant": "the new domain would run on that host on overlays backed by this host's "
                         "backup directory, which it cannot see; restore without --instant",
}
