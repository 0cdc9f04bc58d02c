"""Restore a point: one standalone qcow2 per disk, read through the chain with qemu-img convert."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lxml import etree

from . import host, qemuimg, restoredom
from .chain import BackupDir, Chain, Point
from .errors import DiskNotFound, OutputExists, RestoreFailed, UsageError, VirtBackupError


@dataclass
class RestoreResult:
    point: Point
    images: Dict[str, Path]     # disk target -> restored image (or instant-restore overlay)
    instant: bool = False
    domain: Optional[str] = None        # name of the domain defined from the point (--define)
    domain_uuid: Optional[str] = None
    started: bool = False
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """{"point", "images": {disk: path}, "instant", "domain": {"name", "uuid", "started"} | null,
        "notes"} (the `restore --json` output)."""
        return {"point": self.point.id, "images": {k: str(v) for k, v in self.images.items()},
                "instant": self.instant,
                "domain": ({"name": self.domain, "uuid": self.domain_uuid, "started": self.started}
                           if self.domain else None), "notes": self.notes}


@dataclass
class FlattenResult:
    image: Path
    standalone: bool = True

    def to_json(self) -> Dict[str, Any]:
        """{"image", "standalone"} (the `flatten --json` output)."""
        return {"image": str(self.image), "standalone": self.standalone}


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


def check_links(bdir: BackupDir, chain: Chain, point: Point, disk: str) -> None:
    """Every image of the disk's chain exists and its qcow2 backing link is the recorded one.

    One `qemu-img info --backing-chain` for the whole chain (a 50-link chain used to cost 50
    qemu-img runs); image by image only to name the culprit when that call fails.
    """
    by_image = {d.image: d for p in chain.points for d in p.disks.values()}
    rels = chain.image_chain(point, disk)
    for rel in rels:
        if not bdir.resolve(rel).is_file():
            raise RestoreFailed(f"point {point.id} disk {disk}: image {rel} is missing")
    try:
        infos = qemuimg.info(bdir.resolve(rels[0]), backing_chain=True)
    except VirtBackupError:
        infos = None
    for i, rel in enumerate(rels):
        img = by_image[rel]
        path = bdir.resolve(rel)
        if infos is not None and i < len(infos):
            info = infos[i]
        else:
            try:
                info = qemuimg.info(path)
            except VirtBackupError as e:
                raise RestoreFailed(f"point {point.id} disk {disk}: image {rel} is unreadable: {e}") from None
        actual = info.get("backing-filename")
        expected = bdir.backing_link(rel, img.backing)
        if actual != expected:
            raise RestoreFailed(f"point {point.id} disk {disk}: image {rel} has backing "
                                f"{actual!r}, expected {expected!r}")


def restore(backup_dir: Path, output_dir: Path, point_id: Optional[str] = None,
            disks: Sequence[str] = (), instant: bool = False, define: Optional[str] = None,
            start: bool = False, uri: Optional[str] = None) -> RestoreResult:
    """Restore a point into OUTPUT_DIR; optionally define (and start) a new domain on the result.

    `instant`: no copy; each disk gets a qcow2 overlay whose backing is the point's image in the
    backup dir (absolute path: the overlay lives outside the backup dir and must keep working
    from any cwd; QEMU opens the backup images read-only). `virtbackup flatten` makes it standalone.
    Everything is checked before anything is written; a failed define removes the images again.
    """
    bdir = BackupDir(backup_dir)
    chain = bdir.load()
    point = chain.point(point_id)
    if start and not define:
        raise UsageError("--start needs --define NAME")
    names = list(disks) or sorted(point.disks)
    for n in names:
        if n not in point.disks:
            raise DiskNotFound(f"point {point.id} has no disk '{n}' (disks: {', '.join(sorted(point.disks))})")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir} is not a directory")
    outs = {n: output_dir / f"{n}.qcow2" for n in names}
    for out in outs.values():
        if out.exists():
            raise OutputExists(f"{out} exists; remove it or restore into another directory")
    saved_xml = ""
    if define:
        try:
            saved_xml = bdir.resolve(point.domain_xml).read_text()
        except OSError as e:
            raise RestoreFailed(f"point {point.id}: cannot read its domain XML {point.domain_xml}: "
                                f"{e.strerror}") from None
        host.check_name_free(uri, define)
        # built before anything is written: a damaged saved XML must not leave images behind
        try:
            define_xml, define_notes = restoredom.restored_domain_xml(
                saved_xml, define, {n: Path(os.path.abspath(out)) for n, out in outs.items()})
        except (ValueError, etree.LxmlError) as e:
            raise RestoreFailed(f"point {point.id}: its domain XML {point.domain_xml} is unusable: {e}") from None
    for n in names:
        check_links(bdir, chain, point, n)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {output_dir}: {e.strerror}") from None
    done: Dict[str, Path] = {}
    made: List[Path] = []
    try:
        for n, out in outs.items():
            # our own temp name (pid): never touch a file this run did not create
            tmp = output_dir / f".{n}.qcow2.partial-{os.getpid()}"
            made.append(tmp)
            src = bdir.resolve(point.disks[n].image)
            try:
                if instant:
                    qemuimg.create(tmp, point.disks[n].virtual_size, backing=str(src.resolve()))
                else:
                    qemuimg.convert(src, tmp)
            except VirtBackupError as e:
                raise RestoreFailed(f"restore of disk {n} from point {point.id} failed: {e}") from None
            os.chmod(tmp, 0o600)
            _place(tmp, out)
            done[n] = out
    except BaseException:
        for p in done.values():            # no half restore: take back the disks already written
            try:
                p.unlink()
            except OSError:
                pass
        raise
    finally:
        for tmp in made:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    result = RestoreResult(point, done, instant=instant)
    if define:
        result.notes = define_notes
        try:
            d = host.define(uri, define_xml)
        except VirtBackupError:
            for p in done.values():              # nothing was defined: take back what we wrote
                try:
                    p.unlink()
                except OSError:
                    pass
            raise
        result.domain, result.domain_uuid = d.name, d.uuid
        if start:
            host.start(uri, d.name)
            result.started = True
    return result


def flatten(image: Path) -> FlattenResult:
    """Make an image (e.g. an instant-restore overlay) standalone, in place.

    `qemu-img rebase -b ''` copies every cluster the image reads from its backing chain into the
    image and drops the link last, so an interrupted flatten leaves a valid overlay that reads the
    same, and running it again finishes. The image must not be in use (for a running domain use
    `virsh blockpull DOMAIN DISK --wait`).
    """
    image = Path(image)
    if not image.is_file():
        raise UsageError(f"{image} does not exist")
    try:
        info = qemuimg.info(image)
    except VirtBackupError as e:
        raise UsageError(f"{image} is not an image qemu-img can read: {e}") from None
    if info.get("format") != "qcow2":
        raise UsageError(f"{image} is {info.get('format')}, not qcow2")
    if info.get("backing-filename") is None:
        return FlattenResult(image)
    try:
        qemuimg.rebase(image, None)
    except VirtBackupError as e:
        raise RestoreFailed(f"cannot flatten {image}: {e}") from None
    return FlattenResult(image)
