"""Verify a backup dir: images present, qcow2-consistent, linked as recorded, hashes unchanged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from virtbackup import observe
from virtbackup.errors import VirtBackupError
from virtbackup.qemu import keys, qemu_img
from virtbackup.store import crypto
from virtbackup.store.chain import BackupDir, DiskImage, shared_lock


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
    deep: bool = False
    chains_read: int = 0                 # point disks read end to end (deep)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def failure(self) -> Optional[str]:
        """One line naming the first damaged image and the affected points (None when ok)."""
        if self.ok:
            return None
        first = self.damage[0]
        return (f"verify failed: {first.image} (point {first.point}, disk {first.disk}): {first.problem}"
                + (f"; {len(self.damage) - 1} more damaged image(s)" if len(self.damage) > 1 else "")
                + f"; affected points: {', '.join(self.damaged_points)}")

    def to_json(self) -> Dict[str, Any]:
        """{"ok", "points", "images_checked", "deep", "chains_read", "damaged_points",
        "damage": [{"point", "disk", "image", "problem"}]} (the `verify --json` output, without
        its "error" member)."""
        return {"ok": self.ok, "points": self.points, "images_checked": self.images_checked,
                "deep": self.deep, "chains_read": self.chains_read,
                "damaged_points": self.damaged_points, "damage": [asdict(d) for d in self.damage]}


def _image_problem(bdir: BackupDir, rel: str, img: DiskImage,
                   key: Optional[keys.Key] = None) -> Optional[str]:
    path = bdir.resolve(rel)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return "not a regular file"
    if not path.is_file():
        return "image is missing"
    try:
        info = qemu_img.info(path)
    except VirtBackupError as e:
        return f"qemu-img check failed: {e}"
    if key is not None and not info.get("encrypted"):
        return "image is not encrypted, but the chain is"
    try:
        qemu_img.check(path, key)
    except VirtBackupError as e:
        return f"qemu-img check failed: {e}"
    expected = bdir.backing_link(rel, img.backing)
    if info.get("backing-filename") != expected:
        return f"backing link is {info.get('backing-filename')!r}, expected {expected!r}"
    try:
        same = img.hash_matches(path)
    except OSError as e:
        return f"cannot read the image: {e.strerror}"
    if not same:
        return f"content hash ({img.hash_alg}) differs from the one recorded at backup time"
    return None


def verify(backup_dir: Path, point_id: Optional[str] = None, deep: bool = False,
           key: Optional[keys.Key] = None) -> VerifyResult:
    """Check the images of every point (or of one point's chain).

    `deep` also reads every point's whole chain through qemu (what a restore reads), which finds
    data that is recorded and hashed but can't be read back, e.g. a broken compressed cluster.
    """
    bdir = BackupDir(Path(backup_dir))
    bdir.load()                         # exit 2 on a missing/corrupt dir before locking
    with shared_lock(bdir):             # a prune must not change what is being checked
        return _verify_locked(bdir, point_id, deep, key)


def _verify_locked(bdir: BackupDir, point_id: Optional[str], deep: bool,
                   key: Optional[keys.Key]) -> VerifyResult:
    chain = bdir.load()
    # an encrypted chain: qemu-img check and the deep read open the images, so the key is
    # checked first (exit 2 without it)
    crypto.check_key(chain.encryption, key, f"backup directory {bdir.path}")
    points = [chain.point(point_id)] if point_id else list(chain.points)
    by_image = {d.image: (p.id, name, d) for p in chain.points for name, d in p.disks.items()}
    result = VerifyResult([p.id for p in points], 0, deep=deep)
    bad: Set[str] = set()
    checked: Set[str] = set()
    total = len({rel for p in points for disk in p.disks for rel in chain.image_chain(p, disk)})
    for p in points:
        for disk in sorted(p.disks):
            for rel in chain.image_chain(p, disk):
                if rel not in checked:
                    checked.add(rel)
                    owner, name, img = by_image[rel]
                    problem = _image_problem(bdir, rel, img, key)
                    if problem:
                        bad.add(rel)
                        result.damage.append(Damage(owner, name, rel, problem))
                    observe.report("images", len(checked), total)
                if rel in bad and p.id not in result.damaged_points:
                    result.damaged_points.append(p.id)
    result.images_checked = len(checked)
    if deep:
        for p in points:
            for disk in sorted(p.disks):
                links = chain.image_chain(p, disk)
                if any(rel in bad for rel in links):
                    continue                     # already reported; reading it would only repeat that
                top = p.disks[disk]
                try:
                    qemu_img.read_all(bdir.resolve(top.image), top.virtual_size, key)
                except VirtBackupError as e:
                    result.damage.append(Damage(p.id, disk, top.image, f"reading the chain failed: {e}"))
                    if p.id not in result.damaged_points:
                        result.damaged_points.append(p.id)
                result.chains_read += 1
                observe.report("chains read", result.chains_read, sum(len(x.disks) for x in points))
    return result
