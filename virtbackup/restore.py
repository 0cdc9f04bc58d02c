"""Restore a point: one standalone qcow2 per disk, read through the chain with qemu-img convert."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from . import qemuimg
from .chain import BackupDir, Chain, Point
from .errors import DiskNotFound, OutputExists, RestoreFailed, UsageError, VirtBackupError


@dataclass
class RestoreResult:
    point: Point
    images: Dict[str, Path]     # disk target -> restored image


def check_links(bdir: BackupDir, chain: Chain, point: Point, disk: str) -> None:
    """Every image of the disk's chain exists and its qcow2 backing link is the recorded one."""
    by_image = {d.image: d for p in chain.points for d in p.disks.values()}
    for rel in chain.image_chain(point, disk):
        img = by_image[rel]
        path = bdir.resolve(rel)
        if not path.is_file():
            raise RestoreFailed(f"point {point.id} disk {disk}: image {rel} is missing")
        try:
            info = qemuimg.info(path)
        except VirtBackupError as e:
            raise RestoreFailed(f"point {point.id} disk {disk}: image {rel} is unreadable: {e}") from None
        actual = info.get("backing-filename")
        expected = os.path.relpath(bdir.resolve(img.backing), path.parent) if img.backing else None
        if actual != expected:
            raise RestoreFailed(f"point {point.id} disk {disk}: image {rel} has backing "
                                f"{actual!r}, expected {expected!r}")


def restore(backup_dir: Path, output_dir: Path, point_id: Optional[str] = None,
            disks: Sequence[str] = ()) -> RestoreResult:
    bdir = BackupDir(backup_dir)
    chain = bdir.load()
    point = chain.point(point_id)
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
    for n in names:
        check_links(bdir, chain, point, n)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {output_dir}: {e.strerror}") from None
    done: Dict[str, Path] = {}
    try:
        for n, out in outs.items():
            tmp = output_dir / f".{n}.qcow2.partial"
            try:
                qemuimg.convert(bdir.resolve(point.disks[n].image), tmp)
            except VirtBackupError as e:
                raise RestoreFailed(f"restore of disk {n} from point {point.id} failed: {e}") from None
            os.chmod(tmp, 0o600)
            if out.exists():
                raise OutputExists(f"{out} appeared during the restore; not overwriting it")
            os.rename(tmp, out)
            done[n] = out
    finally:
        for n in outs:
            tmp = output_dir / f".{n}.qcow2.partial"
            if tmp.exists():
                tmp.unlink()
    return RestoreResult(point, done)
