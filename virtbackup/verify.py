"""Verify a backup dir: images present, qcow2-consistent, linked as recorded, hashes unchanged."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

from . import qemuimg
from .chain import BackupDir, file_sha256
from .errors import VirtBackupError


@dataclass
class Damage:
    point: str
    disk: str
    image: str
    problem: str


@dataclass
class VerifyResult:
    points: List[str]
    images_checked: int
    damage: List[Damage] = field(default_factory=list)
    damaged_points: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage


def _image_problem(bdir: BackupDir, rel: str, backing: Optional[str], sha256: str) -> Optional[str]:
    path = bdir.resolve(rel)
    if not path.is_file():
        return "image is missing"
    try:
        qemuimg.check(path)
        info = qemuimg.info(path)
    except VirtBackupError as e:
        return f"qemu-img check failed: {e}"
    expected = os.path.relpath(bdir.resolve(backing), path.parent) if backing else None
    if info.get("backing-filename") != expected:
        return f"backing link is {info.get('backing-filename')!r}, expected {expected!r}"
    if file_sha256(path) != sha256:
        return "content hash differs from the one recorded at backup time"
    return None


def verify(backup_dir: Path, point_id: Optional[str] = None) -> VerifyResult:
    bdir = BackupDir(Path(backup_dir))
    chain = bdir.load()
    points = [chain.point(point_id)] if point_id else list(chain.points)
    by_image = {d.image: (p.id, name, d) for p in chain.points for name, d in p.disks.items()}
    result = VerifyResult([p.id for p in points], 0)
    bad: Set[str] = set()
    checked: Set[str] = set()
    for p in points:
        for disk in sorted(p.disks):
            for rel in chain.image_chain(p, disk):
                if rel not in checked:
                    checked.add(rel)
                    owner, name, img = by_image[rel]
                    problem = _image_problem(bdir, rel, img.backing, img.sha256)
                    if problem:
                        bad.add(rel)
                        result.damage.append(Damage(owner, name, rel, problem))
                if rel in bad and p.id not in result.damaged_points:
                    result.damaged_points.append(p.id)
    result.images_checked = len(checked)
    return result
