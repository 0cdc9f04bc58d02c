"""Verify a backup dir: images present, qcow2-consistent, linked as recorded, hashes unchanged;
each point's domain and checkpoint XML unchanged (where their hashes are recorded).

Whether an image is what its record says (size, backing link, hash) is integrity.py's decision,
the same one restore and prune make; verify adds what only qemu-img can tell (`qemu-img check`,
an encrypted chain's images really encrypted), and only for images that passed it: no QEMU tool
opens an image before its integrity check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from virtbackup import observe
from virtbackup.errors import VirtBackupError
from virtbackup.qemu import keys, qemu_img
from virtbackup.store import crypto, integrity
from virtbackup.store.chain import BackupDir, DiskImage, shared_lock


@dataclass
class Damage:
    point: str
    disk: str           # "" when `image` is one of the point's XML files
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
        where = f"{first.image} (point {first.point}" + (f", disk {first.disk})" if first.disk else ")")
        return (f"verify failed: {where}: {first.problem}"
                + (f"; {len(self.damage) - 1} more damaged file(s)" if len(self.damage) > 1 else "")
                + f"; affected points: {', '.join(self.damaged_points)}")

    def to_json(self) -> Dict[str, Any]:
        """{"ok", "points", "images_checked", "deep", "chains_read", "damaged_points",
        "damage": [{"point", "disk", "image", "problem"}]} (the `verify --json` output, without
        its "error" member)."""
        return {"ok": self.ok, "points": self.points, "images_checked": self.images_checked,
                "deep": self.deep, "chains_read": self.chains_read,
                "damaged_points": self.damaged_points, "damage": [asdict(d) for d in self.damage]}


def _qemu_problem(bdir: BackupDir, img: DiskImage, key: Optional[keys.Key] = None) -> Optional[str]:
    """What qemu-img finds wrong with an image that matches its record (None: nothing)."""
    path = bdir.resolve(img.image)
    try:
        if key is not None and not qemu_img.info(path).get("encrypted"):
            return "image is not encrypted, but the chain is"
        qemu_img.check(path, key)
    except VirtBackupError as e:
        return f"qemu-img check failed: {e}"
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
    result = VerifyResult([p.id for p in points], 0, deep=deep)
    # the XML files beside the images first: restore --define and drills use them
    xml_bad = integrity.check_xml(bdir, chain, [x for p in points for x in integrity.point_xml(p)])
    for d in xml_bad:
        result.damage.append(Damage(d.point, "", d.image, d.problem))
    # every image the points read, in the order they are reported: by point, disk, top down
    rels = list(dict.fromkeys(rel for p in points for disk in sorted(p.disks)
                              for rel in chain.image_chain(p, disk)))
    found = {d.image: d for d in integrity.check_images(
        bdir, chain, rels, then=lambda img: _qemu_problem(bdir, img, key), progress="images")}
    for rel in rels:
        if rel in found:
            d = found[rel]
            result.damage.append(Damage(d.point, d.disk, rel, d.problem))
    bad: Set[str] = set(found)
    xml_points = {d.point for d in xml_bad}
    for p in points:
        if p.id in xml_points or any(rel in bad for disk in sorted(p.disks) for rel in chain.image_chain(p, disk)):
            result.damaged_points.append(p.id)
    result.images_checked = len(rels)
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
