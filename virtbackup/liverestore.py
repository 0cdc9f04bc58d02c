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

An encrypted backup (LUKS in every image of the chain) is restored live the same way; the new
disks are plain, like every restore's without --encrypt: a domain on LUKS disks would need its
key stored in libvirt for good, which encryption at rest is meant to avoid. QEMU needs the key
only to open the backing images, at start: the domain XML spells out each overlay's backing
chain with `<encryption format='luks'><secret uuid=.../>` on every layer (libvirt probes a chain
it is not given, and a probed chain has no key), and the secret is keysecret's ephemeral,
private one, defined just before the start and undefined when the command ends, whatever
happens (the running QEMU keeps what it opened). When the pull completes, libvirt drops the
chain from the live and the persistent XML (measured on 9.0; a leftover is removed here too).
The record names the secret's UUID: a resume (which needs the key: `--key-file`) defines it again
for as long as it pulls, or flattens a shut-off domain's overlays with qemu-img and the key, and
removes what a killed run left (keysecret.remove_stale_secrets).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid as uuidlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import libvirt
from lxml import etree

from virtbackup import observe
from virtbackup.errors import DomainNotFound, Interrupted, OperationFailed, RestoreFailed, UsageError, VirtBackupError
from virtbackup.qemu import qemu_img
from virtbackup.qemu.keys import Key
from virtbackup.store import crypto
from virtbackup.store.chain import BackupDir
from virtbackup.virt import host, keysecret
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


def resume_hint(name: str, encrypted: bool = False) -> str:
    return f"virtbackup restore --resume-live {name}" + (" --key-file FILE" if encrypted else "")


# --- the record in the domain's <metadata> -----------------------------------------------------
class LiveRecord(NamedTuple):
    backup_dir: str
    point: str
    images: Dict[str, Path]             # disk target -> overlay
    secret: Optional[str] = None        # UUID of the key's libvirt secret (an encrypted backup)


_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _record_xml(backup_dir: str, point: str, images: Dict[str, Path], secret: Optional[str] = None) -> str:
    """The record as libvirt's setMetadata takes it (libvirt adds the namespace)."""
    return etree.tostring(live_record(backup_dir, point, images, namespaced=False, secret=secret),
                          encoding="unicode")


def _read_record(dom: libvirt.virDomain) -> Optional[LiveRecord]:
    """The record in the domain's config, None if it has none."""
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
        secret = root.get("secret")
        if secret is not None and not _UUID_RE.match(secret):
            raise ValueError(f"secret {secret!r} is not a UUID")
        return LiveRecord(str(root.get("backup-dir")), str(root.get("point")), images, secret)
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
              max_speed: Optional[int], encrypted: bool = False) -> None:
    """Pull every disk's backing data into its overlay; on any failure (a cancel too) the domain
    keeps running on valid overlays and the error says how to resume."""
    name = dom.name()
    hint = resume_hint(name, encrypted)
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
                                  f"read from the backup; finish with '{hint}' (copies offline)"
                                  ) from None
                raise type(e)(f"{e}; domain '{name}' keeps running on its overlays, which still read from "
                              f"the backup; resume with '{hint}'") from None
    finally:
        puller.close()
    for disk, path in images.items():
        left = _header_backing(path)
        if left is not None:
            raise RestoreFailed(f"disk {disk}: the pull ended but {path} still has backing {left}; "
                                f"resume with '{hint}'")


def _drop_backing_config(conn: libvirt.virConnect, dom: libvirt.virDomain, images: Dict[str, Path]) -> None:
    """Remove the backing chain the persistent XML still spells out under the (now standalone)
    overlays: defined with one (an encrypted backup), it would make QEMU open the backup images
    again at the next start, with a secret that is gone. libvirt 9.0 drops it itself when a pull
    completes; not after an offline flatten."""
    xml = DomainXML.parse(host.call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    changed = False
    for disk in images:
        d = xml.disk(disk)
        if d is None:
            continue
        for store in d.el.findall("backingStore"):
            if len(store):                # <backingStore/> (empty) says "no backing": harmless
                d.el.remove(store)
                changed = True
    if changed:
        try:
            host.call(conn.defineXML, xml.to_string())
        except libvirt.libvirtError as e:
            raise RestoreFailed(f"cannot remove the backup's images from the configuration of domain "
                                f"'{dom.name()}': {host.libvirt_message(e)}") from None


def _is_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def check_speed(max_speed: Optional[int]) -> None:
    if max_speed is not None and max_speed <= 0:
        raise UsageError(f"--max-speed must be a positive number of bytes per second, not {max_speed}")


def _secret_purpose(name: str) -> str:
    return f"live restore of domain {name}"


# --- the two entry points ------------------------------------------------------------------------
def live_restore(backup_dir: Path, output_dir: Path, define: Optional[str], point: Optional[str] = None,
                 disks: Sequence[str] = (), uri: Optional[str] = None, max_speed: Optional[int] = None,
                 on_running: Optional[Callable[[str, float], None]] = None, key: Optional[Key] = None) -> LiveResult:
    """`restore --live --define NAME`: running at once, independent of the backup when it returns.

    The overlays and the domain come from restore's instant path (same checks, same refusals
    before anything is written: a missing or wrong `key` of an encrypted backup is exit 2 with
    nothing defined). If the domain does not start, it is undefined and its overlays removed
    again (nothing ran on them). `on_running(name, seconds)` is called once it runs. An
    encrypted backup's key is an ephemeral libvirt secret from just before the start until this
    returns or raises (the module docstring).
    """
    from virtbackup import restore as restore_mod
    if not define:
        raise UsageError("--live needs --define NAME (the domain to run on the restored disks)")
    check_speed(max_speed)
    t0 = time.monotonic()
    # With a key the domain is defined referring to a secret of this UUID (restore refuses a key
    # for a backup that is not encrypted); the secret itself exists only around the start and
    # the pull below, so a run killed before the start leaves none.
    secret = str(uuidlib.uuid4()) if key is not None else None
    # the domain is defined with its record (D8: a run killed right after the define leaves a
    # domain that --resume-live finishes and that prune sees, never one on overlays nobody knows)
    res = restore_mod.restore(Path(backup_dir), Path(output_dir), point, disks, instant=True,
                              define=define, start=False, uri=uri, live=True, key=key, live_secret=secret)
    assert res.domain is not None
    images = {d: Path(os.path.abspath(p)) for d, p in res.images.items()}
    bdir_abs = os.path.abspath(backup_dir)
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, res.domain)
        held = ExitStack()              # the key's secret, if any: undefined when this ends
        try:
            if _read_record(dom) is None:
                raise RestoreFailed(f"domain '{res.domain}' was defined without its live-restore record")
            if secret is not None and key is not None:
                held.enter_context(keysecret.libvirt_secret(conn, key, _secret_purpose(res.domain), secret))
            dom.create()
        except BaseException as e:
            _take_back(dom, images)     # nothing ran on the overlays yet: leave nothing behind
            held.close()
            if not isinstance(e, (libvirt.libvirtError, VirtBackupError)):
                raise
            msg = host.libvirt_message(e) if isinstance(e, libvirt.libvirtError) else str(e)
            raise RestoreFailed(f"domain '{res.domain}' did not start: {msg}; it was undefined and its "
                                "overlays removed") from None
        with held:
            running = time.monotonic() - t0
            if on_running is not None:
                on_running(res.domain, running)
            _pull_all(conn, dom, images, max_speed, encrypted=secret is not None)
            _drop_backing_config(conn, dom, images)
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


def _check_resume_key(name: str, rec: LiveRecord, key: Optional[Key]) -> None:
    """Exit 2 before anything: an encrypted backup's live restore resumes only with its key
    (checked against the recorded backup dir's key check), a plain one's with none."""
    if rec.secret is None:
        if key is not None:
            raise UsageError(f"domain '{name}' is a live restore of a backup that is not encrypted; "
                             "--key-file is only for encrypted backups")
        return
    if key is None:
        raise UsageError(f"domain '{name}' is a live restore of an encrypted backup; give its key: "
                         f"{resume_hint(name, True)}")
    chain = BackupDir(Path(rec.backup_dir)).load()
    crypto.check_key(chain.encryption, key, f"backup directory {rec.backup_dir}")


def _flatten_offline(images: Dict[str, Path], key: Optional[Key]) -> None:
    """Copy what each overlay still reads from the backup into it, in place, with qemu-img
    (with `key`: every encrypted layer below gets it through a pipe)."""
    from virtbackup.restore import flatten
    for disk, path in sorted(images.items()):
        observe.check()
        size = int(qemu_img.info(path).get("virtual-size", 0)) if observe.listening() else 0
        observe.emit("copy", disk, 0, size)
        try:
            flatten(path, key)
        except VirtBackupError as e:
            raise RestoreFailed(f"disk {disk}: {e}") from None
        observe.finish("copy", disk)


def resume_live(name: str, uri: Optional[str] = None, max_speed: Optional[int] = None,
                key: Optional[Key] = None) -> LiveResult:
    """`restore --resume-live NAME`: finish an interrupted live restore.

    Running domain: pull what is left (adopting pulls still running). Shut-off domain: flatten
    each overlay in place with qemu-img (the same copy, offline). Either way the record is
    removed only once every overlay is standalone. An encrypted backup's needs its `key`
    (exit 2 without it or with another); a secret a killed run left is removed, and while a
    running domain's pull goes on the key is its libvirt secret again (the UUID its XML names).
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
        _check_resume_key(name, rec, key)
        held = ExitStack()
        if rec.secret is not None:
            owner = keysecret.live_owner(conn, rec.secret)
            if owner is not None and owner != os.getpid():
                raise OperationFailed(f"the live restore of domain '{name}' is still running (process "
                                      f"{owner}); wait for it to end, or stop it first")
            keysecret.remove_stale_secrets(conn)          # the one a killed run left, if any
        offline = not dom.isActive()
        with held:
            if offline:
                _flatten_offline(rec.images, key if rec.secret is not None else None)
            else:
                if rec.secret is not None and key is not None:
                    held.enter_context(keysecret.libvirt_secret(conn, key, _secret_purpose(name), rec.secret))
                _pull_all(conn, dom, rec.images, max_speed, encrypted=rec.secret is not None)
            _drop_backing_config(conn, dom, rec.images)
            _set_record(dom, None)
        return LiveResult(dom.name(), dom.UUIDString(), rec.images, rec.backup_dir, rec.point, None,
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
                try:
                    xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
                    if dom.isActive():
                        xmls.append(dom.XMLDesc(0))
                except libvirt.libvirtError as e:
                    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue        # undefined since it was listed: layered on nothing now
                    raise
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


__all__ = ["LiveRecord", "LiveResult", "live_restore", "resume_live", "resume_hint", "LIVE_NS", "domains_using"]
