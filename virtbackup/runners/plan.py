"""Backup planning: a typed plan that every job runner receives.

Planning decides the level, the base checkpoint and, per disk, whether it is copied whole or
from a bitmap, and where its target image goes. It reads the domain only through the small
`DomainView` protocol (domain.py has the libvirt one; unit tests use a fake), so the rule
"never plan an incremental from a doubtful bitmap" is testable without libvirt.

Extension points: `TargetSpec.encryption` (LUKS targets: runners pass it through into the target
they open), `TargetSpec.compression` (each runner writes compressed clusters its own way) and
`BackupPlan.transport` (a pull-mode runner joins without touching planning or the engine's
commit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional, Protocol, Sequence, Tuple, cast

from virtbackup.errors import DiskNotFound, LevelNotPossible, UsageError, VirtBackupError
from virtbackup.options import REQUESTED_LEVELS, RequestedLevel
from virtbackup.store.chain import POINTS_DIR, BackupDir, Chain, DiskImage, Level, Point
from virtbackup.virt.bitmaps import Bitmap, problem
from virtbackup.virt.host import Disk
from virtbackup.virt.xmlbuild import Encryption

CopyMode = Literal["full", "bitmap"]          # whole disk | only the clusters the base bitmap marks
Transport = Literal["push", "offline", "pull"]


class DomainView(Protocol):
    """What planning (backup and repair) needs to know about a domain."""

    def disks(self) -> List[Disk]:
        """Every disk of the domain (live definition when running)."""

    def disk_size(self, target: str) -> int:
        """The disk's virtual size in bytes."""

    def checkpoint_disks(self, name: str) -> Optional[List[str]]:
        """Disks whose writes checkpoint `name` tracks; None when libvirt does not know it."""

    def checkpoint_names(self) -> List[str]:
        """Every checkpoint libvirt knows for the domain (ours and foreign)."""

    def bitmaps(self, disks: Sequence[Disk]) -> Dict[str, List[Bitmap]]:
        """Bitmaps per disk target (QEMU's view when running, image headers when off)."""


@dataclass(frozen=True)
class TargetSpec:
    """The image a runner writes one disk into; the engine pre-creates it."""

    path: Path                      # absolute, inside points/NNNN.partial
    image: str                      # where it is recorded once committed (relative to BACKUP_DIR)
    backing: Optional[str]          # recorded image it is layered on (relative), None = standalone
    backing_link: Optional[str]     # what its qcow2 header names (relative to its directory)
    virtual_size: int
    encryption: Optional[Encryption] = None
    compression: Optional[str] = None   # "zstd" | "zlib": written as compressed clusters of that type


@dataclass(frozen=True)
class DiskPlan:
    disk: Disk                          # the domain's disk (source image, node name, ...)
    mode: CopyMode
    base_bitmap: Optional[str]          # bitmap changes are read from (mode == "bitmap")
    backing: Optional[DiskImage]        # recorded image the target is layered on
    target: TargetSpec
    why_full: Optional[str] = None      # why a disk is copied whole (inside an inc/diff, or always)

    @property
    def virtual_size(self) -> int:
        return self.target.virtual_size

    @property
    def tracks(self) -> bool:
        """The new checkpoint puts a bitmap on this disk (False: raw and the like, copied whole)."""
        return self.disk.bitmap_reason() is None


@dataclass(frozen=True)
class BackupPlan:
    point_id: str
    level: Level
    base: Optional[Point]               # point whose checkpoint the changes are counted from
    checkpoint: str                     # the new checkpoint (= bitmap name on every disk)
    description: str                    # the new checkpoint's description
    disks: Tuple[DiskPlan, ...]
    work_dir: Path                      # points/NNNN.partial
    final_dir: Path                     # points/NNNN
    skipped: Mapping[str, str] = field(default_factory=dict)   # disk -> why it takes no part
    reason: Optional[str] = None        # why auto chose a full

    @property
    def base_checkpoint(self) -> Optional[str]:
        return self.base.checkpoint if self.base else None


def _choose_disks(view: DomainView, only: Sequence[str]) -> Tuple[List[Disk], Dict[str, str]]:
    all_disks = view.disks()
    known = {d.target for d in all_disks}
    for name in only:
        if name not in known:
            raise DiskNotFound(f"domain has no disk '{name}' (disks: {', '.join(sorted(known)) or 'none'})")
    skipped: Dict[str, str] = {}
    chosen: List[Disk] = []
    for d in all_disks:
        if only and d.target not in only:
            continue
        why = d.skip_reason()
        if why:
            if d.target in only:
                raise UsageError(f"disk {d.target} cannot be backed up: {why}")
            skipped[d.target] = why
        else:
            chosen.append(d)
    if not chosen:
        raise UsageError("no disk of the domain can be backed up")
    return chosen, skipped


def _bitmap_problems(view: DomainView, disks: Sequence[Disk], name: str) -> Dict[str, str]:
    """Per disk, why bitmap `name` can't serve an incremental on it (disks absent are fine).

    Per disk, so that one lost bitmap costs a whole copy of that disk, not a new chain.
    """
    try:
        by_disk = view.bitmaps(disks)
    except VirtBackupError as e:
        return {d.target: f"cannot inspect bitmaps: {e}" for d in disks}
    out: Dict[str, str] = {}
    for d in disks:
        why = problem(by_disk, [d.target], name)
        if why:
            out[d.target] = why
    return out


def plan_backup(view: DomainView, chain: Chain, bdir: BackupDir, level: RequestedLevel,
                only: Sequence[str] = (), reason: Optional[str] = None) -> BackupPlan:
    """Decide level, base and per-disk targets. Never plans an incremental from a doubtful bitmap.

    `level` auto takes an incremental when the chain can be continued safely and a full
    otherwise (the plan's `reason` says why); inc/diff raise LevelNotPossible instead. A disk
    whose base bitmap alone is unusable is copied whole inside the inc/diff (`why_full`); only
    when it is unusable on every continuing disk is the chain not continued.
    """
    if level not in REQUESTED_LEVELS:
        raise UsageError(f"unknown level '{level}' (auto, full, inc, diff)")
    chosen, skipped = _choose_disks(view, only)
    sizes = {d.target: view.disk_size(d.target) for d in chosen}
    point_id = chain.new_point_id()
    checkpoint = chain.checkpoint_name(point_id)

    def target(d: Disk, backing: Optional[DiskImage]) -> TargetSpec:
        image = f"{POINTS_DIR}/{point_id}/{d.target}.qcow2"
        back = backing.image if backing else None
        return TargetSpec(path=bdir.point_dir(point_id, partial=True) / f"{d.target}.qcow2", image=image,
                          backing=back, backing_link=bdir.backing_link(image, back),
                          virtual_size=sizes[d.target])

    def make(lvl: Level, base: Optional[Point], disks: List[DiskPlan], why: Optional[str]) -> BackupPlan:
        return BackupPlan(point_id=point_id, level=lvl, base=base, checkpoint=checkpoint,
                          description=f"virtbackup {lvl} backup {point_id} into {bdir.path}",
                          disks=tuple(disks), work_dir=bdir.point_dir(point_id, partial=True),
                          final_dir=bdir.point_dir(point_id), skipped=dict(skipped), reason=why)

    def full(why: Optional[str]) -> BackupPlan:
        return make("full", None, [DiskPlan(d, "full", None, None, target(d, None), d.bitmap_reason())
                                   for d in chosen], why or reason)

    if level == "full":
        return full(None)

    last = chain.latest
    found: Optional[str] = None
    base: Optional[Point] = None
    tracked: List[str] = []
    unusable: Dict[str, str] = {}      # disk -> why its base bitmap can't be used: copied whole
    if last is None:
        found = "there is no previous backup in this directory"
    else:
        base = last if level in ("inc", "auto") else chain.chain_full(last)
        cp_disks = view.checkpoint_disks(base.checkpoint)
        if cp_disks is None:
            found = f"checkpoint {base.checkpoint} of point {base.id} is not known to libvirt"
        else:
            tracked = cp_disks
            continuing = [d for d in chosen if d.target in base.disks and d.target in tracked
                          and d.bitmap_reason() is None]
            if not any(d.bitmap_reason() is None for d in chosen):
                found = "no disk of the domain can hold a dirty bitmap (" + "; ".join(
                    f"{d.target}: format '{d.format or 'unknown'}'" for d in chosen) + ")"
            elif not continuing:
                found = "no disk of the previous point takes part in this backup"
            else:
                unusable = _bitmap_problems(view, continuing, base.checkpoint)
                if len(unusable) == len(continuing):     # nothing to continue from: a new chain
                    found = "; ".join(unusable[d.target] for d in continuing)
    if found:
        if level == "auto":
            return full(f"new chain: {found}")
        raise LevelNotPossible(f"cannot take a{'n incremental' if level == 'inc' else ' differential'} "
                               f"backup: {found}; take a full backup (--level full or auto)")
    assert base is not None
    plans: List[DiskPlan] = []
    for d in chosen:
        prev = base.disks.get(d.target)
        why_full: Optional[str] = d.bitmap_reason()
        if why_full is not None:
            pass                    # raw and the like: every point holds it whole
        elif prev is None:
            why_full = "disk is new since the base point"
        elif d.target not in tracked:
            # e.g. a prune made this point the chain's base with an older checkpoint that
            # predates the disk: nothing records its changes, so copy it whole
            why_full = f"checkpoint {base.checkpoint} does not track it"
        elif prev.virtual_size != sizes[d.target]:
            why_full = f"disk was resized ({prev.virtual_size} -> {sizes[d.target]} bytes)"
        elif d.target in unusable:
            # complete in this point, so nothing is silently missing; the new checkpoint gives
            # the disk a good bitmap again, so its next incremental is small
            why_full = unusable[d.target]
        if why_full is not None:
            plans.append(DiskPlan(d, "full", None, None, target(d, None), why_full))
        else:
            plans.append(DiskPlan(d, "bitmap", base.checkpoint, prev, target(d, prev)))
    return make(cast(Level, "inc" if level == "auto" else level), base, plans, reason)
