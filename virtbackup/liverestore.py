"""Live restore: a domain that runs at once on instant-restore overlays and frees itself.

`restore --instant` gives each disk an overlay whose backing is the point's image in the backup
directory. A live restore defines and starts a domain on those overlays, then copies the
backing data into them while the guest runs, with libvirt's block pull (QEMU's stream job):

- blockpull works in place: the overlay keeps its name, the guest's own writes stay where
  they are (the stream copies only clusters the overlay does not hold yet), and an
  interrupted pull keeps every cluster it copied, so a resume copies only the rest. When the
  job completes QEMU drops the backing link from the overlay's header and closes the backup
  image. libvirt 9.0 allows it on a persistent domain (measured: slower than blockcopy
  on an idle host, see scripts/bench_live_restore.py).
- blockcopy + pivot: on a persistent domain libvirt 9.0 refuses it ("domain is not transient")
  unless VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB (a job libvirt does not keep across its restart),
  it writes a second file that must replace the overlay, and an interrupted mirror starts over.

The backup directory stays read-only: QEMU opens the backing images read-only and the stream
never writes below the overlay. While QEMU has them open, `prune` refuses to touch them (the
same OFD-lock check that protects `restore --instant`, see retention._in_use).

The domain carries a small `<metadata>` record (namespace LIVE_NS) naming its overlays until
every disk is independent: `restore --resume-live NAME` continues from it, and refuses domains
that are not live restores of virtbackup (it never pulls another tool's disks).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import libvirt
from lxml import etree

from virtbackup import observe
from virtbackup.errors import DomainNotFound, Interrupted, OperationFailed, RestoreFailed, UsageError, VirtBackupError
from virtbackup.qemu import qemu_img
from virtbackup.store.chain import BackupDir
from virtbackup.virt import host
from virtbackup.virt.domxml import DomainXML
from virtbackup.virt.restoredom import LIVE_KEY, LIVE_NS, live_record

log = logging.getLogger(__name__)



@dataclass
class LiveResult:
    domain: str
    uuid: str
    images: Dict[str, Path]             # disk target -> overlay, now standalone
    backup_dir: str
    point: str
    time_to_running: Optional[float]    # seconds from the call to a running domain (None: resumed)
    time_to_independent: float          # seconds from the call until no disk had a backing file
    resumed: bool = False
    offline: bool = False               # resumed on a shut-off domain: flattened with qemu-img
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """{"domain": {"name", "uuid"}, "point", "backup_dir", "images": {disk: path}, "live": true,
        "resumed", "offline", "time_to_running", "time_to_independent", "notes"} (the
        `restore --live --json` and `restore --resume-live --json` output)."""
        return {"domain": {"name": self.domain, "uuid": self.uuid}, "point": self.point,
                "backup_dir": self.backup_dir, "images": {k: str(v) for k, v in self.images.items()},
                "live": True, "resumed": self.resumed, "offline": self.offline,
                "time_to_running": self.time_to_running, "time_to_independent": self.time_to_independent,
                "notes": self.notes}


def resume_hint(name: str) -> str:
    return f"virtbackup restore --resume-live {name}"


# --- the record in the domain's <metadata> -----------------------------------------------------
def _record_xml(backup_dir: str, point: str, images: Dict[str, Path]) -> str:
    """The record as libvirt's setMetadata takes it (libvirt adds the namespace)."""
    return etree.tostring(live_record(backup_dir, point, images, namespaced=False), encoding="unicode")


def _read_record(dom: libvirt.virDomain) -> Optional["tuple[str, str, Dict[str, Path]]"]:
    """(backup dir, point, {disk: overlay}) from the domain's config, None if it has none."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, LIVE_NS,
                           libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise OperationFailed(f"cannot read the metadata of domain '{dom.name()}': "
                              f"{host.libvirt_message(e)}") from None
    try:
        root = etree.fromstring(xml.encode())
        images = {str(d.get("target")): Path(str(d.get("overlay"))) for d in root.findall("disk")}
        if not images or any(not p.is_absolute() for p in images.values()):
            raise ValueError("no disks, or an overlay path that is not absolute")
        return str(root.get("backup-dir")), str(root.get("point")), images
    except (etree.LxmlError, TypeError, ValueError) as e:
        raise OperationFailed(f"domain '{dom.name()}' has a damaged live-restore record: {e}") from None


def _set_record(dom: libvirt.virDomain, xml: Optional[str]) -> None:
    """Write (or with None remove) the record in the config, and in the live XML when running."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    host.call(dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml,
              LIVE_KEY if xml else None, LIVE_NS, flags)


# --- block pull ----------------------------------------------------------------------------------
def _backing_of(dom: libvirt.virDomain, disk: str) -> Optional[str]:
    """The backing file libvirt sees under the disk's active layer (live XML), None if none."""
    d = DomainXML.parse(dom.XMLDesc(0)).disk(disk)
    if d is None:
        raise OperationFailed(f"domain '{dom.name()}' has no disk {disk}")
    return d.backing_source


def _header_backing(path: Path) -> Optional[str]:
    """The backing link in the image header (read with -U: QEMU has the image open)."""
    link = qemu_img.info(path, force_share=True).get("backing-filename")
    return None if link is None else str(link)


class Puller(host.DomainEvents):
    """Block pulls of some disks of one running domain: start (or adopt), watch, abort."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, disks: Sequence[str],
                 max_speed: Optional[int]):
        self.disks = list(disks)
        self.max_speed = max_speed
        self.ended: Dict[str, int] = {}        # disk -> VIR_DOMAIN_BLOCK_JOB_{COMPLETED,FAILED,...}

        def on_job(disk: str, jtype: int, status: int) -> bool:
            if jtype == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL and status != libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                self.ended[disk] = status
                return True
            return False

        super().__init__(conn, dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, on_job)

    def start(self) -> List[str]:
        """Start a pull on every disk that still has a backing file; adopt pulls already running
        (a run killed before them). Returns the disks being pulled."""
        active = []
        for disk in self.disks:
            info = host.call(self.dom.blockJobInfo, disk, 0)
            if info:
                if info.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL:
                    raise OperationFailed(f"disk {disk} of domain '{self.dom.name()}' has another block job "
                                          f"running (type {info.get('type')}); wait for it to end")
                log.info("adopting the block pull already running on disk %s", disk)
                if self.max_speed is not None:
                    host.call(self.dom.blockJobSetSpeed, disk, self.max_speed,
                              libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
                active.append(disk)
                continue
            if _backing_of(self.dom, disk) is None:
                continue
            log.info("block pull of disk %s of %s (max speed %s)", disk, self.dom.name(),
                     self.max_speed or "unlimited")
            try:
                host.call(self.dom.blockPull, disk, self.max_speed or 0,
                          libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
            except libvirt.libvirtError as e:
                raise OperationFailed(f"cannot start the block pull of disk {disk}: "
                                      f"{host.libvirt_message(e)}") from None
            active.append(disk)
        return active

    def progress(self, disks: Sequence[str]) -> None:
        """Each pull's position (blockJobInfo cur of end) as a copy event (only when someone listens)."""
        if not observe.listening():
            return
        for disk in disks:
            try:
                info = self.dom.blockJobInfo(disk, 0)
            except libvirt.libvirtError:
                continue
            if info and int(info.get("end", 0)) > 0:
                observe.emit("copy", disk, int(info.get("cur", 0)), int(info.get("end", 0)))

    def wait(self, disks: Sequence[str], every: float = 0.5) -> None:
        """Until every pull has ended; raises when one failed, the domain stopped, the connection
        closed or the restore was cancelled (a signal, or another thread), after aborting the
        pulls: their copied clusters stay."""
        pending = list(disks)
        while pending:
            self.wake.wait(every)
            self.wake.clear()
            if self.interrupted:
                self.abort(pending)
                raise Interrupted(f"live restore {observe.interruption(self.interrupted)}")
            if self.stopped:
                raise RestoreFailed("the domain stopped during the live restore")
            if self.closed:
                raise RestoreFailed("the connection to libvirtd was closed during the live restore "
                                    "(the copy goes on inside QEMU)")
            for disk in list(pending):
                status = self.ended.get(disk)
                if status is None:
                    try:
                        if self.dom.blockJobInfo(disk, 0):
                            continue          # still running (safety net for a lost event)
                    except libvirt.libvirtError:
                        continue
                    status = (libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED if _backing_of(self.dom, disk) is None
                              else libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED)
                if status != libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED:
                    what = {libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
                            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "was cancelled"}.get(status, "ended")
                    self.abort([d for d in pending if d != disk])
                    raise RestoreFailed(f"the block pull of disk {disk} {what} (see the domain's log "
                                        f"/var/log/libvirt/qemu/{self.dom.name()}.log)")
                pending.remove(disk)
                observe.finish("copy", disk)
            if pending:
                self.progress(pending)

    def abort(self, disks: Sequence[str]) -> None:
        """Cancel the pulls (synchronously). What they copied stays in the overlays, valid."""
        for disk in disks:
            log.info("aborting the block pull of disk %s", disk)
            try:
                if self.dom.blockJobInfo(disk, 0):
                    self.dom.blockJobAbort(disk, 0)
            except libvirt.libvirtError:
                pass


def _pull_all(conn: libvirt.virConnect, dom: libvirt.virDomain, images: Dict[str, Path],
              max_speed: Optional[int]) -> None:
    """Pull every disk's backing data into its overlay; on any failure (a cancel too) the domain
    keeps running on valid overlays and the error says how to resume."""
    name = dom.name()
    puller = Puller(conn, dom, sorted(images), max_speed)
    cancel = observe.cancel_handle()
    try:
        with cancel.on_cancel(puller.interrupt), host.signals_noted(cancel.cancel):
            try:
                active = puller.start()
                puller.progress(active)
                puller.wait(active)
            except VirtBackupError as e:
                if puller.stopped or not _is_active(dom):
                    raise type(e)(f"{e}; domain '{name}' is not running, its overlays are valid and still "
                                  f"read from the backup; finish with '{resume_hint(name)}' (copies offline)"
                                  ) from None
                raise type(e)(f"{e}; domain '{name}' keeps running on its overlays, which still read from "
                              f"the backup; resume with '{resume_hint(name)}'") from None
    finally:
        puller.close()
    for disk, path in images.items():
        left = _header_backing(path)
        if left is not None:
            raise RestoreFailed(f"disk {disk}: the pull ended but {path} still has backing {left}; "
                                f"resume with '{resume_hint(name)}'")


def _is_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def check_speed(max_speed: Optional[int]) -> None:
    if max_speed is not None and max_speed <= 0:
        raise UsageError(f"--max-speed must be a positive number of bytes per second, not {max_speed}")


# --- the two entry points ------------------------------------------------------------------------
def refuse_encrypted(backup_dir: Path) -> None:
    """Exit 2 before anything for an encrypted backup, like `restore --instant`: the running
    domain would read the LUKS backup images through its overlays, so libvirt would have to
    keep the key as a persistent secret on this host."""
    chain = BackupDir(backup_dir).load()
    if chain.encryption is not None:
        raise UsageError(f"restore --live of an encrypted backup would need its key stored in libvirt; "
                         f"nothing was changed; restore decrypted copies instead: virtbackup restore "
                         f"{backup_dir} OUTPUT_DIR --key-file FILE --define NAME")


def live_restore(backup_dir: Path, output_dir: Path, define: Optional[str], point: Optional[str] = None,
                 disks: Sequence[str] = (), uri: Optional[str] = None, max_speed: Optional[int] = None,
                 on_running: Optional[Callable[[str, float], None]] = None) -> LiveResult:
    """`restore --live --define NAME`: running at once, independent of the backup when it returns.

    The overlays and the domain come from restore's instant path (same checks, same refusals
    before anything is written). If the domain does not start, it is undefined and its overlays
    removed again (nothing ran on them). `on_running(name, seconds)` is called once it runs.
    """
    from virtbackup import restore as restore_mod
    if not define:
        raise UsageError("--live needs --define NAME (the domain to run on the restored disks)")
    check_speed(max_speed)
    refuse_encrypted(Path(backup_dir))
    t0 = time.monotonic()
    # the domain is defined with its record (D8: a run killed right after the define leaves a
    # domain that --resume-live finishes and that prune sees, never one on overlays nobody knows)
    res = restore_mod.restore(Path(backup_dir), Path(output_dir), point, disks, instant=True,
                              define=define, start=False, uri=uri, live=True)
    assert res.domain is not None
    images = {d: Path(os.path.abspath(p)) for d, p in res.images.items()}
    bdir_abs = os.path.abspath(backup_dir)
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, res.domain)
        try:
            if _read_record(dom) is None:
                raise RestoreFailed(f"domain '{res.domain}' was defined without its live-restore record")
            dom.create()
        except BaseException as e:
            _take_back(dom, images)     # nothing ran on the overlays yet: leave nothing behind
            if not isinstance(e, (libvirt.libvirtError, VirtBackupError)):
                raise
            msg = host.libvirt_message(e) if isinstance(e, libvirt.libvirtError) else str(e)
            raise RestoreFailed(f"domain '{res.domain}' did not start: {msg}; it was undefined and its "
                                "overlays removed") from None
        running = time.monotonic() - t0
        if on_running is not None:
            on_running(res.domain, running)
        _pull_all(conn, dom, images, max_speed)
        _set_record(dom, None)
        return LiveResult(res.domain, dom.UUIDString(), images, bdir_abs, res.point.id,
                          running, time.monotonic() - t0, notes=res.notes)


def _take_back(dom: libvirt.virDomain, images: Dict[str, Path]) -> None:
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError:
        pass
    for p in images.values():
        try:
            p.unlink()
        except OSError:
            pass


def resume_live(name: str, uri: Optional[str] = None, max_speed: Optional[int] = None) -> LiveResult:
    """`restore --resume-live NAME`: finish an interrupted live restore.

    Running domain: pull what is left (adopting pulls still running). Shut-off domain: flatten
    each overlay in place with qemu-img (the same copy, offline). Either way the record is
    removed only once every overlay is standalone.
    """
    check_speed(max_speed)
    t0 = time.monotonic()
    with host.connection(uri) as conn:
        try:
            dom = host.lookup_domain(conn, name)
        except DomainNotFound:
            raise DomainNotFound(f"domain '{name}' not found") from None
        rec = _read_record(dom)
        if rec is None:
            raise UsageError(f"domain '{name}' has no live restore to resume (it was not made by "
                             "'virtbackup restore --live', or its live restore has finished)")
        bdir, point, images = rec
        offline = not dom.isActive()
        if offline:
            from virtbackup.restore import flatten
            for disk, path in sorted(images.items()):
                observe.check()
                size = int(qemu_img.info(path).get("virtual-size", 0)) if observe.listening() else 0
                observe.emit("copy", disk, 0, size)
                try:
                    flatten(path)
                except VirtBackupError as e:
                    raise RestoreFailed(f"disk {disk}: {e}") from None
                observe.finish("copy", disk)
        else:
            _pull_all(conn, dom, images, max_speed)
        _set_record(dom, None)
        return LiveResult(dom.name(), dom.UUIDString(), images, bdir, point, None,
                          time.monotonic() - t0, resumed=True, offline=offline)


def domains_using(backup_dir: Path, uri: Optional[str] = None) -> "tuple[Dict[str, str], Optional[str]]":
    """Images of `backup_dir` that a defined domain's disk is layered on (an instant or live
    restore, running or not): {real path: "domain 'NAME' (disk vda)"}, and a warning when libvirt
    could not be asked. Read from the qcow2 headers of the domains' own disk files (never opened
    by QEMU), following backing links outside the backup dir up to 32 deep."""
    from virtbackup.store.integrity import backing_name
    root = os.path.realpath(backup_dir)
    users: Dict[str, str] = {}
    try:
        with host.connection(uri) as conn:
            domains = conn.listAllDomains(0)
            for dom in domains:
                xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
                if dom.isActive():
                    xmls.append(dom.XMLDesc(0))
                for xml in xmls:
                    for d in DomainXML.parse(xml).disks:
                        if d.type != "file" or not d.source:
                            continue
                        path = d.source
                        for _ in range(32):
                            link = backing_name(Path(path))
                            if not link or link.startswith("json:") or ":" in link.split("/")[0]:
                                break
                            path = os.path.realpath(os.path.join(os.path.dirname(path), link))
                            if path == root or path.startswith(root + os.sep):
                                users.setdefault(path, f"domain '{dom.name()}' (disk {d.target})")
                                break
    except (libvirt.libvirtError, VirtBackupError) as e:
        msg = host.libvirt_message(e) if isinstance(e, libvirt.libvirtError) else str(e)
        return users, (f"could not ask libvirt which domains are layered on this directory ({msg}): a shut-off "
                       "domain on an instant or live restore overlay is not protected from this prune")
    return users, None


__all__ = ["LiveResult", "live_restore", "resume_live", "resume_hint", "LIVE_NS", "domains_using"]
