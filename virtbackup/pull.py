"""Pull-mode backups: libvirt exports the disks over NBD and virtbackup reads them itself.

The backup directory then only has to be reachable by this process, not by the hypervisor's
QEMU: another host (remote libvirt URIs), or storage the hypervisor does not mount. Planning,
target images, metadata, checkpoints and rollback are the push runner's (backup.Backup); only
the job differs: `<domainbackup mode='pull'>` with libvirt's NBD server (a unix socket for a
local libvirtd, TCP on the host's name for a remote one) and copy-before-write scratch files on
the hypervisor, then nbdcopy.copy() per disk into the pre-created qcow2 target, then the job is
ended (libvirt deletes the scratch files it created).
"""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import libvirt
from lxml import etree

from . import host, nbdcopy, xmlbuild
from .backup import Backup, _abort_job, _completed_stats, _job_gone, _job_writes_into
from .chain import POINTS_DIR
from .errors import BackupFailed, Interrupted, OperationFailed, UsageError

# libvirt 9.0 needs an explicit TCP port for a pull backup's NBD server (it has no allocator);
# these are tried in random order until one is free on the host (NBD's own port first).
PORT_RANGE = os.environ.get("VIRTBACKUP_NBD_PORTS", "10809-10872")
PORT_ATTEMPTS = 8
COPY_THREADS = 4        # disks copied side by side (each: one NBD connection, 16 requests in flight)


def run_dir() -> Path:
    return Path(os.environ.get("VIRTBACKUP_RUN_DIR", "/run/virtbackup"))


def _ports() -> List[int]:
    lo, _, hi = PORT_RANGE.partition("-")
    ports = list(range(int(lo), int(hi or lo) + 1))
    random.shuffle(ports)
    return ports[:PORT_ATTEMPTS]


def scratch_path(scratch_dir: Optional[str], source: str, cp_name: str, disk: str) -> str:
    """The scratch file of one disk on the hypervisor: in `scratch_dir`, or else beside the
    disk's image (a directory that exists on that host and has room for the disk's data).
    The name carries the checkpoint name: that is how a later run recognises a job of this
    directory (backup._job_writes_into)."""
    where = scratch_dir or os.path.dirname(source) or "/var/lib/libvirt/images"
    return str(Path(where) / f"{cp_name}-{disk}.scratch")


def _parse_push_xml(bxml: str) -> Tuple[Optional[str], List[Tuple[str, Path, bool]]]:
    """(base checkpoint, [(disk, target image, copied whole)]) from the push XML Backup.run built."""
    root = etree.fromstring(bxml.encode())
    base = root.findtext("incremental")
    disks = []
    for el in root.iterfind("disks/disk"):
        target = el.find("target")
        if el.get("backup") == "no" or target is None:
            continue
        disks.append((el.get("name") or "", Path(target.get("file") or ""),
                      base is None or el.get("backupmode") == "full"))
    return base, disks


class PullBackup(Backup):
    """Backup.run with the pull job: NBD export on the host, the copy in this process."""

    transport = "pull"

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, bdir: Any, notify: Any = None,
                 scratch_dir: Optional[str] = None):
        super().__init__(conn, dom, bdir, notify)
        self.scratch_dir = scratch_dir
        self.remote = host.is_remote(conn.getURI())

    def _server(self, cp_name: str) -> List[xmlbuild.NbdServer]:
        """Servers to try in order: the unix socket, or TCP ports on the remote host."""
        if not self.remote:
            rd = run_dir()
            rd.mkdir(mode=0o700, parents=True, exist_ok=True)
            return [xmlbuild.NbdServer(socket=str(rd / f"nbd-{cp_name}.sock"))]
        name = host.uri_host(self.conn.getURI()) or "localhost"
        return [xmlbuild.NbdServer(host=name, port=p) for p in _ports()]

    def _begin(self, disks: List[xmlbuild.PullDisk], base: Optional[str], cxml: str,
               cp_name: str) -> xmlbuild.NbdServer:
        last = ""
        for server in self._server(cp_name):
            if server.socket:
                try:
                    os.unlink(server.socket)   # a stale socket of a killed run of ours
                except FileNotFoundError:
                    pass
            bxml = xmlbuild.pull_backup_xml(disks, base, server)
            try:
                host.call(self.dom.backupBegin, bxml, cxml, 0)
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

    def _exports(self) -> Dict[str, Tuple[str, Optional[str]]]:
        """disk -> (export name, bitmap export) as libvirt actually set them up."""
        root = etree.fromstring(self.dom.backupGetXMLDesc(0).encode())
        return {el.get("name") or "": (el.get("exportname") or el.get("name") or "", el.get("exportbitmap"))
                for el in root.iterfind("disks/disk") if el.get("backup") != "no"}

    def _run_job(self, bxml: str, cxml: str, cp_name: str) -> None:
        base, targets = _parse_push_xml(bxml)
        prefix = cp_name[:len(cp_name) - len(cp_name.rsplit("-", 1)[-1])]
        self._clear_leftover_job(prefix)
        sources = {d.target: d.source or "" for d in host.domain_disks(self.dom.XMLDesc(0))}
        pdisks = [xmlbuild.PullDisk(name, scratch_path(self.scratch_dir, sources.get(name, ""), cp_name, name),
                                    full=whole) for name, _t, whole in targets]
        self.transfer = {}
        watch = host.JobWatch(self.conn, self.dom)
        server: Optional[xmlbuild.NbdServer] = None

        def should_stop() -> Optional[str]:
            if watch.interrupted:
                return watch.interrupted
            if watch.done.is_set():
                return watch.reason or "the backup job ended before its data was read"
            return None

        try:
            with host.signals_noted(watch.interrupt):   # wake the copy: abort, roll back
                server = self._begin(pdisks, base, cxml, cp_name)
                self._copy_all(targets, self._exports(), server, should_stop, watch)
                # every export read: the job must still be running, or what we read may be torn
                if should_stop() is not None or _job_gone(self.dom):
                    raise self._stopped(watch)
                watch.done.clear()
                try:
                    self.dom.abortJob()      # ends a pull job: the normal way to finish it
                except libvirt.libvirtError as e:
                    raise BackupFailed(f"could not end the backup job: {host.libvirt_message(e)}") from None
                if not watch.wait(lambda: _job_gone(self.dom), check_every=0.5, timeout=60):
                    raise BackupFailed("the backup job did not end within 60 s after all data was read")
                if watch.interrupted:
                    raise Interrupted(f"backup interrupted by {watch.interrupted}; nothing was recorded")
            stats = _completed_stats(self.dom, watch)
        finally:
            watch.close()
            if server is not None and server.socket:
                # QEMU removes its socket when the job ends, but not when it dies with it
                try:
                    os.unlink(server.socket)
                except FileNotFoundError:
                    pass
        # libvirt reports an ended pull job as completed (errmsg 'Operation canceled'); a failed
        # copy-before-write on the host (e.g. its scratch file's storage filled up) as failed
        if stats.get("type") not in (None, libvirt.VIR_DOMAIN_JOB_COMPLETED) or not stats.get("success", True):
            raise BackupFailed(f"backup job failed: {stats.get('errmsg') or 'libvirt reported a failure'}")

    def _copy_all(self, targets: List[Tuple[str, Path, bool]], exports: Dict[str, Tuple[str, Optional[str]]],
                  server: xmlbuild.NbdServer, should_stop: nbdcopy.StopCheck, watch: host.JobWatch) -> None:
        """Copy every disk's export into its target, the disks side by side (one thread each,
        at most COPY_THREADS); the first failure stops the others. Returns once all ended."""
        failed = threading.Event()

        def stop() -> Optional[str]:
            return should_stop() or ("another disk's copy failed" if failed.is_set() else None)

        def one(name: str, target: Path, whole: bool) -> nbdcopy.CopyStats:
            try:
                export, bitmap = exports.get(name, (name, None))
                if not whole and not bitmap:
                    raise BackupFailed(f"libvirt exported disk {name} without its dirty bitmap")
                ep = nbdcopy.Endpoint(export, socket=server.socket, host=server.host, port=server.port)
                return nbdcopy.copy(ep, target, None if whole else f"qemu:dirty-bitmap:{bitmap}", should_stop=stop)
            except BaseException:
                failed.set()
                raise

        errors: List[BaseException] = []
        with ThreadPoolExecutor(max_workers=max(1, min(len(targets), COPY_THREADS))) as pool:
            futures = {name: pool.submit(one, name, target, whole) for name, target, whole in targets}
            for name, fut in futures.items():
                try:
                    st = fut.result()
                except BaseException as exc:      # collected; the most telling one is raised below
                    errors.append(exc)
                    continue
                self.transfer[name] = {"read": st.read, "written": st.written, "zeroed": st.zeroed,
                                       "seconds": st.seconds}
                self.notify(f"disk {name}: {st.read} bytes read over NBD, {st.written} written, "
                            f"{st.zeroed} zeroed in {st.seconds:.2f}s")
        if not errors:
            return
        for err in errors:    # a real failure beats the copies it stopped
            if isinstance(err, nbdcopy.NbdError):
                msg = str(err)
                raise self._stopped(watch, f"lost the NBD connection: {msg}"
                                    if "connect" in msg or "lost" in msg else msg) from None
        for err in errors:
            if not isinstance(err, nbdcopy.CopyStopped):
                raise err
        raise self._stopped(watch)

    def _stopped(self, watch: host.JobWatch, detail: Optional[str] = None) -> OperationFailed:
        """The error for a copy that ended early, by the most telling cause."""
        if watch.interrupted:
            return Interrupted(f"backup interrupted by {watch.interrupted}; nothing was recorded")
        try:
            stopped = not self.dom.isActive()
        except libvirt.libvirtError:
            stopped = False
        if stopped:
            return BackupFailed("backup job failed: the domain stopped during the backup")
        if watch.reason:
            return BackupFailed(f"backup job failed: {watch.reason}")
        if watch.done.is_set() or _job_gone(self.dom):
            errmsg = _completed_stats(self.dom, watch).get("errmsg")
            return BackupFailed("backup job failed: the job ended before its data was read"
                                + (f" ({errmsg})" if errmsg else ""))
        return BackupFailed(f"backup failed: {detail or 'the NBD copy stopped'}")

    def _clear_leftover_job(self, prefix: str) -> None:
        """A job of this directory left by a killed run is aborted; anyone else's refuses the run."""
        if _job_gone(self.dom):
            return
        if _job_writes_into(self.dom, self.bdir.path / POINTS_DIR, prefix):
            self.notify("aborting the backup job left by an interrupted run")
            if not _abort_job(self.conn, self.dom):
                raise BackupFailed("the backup job left by an interrupted run did not end within 60 s")
            return
        raise BackupFailed(f"another job is running on domain '{self.dom.name()}'; try again when it has ended")


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
