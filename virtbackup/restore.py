"""Restore a point: one standalone qcow2 per disk, read through the chain with qemu-img convert."""

from __future__ import annotations

import fcntl
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lxml import etree

from virtbackup import env, observe
from virtbackup.errors import (
    DamageFound,
    DiskNotFound,
    OutputExists,
    RestoreFailed,
    UnsafePath,
    UsageError,
    VirtBackupError,
)
from virtbackup.qemu import keys, qemu_img
from virtbackup.store import crypto, integrity
from virtbackup.store.chain import BackupDir, Chain, Point, create_new, open_new, shared_lock
from virtbackup.virt import host, restoredom


@dataclass
class RestoreResult:
    point: Point
    images: Dict[str, Path]     # disk target -> restored image (or instant-restore overlay)
    instant: bool = False
    domain: Optional[str] = None        # name of the domain defined from the point (--define)
    domain_uuid: Optional[str] = None
    started: bool = False
    notes: List[str] = field(default_factory=list)
    missing: Dict[str, str] = field(default_factory=dict)   # --salvage: disk -> why it was not restored
    cleaned: List[str] = field(default_factory=list)        # files of a dead restore removed first

    def to_json(self) -> Dict[str, Any]:
        """{"point", "images": {disk: path}, "instant", "domain": {"name", "uuid", "started"} | null,
        "notes", "missing": {disk: why}, "cleaned"} (the `restore --json` output)."""
        return {"point": self.point.id, "images": {k: str(v) for k, v in self.images.items()},
                "instant": self.instant,
                "domain": ({"name": self.domain, "uuid": self.domain_uuid, "started": self.started}
                           if self.domain else None), "notes": self.notes,
                "missing": self.missing, "cleaned": self.cleaned}


@dataclass
class FlattenResult:
    image: Path
    standalone: bool = True

    def to_json(self) -> Dict[str, Any]:
        """{"image", "standalone"} (the `flatten --json` output)."""
        return {"image": str(self.image), "standalone": self.standalone}


JOURNAL_PREFIX = ".virtbackup-restore-"
_JOURNAL = re.compile(r"^\.virtbackup-restore-(\d+)$")
_OUR_NAME = re.compile(r"^\.?[A-Za-z][A-Za-z0-9]{0,31}\.qcow2(?:\.partial-\d+)?$")


class Journal:
    """What a restore is writing into OUTPUT_DIR, so that a rerun can take back what a killed
    restore left (its temp files and the disks it had already placed) and nothing else.

    One file per run, `.virtbackup-restore-<pid>`, created O_EXCL|O_NOFOLLOW and flocked for
    the run's life: a journal whose lock can be taken belongs to a dead run. Placed disks are
    recorded with their inode, so a file that replaced them since is never removed.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / f"{JOURNAL_PREFIX}{os.getpid()}"
        self.fd = open_new(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def note(self, kind: str, path: Path, ino: int = 0) -> None:
        os.write(self.fd, f"{kind} {path.name} {ino}\n".encode())
        os.fsync(self.fd)

    def close(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)


def clean_dead_restores(output_dir: Path) -> List[str]:
    """Remove what restores killed in OUTPUT_DIR left (their journal names it); names removed."""
    removed: List[str] = []
    try:
        entries = sorted(os.listdir(output_dir))
    except OSError:
        return removed
    for name in entries:
        if not _JOURNAL.match(name):
            continue
        jpath = output_dir / name
        try:
            fd = os.open(jpath, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue                                # a symlink or gone: not a journal of ours
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                            # its restore is still running
            with os.fdopen(os.dup(fd), "r") as f:
                lines = f.read().splitlines()
            for line in lines:
                parts = line.split()
                if len(parts) != 3 or not _OUR_NAME.match(parts[1]):
                    continue
                target = output_dir / parts[1]
                try:
                    st = os.lstat(target)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if parts[0] == "placed" and str(st.st_ino) != parts[2]:
                    continue                        # replaced since: not ours any more
                os.unlink(target)
                removed.append(parts[1])
            os.unlink(jpath)
        finally:
            os.close(fd)
    return removed


def _place(tmp: Path, out: Path) -> None:
    """Give the finished image its name without ever overwriting: a hard link fails if `out`
    exists. Filesystems without hard links (vfat, exFAT, some CIFS) get check-then-rename."""
    import errno
    try:
        os.link(tmp, out)
        return
    except FileExistsError:
        raise OutputExists(f"{out} appeared during the restore; not overwriting it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    if out.exists():
        raise OutputExists(f"{out} appeared during the restore; not overwriting it")
    os.rename(tmp, out)


# What libvirt refuses in a domain name (seen on libvirt 9.0): '/', a newline, any character XML
# can't carry (the C0 controls), and a name too long for /etc/libvirt/qemu/NAME.xml.new (255 bytes).
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
MAX_DOMAIN_NAME_BYTES = 255 - len(".xml.new")


def domain_name_problem(name: str) -> Optional[str]:
    """Why libvirt would refuse `name` for a new domain (None: it would take it)."""
    if not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return "it names a directory"
    if "/" in name:
        return "it contains '/'"
    if "\n" in name or "\r" in name or "\t" in name or _XML_BAD.search(name):
        return "it contains a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_DOMAIN_NAME_BYTES:
        return f"it is longer than {MAX_DOMAIN_NAME_BYTES} bytes"
    return None


def check_output_dir(output_dir: Path) -> None:
    """Refuse (UnsafePath, exit 2) an OUTPUT_DIR, or the nearest existing directory above a new
    one, that is not root's or ours or that other users can write to (not sticky): the restore
    works by name in it, and another user could swap names under it (env.unsafe_dir)."""
    where = Path(os.path.abspath(output_dir))
    while True:
        try:
            st = os.stat(where)
            break
        except FileNotFoundError:
            if where.parent == where:
                return
            where = where.parent
        except OSError:
            return          # unreadable: the restore says why when it gets there
    if not stat.S_ISDIR(st.st_mode):
        return              # not a directory: the restore refuses it with its own message
    problem = env.unsafe_dir(st)
    if problem:
        raise UnsafePath(f"not restoring into {output_dir}: {where} is unsafe: {problem}")


def _make_output_dir(output_dir: Path) -> List[Path]:
    """Create OUTPUT_DIR and the missing directories above it (0755 as mkdir -p would; the images
    are 0600), one by one and exclusively, below the nearest existing directory `check_output_dir`
    checked. One that appeared meanwhile (in a sticky /tmp another user may take the name first)
    is refused: it would not be ours. Returns the directories made, top first."""
    missing: List[Path] = []
    where = Path(os.path.abspath(output_dir))
    while not os.path.lexists(where):
        missing.append(where)
        where = where.parent
    made: List[Path] = []
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            made.append(d)
    except FileExistsError:
        _remove_dirs(made)
        raise UnsafePath(f"{d} appeared while the restore created it; not using a directory it did not "
                         "make") from None
    except OSError as e:
        _remove_dirs(made)
        raise UsageError(f"cannot create {output_dir}: {e.strerror}") from None
    return made


def _remove_dirs(dirs: List[Path]) -> None:
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass


def _check_encrypted_restore(bdir: BackupDir, chain: Chain, key: Optional[keys.Key], encrypt: bool,
                             instant: bool, define: Optional[str], live: bool = False) -> None:
    """Exit 2 before anything is written when the key or the options don't fit the chain."""
    if encrypt and key is None:
        raise UsageError("restore --encrypt needs the key: --key-file FILE")
    crypto.check_key(chain.encryption, key, f"backup directory {bdir.path}")
    if chain.encryption is None:
        return
    how = f"virtbackup restore {bdir.path} OUTPUT_DIR --key-file FILE"
    if live and instant and define and not encrypt:
        return          # the key lives in libvirt only while the live restore runs (liverestore.py)
    if instant:
        # The overlays would run on the encrypted backup images: the domain would need the key
        # as a persistent libvirt secret, i.e. stored on this host beside the backups.
        raise UsageError("an instant restore of an encrypted backup would need its key stored in libvirt; "
                         f"restore decrypted copies instead: {how} [--define NAME]")
    if define and encrypt:
        raise UsageError("--define with --encrypt: the new domain would need the key stored in libvirt; "
                         f"restore decrypted disks to define a domain on: {how} --define NAME")


def restore(backup_dir: Path, output_dir: Path, point_id: Optional[str] = None,
            disks: Sequence[str] = (), instant: bool = False, define: Optional[str] = None,
            start: bool = False, uri: Optional[str] = None, salvage: bool = False,
            key: Optional[keys.Key] = None, encrypt: bool = False, live: bool = False,
            live_secret: Optional[str] = None) -> RestoreResult:
    """Restore a point into OUTPUT_DIR; optionally define (and start) a new domain on the result.

    `instant`: no copy; each disk gets a qcow2 overlay whose backing is the point's image in the
    backup dir (absolute path: the overlay lives outside the backup dir and must keep working
    from any cwd; QEMU opens the backup images read-only). `virtbackup flatten` makes it standalone.
    Everything is checked before anything is written: every image the restore reads must match
    its recorded size, backing link and hash (else exit 1 naming it; `salvage` restores the disks
    whose chains are intact and says which are missing). A failed define removes the images again.
    The backup dir's shared lock is held throughout: a prune can't change what is being read.
    An encrypted chain needs its `key` (checked before anything else, exit 2); the restored
    images are plain unless `encrypt` (then LUKS with the same key). `live` (with `instant` and
    `define`): the domain is defined with its live-restore record (liverestore.py); of an
    encrypted chain (with its `key`), its overlays' backing chains are spelled out in the domain
    XML, each layer opened with the libvirt secret `live_secret` (which the caller defines).
    """
    if start and not define:
        raise UsageError("--start needs --define NAME")
    if define is not None and not define.strip():
        raise UsageError("--define needs a domain name, not an empty string")
    if define is not None:
        problem = domain_name_problem(define)
        if problem:     # before anything is read or written, not after the copy (libvirt says it then)
            raise UsageError(f"--define {define!r}: not a domain name libvirt accepts: {problem}; nothing was restored")
    check_output_dir(Path(output_dir))
    for n in disks:
        if not n:
            raise UsageError("--disk needs a disk name, not an empty string")
    if instant and define:
        # the domain would run on that host with backing files in this host's backup directory
        from virtbackup.runners.pull import refuse_remote
        from virtbackup.virt.host import is_remote
        if is_remote(uri):
            refuse_remote(uri or "", "restore --instant")
    bdir = BackupDir(backup_dir)
    # exit 2 on a missing/corrupt dir, a missing or wrong key, before locking
    first = bdir.load()
    _check_encrypted_restore(bdir, first, key, encrypt, instant, define, live)
    with shared_lock(bdir):
        chain = bdir.load()                         # what is recorded now (a prune may have just ended)
        if chain.encryption != first.encryption:    # replaced meanwhile: the key check again
            _check_encrypted_restore(bdir, chain, key, encrypt, instant, define, live)
        if live and instant and chain.encryption is not None and live_secret is None:
            raise UsageError("a live restore of an encrypted backup needs a libvirt secret for its key")
        return _restore_locked(bdir, chain, Path(output_dir), point_id, disks, instant, define, start,
                               uri, salvage, key, encrypt, live, live_secret)


def _damage_error(chain: Chain, point: Point, damage: List[integrity.ImageDamage]) -> DamageFound:
    bad = [d.image for d in damage]
    listed = "; ".join(f"{d.where}: {d.problem}" for d in damage[:3])
    more = f"; {len(damage) - 3} more damaged image(s)" if len(damage) > 3 else ""
    return DamageFound(f"point {point.id} can't be restored: damaged image {listed}{more}; affected points: "
                       f"{', '.join(integrity.affected_points(chain, bad))}; nothing was restored "
                       "(--salvage restores the disks whose images are intact)")


def _missing(chain: Chain, point: Point, names: Sequence[str],
             damage: List[integrity.ImageDamage]) -> Dict[str, str]:
    """Disks whose chain reads a damaged image -> why."""
    out: Dict[str, str] = {}
    for n in names:
        hit = next((d for d in damage if d.image in chain.image_chain(point, n)), None)
        if hit is not None:
            out[n] = f"image {hit.image} (point {hit.point}) is damaged: {hit.problem}"
    return out


def _restore_locked(bdir: BackupDir, chain: Chain, output_dir: Path, point_id: Optional[str],
                    disks: Sequence[str], instant: bool, define: Optional[str], start: bool,
                    uri: Optional[str], salvage: bool, key: Optional[keys.Key] = None,
                    encrypt: bool = False, live: bool = False,
                    live_secret: Optional[str] = None) -> RestoreResult:
    point = chain.point(point_id)
    names = list(dict.fromkeys(disks)) or sorted(point.disks)
    for n in names:
        if n not in point.disks:
            raise DiskNotFound(f"point {point.id} has no disk '{n}' (disks: {', '.join(sorted(point.disks))})")
    if output_dir.is_symlink() and not output_dir.exists():
        raise UsageError(f"{output_dir} is a dangling symlink")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir} is not a directory")
    cleaned = clean_dead_restores(output_dir) if output_dir.is_dir() else []

    # The point's saved XML files: a changed one is refused before anything is written (the
    # domain XML is what --define defines). --salvage without --define goes on: it needs neither.
    xml_damage = integrity.check_xml(bdir, chain, integrity.point_xml(point))
    if xml_damage and (define or not salvage):
        listed = "; ".join(f"{d.image}: {d.problem}" for d in xml_damage)
        raise DamageFound(f"point {point.id} can't be restored: damaged {listed}; nothing was restored"
                          + ("" if define else " (--salvage without --define restores its disks)"))
    # Every image the restore reads is checked against its record (size, backing link, content
    # hash) before any QEMU tool opens one (invariant 8): qemu-img follows what a header says (a
    # json: backing spec connects to a socket, an external data file opens a host file or device),
    # so a hand-made image must be refused before qemu-img sees it, not after.
    rels = integrity.chain_images(chain, point, names)
    damage = integrity.check_images(bdir, chain, rels)
    if damage and not salvage:
        raise _damage_error(chain, point, damage)
    missing = _missing(chain, point, names, damage)
    names = [n for n in names if n not in missing]
    if not names:
        raise DamageFound(f"point {point.id}: nothing can be salvaged: "
                          + "; ".join(f"disk {n}: {why}" for n, why in sorted(missing.items())))

    outs = {n: output_dir / f"{n}.qcow2" for n in names}
    for out in outs.values():
        if out.exists() or out.is_symlink():
            raise OutputExists(f"{out} exists; remove it or restore into another directory")
    saved_xml = ""
    define_notes: List[str] = []
    if define:
        try:
            saved_xml = bdir.resolve(point.domain_xml).read_text()
        except OSError as e:
            raise RestoreFailed(f"point {point.id}: cannot read its domain XML {point.domain_xml}: "
                                f"{e.strerror}") from None
        host.check_name_free(uri, define)
        # built before anything is written: a damaged saved XML must not leave images behind
        try:
            restoredom.restored_domain_xml(saved_xml, define, {n: Path(os.path.abspath(o)) for n, o in outs.items()})
        except (ValueError, etree.LxmlError) as e:
            raise RestoreFailed(f"point {point.id}: its domain XML {point.domain_xml} is unusable: {e}") from None
    made_dirs = _make_output_dir(output_dir)
    made_dir = bool(made_dirs)
    try:
        journal = Journal(output_dir)
    except BaseException:
        _remove_dirs(made_dirs)
        raise
    done: Dict[str, Path] = {}
    made: Dict[str, Path] = {}
    try:
        try:
            for n in names:
                observe.check()     # a cancel between disks (and within one: qemu-img's progress)
                # our own temp name (pid), created O_EXCL|O_NOFOLLOW: never a file this run did not create
                tmp = output_dir / f".{n}.qcow2.partial-{os.getpid()}"
                create_new(tmp)
                made[n] = tmp
                journal.note("tmp", tmp)
                src = bdir.resolve(point.disks[n].image)
                try:
                    if instant:
                        qemu_img.create(tmp, point.disks[n].virtual_size, backing=str(src.resolve()))
                    else:
                        # progress: qemu-img's own (observe.report), as bytes of the disk's size
                        with observe.task("copy", n, point.disks[n].virtual_size):
                            qemu_img.convert(src, tmp, key=key, encrypt_iter_time=(
                                chain.encryption.iter_time_ms if encrypt and chain.encryption else None))
                except VirtBackupError as e:
                    raise RestoreFailed(f"restore of disk {n} from point {point.id} failed: {e}") from None
                os.chmod(tmp, 0o600)
            observe.check()
            for n in names:
                # noted before it gets its name: a kill right after must not leave an unknown disk
                journal.note("placed", outs[n], os.lstat(made[n]).st_ino)
                _place(made[n], outs[n])
                done[n] = outs[n]
        except BaseException:
            for p in done.values():            # no half restore: take back the disks already written
                try:
                    p.unlink()
                except OSError:
                    pass
            raise
        finally:
            for tmp in made.values():
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass
        result = RestoreResult(point, done, instant=instant, missing=missing, cleaned=cleaned)
        result.notes = [f"removed {c}, left by an interrupted restore" for c in cleaned]
        result.notes += [f"not restored (--salvage): disk {n}: {why}" for n, why in sorted(missing.items())]
        result.notes += [f"not used (--salvage): {d.image}: {d.problem}" for d in xml_damage]
        if define:
            # a live restore of an encrypted chain: every layer under each overlay, by absolute
            # path (the overlay's own link is absolute too), opened with the key's secret
            encrypted = live and instant and chain.encryption is not None
            backing = ({n: [bdir.resolve(rel).resolve() for rel in chain.image_chain(point, n)] for n in names}
                       if encrypted else None)
            define_xml, define_notes = restoredom.restored_domain_xml(
                saved_xml, define, {n: Path(os.path.abspath(done[n])) for n in names},
                live=(os.path.abspath(bdir.path), point.id) if live and instant else None,
                backing=backing, secret=live_secret if encrypted else None)
            result.notes += define_notes
            try:
                d = host.define(uri, define_xml)
            except VirtBackupError:
                for p in done.values():              # nothing was defined: take back what we wrote
                    try:
                        p.unlink()
                    except OSError:
                        pass
                done.clear()                         # and the OUTPUT_DIR we made (finally below)
                raise
            result.domain, result.domain_uuid = d.name, d.uuid
            if start:
                host.start(uri, d.name)
                result.started = True
        return result
    finally:
        journal.close()
        if made_dir and not done:
            _remove_dirs(made_dirs)         # a refused restore leaves no trace


def flatten(image: Path, key: Optional[keys.Key] = None) -> FlattenResult:
    """Make an image (e.g. an instant-restore overlay) standalone, in place.

    `qemu-img rebase -b ''` copies every cluster the image reads from its backing chain into the
    image and drops the link last, so an interrupted flatten leaves a valid overlay that reads the
    same, and running it again finishes. The image must not be in use (for a running domain use
    `virsh blockpull DOMAIN DISK --wait`). `key`: the chain below is LUKS-encrypted (a live
    restore's overlay of an encrypted backup); qemu-img gets it through a pipe.
    """
    image = Path(image)
    if not image.is_file():
        raise UsageError(f"{image} does not exist")
    try:
        info = qemu_img.info(image)
    except VirtBackupError as e:
        raise UsageError(f"{image} is not an image qemu-img can read: {e}") from None
    if info.get("format") != "qcow2":
        raise UsageError(f"{image} is {info.get('format')}, not qcow2")
    if info.get("backing-filename") is None:
        return FlattenResult(image)
    try:
        qemu_img.rebase(image, None, key=key)
    except VirtBackupError as e:
        raise RestoreFailed(f"cannot flatten {image}: {e}") from None
    return FlattenResult(image)
