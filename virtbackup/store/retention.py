"""Retention: which points to keep (pure policy), how to drop the others (pure plan), and doing it.

Dropping a point whose images later kept points are layered on means merging: every kept image
whose backing chain runs through a dropped image is rewritten so it reads exactly as before
without it. The oldest kept point of a chain whose full is dropped becomes that chain's new base
(standalone, level `full`) and takes over the dropped full's checkpoint; the other kept points of
the chain are layered on it.

Crash safety comes from never changing a recorded file: every rewritten image is written under a
new name beside the old one, the metadata commit (one atomic rename) switches from the old files
to the new ones, and only then are the files nobody records any more deleted. Killed before the
commit, the directory is exactly the old chain plus unrecorded new files; killed after it, the new
chain plus unrecorded old files. Both pass `verify`; the next prune deletes the unrecorded files
first and then plans again from what is recorded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Set, Tuple

from virtbackup.errors import DamageFound, OperationFailed, UnsafePath, UsageError, VirtBackupError
from virtbackup.qemu import qemu_img
from virtbackup.qemu.keys import Key
from virtbackup.store import integrity, runlog
from virtbackup.store.chain import (
    POINTS_DIR,
    BackupDir,
    Chain,
    Point,
    create_new,
    dir_lock,
    fsync_path,
    open_new,
    point_time,
)
from virtbackup.store.crypto import check_key

log = logging.getLogger(__name__)


# --- policy (pure) -----------------------------------------------------------------------------
@dataclass
class Decision:
    point: str
    keep: bool
    reasons: List[str]


@dataclass(frozen=True)
class Policy:
    """What to keep: `prune` options and a job file's [retention] keys, named alike."""

    keep: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def prune_args(self) -> List[str]:
        """The `prune` options that say this policy (what `run` passes to its prune child)."""
        args: List[str] = []
        for opt, n in (("--keep", self.keep), ("--keep-daily", self.keep_daily),
                       ("--keep-weekly", self.keep_weekly), ("--keep-monthly", self.keep_monthly)):
            if n:
                args += [opt, str(n)]
        return args

    def check(self) -> None:
        if min(self.keep, self.keep_daily, self.keep_weekly, self.keep_monthly) < 0:
            raise UsageError("keep counts must not be negative")
        if not (self.keep or self.keep_daily or self.keep_weekly or self.keep_monthly):
            raise UsageError("say what to keep: --keep N, --keep-daily N, --keep-weekly N and/or --keep-monthly N")


def decide(points: Sequence[Point], policy: Policy) -> List[Decision]:
    """Keep/drop with the reasons, oldest first. Every rule looks at all points on its own.

    --keep N: the newest N points. --keep-daily N / --keep-weekly N / --keep-monthly N: the newest
    point of each of the N newest days / ISO weeks / calendar months (UTC) that have points. The
    newest point is always kept: the next backup continues from it.
    """
    policy.check()
    reasons: Dict[str, List[str]] = {p.id: [] for p in points}
    newest_first = list(reversed(points))
    for p in newest_first[:policy.keep]:
        reasons[p.id].append(f"one of the newest {policy.keep} (--keep {policy.keep})")

    def periodic(count: int, key_of: Callable[[datetime], str], what: str, opt: str) -> None:
        seen: Set[str] = set()
        for p in newest_first:
            key = key_of(point_time(p).astimezone(timezone.utc))
            if key in seen:
                continue
            if len(seen) >= count:
                break
            seen.add(key)
            reasons[p.id].append(f"newest of {what} {key} ({opt} {count})")

    if policy.keep_daily:
        periodic(policy.keep_daily, lambda t: t.strftime("%Y-%m-%d"), "day", "--keep-daily")
    if policy.keep_weekly:
        periodic(policy.keep_weekly, lambda t: "%d-W%02d" % t.isocalendar()[:2], "week", "--keep-weekly")
    if policy.keep_monthly:
        periodic(policy.keep_monthly, lambda t: t.strftime("%Y-%m"), "month", "--keep-monthly")
    if newest_first and not reasons[newest_first[0].id]:
        reasons[newest_first[0].id].append("the newest point (always kept: the next backup continues from it)")
    out = []
    for p in points:
        r = reasons[p.id]
        out.append(Decision(p.id, bool(r), r or ["not selected by any --keep rule"]))
    return out


# --- plan (pure) -------------------------------------------------------------------------------
# standalone: convert through the chain; rebase: safe rebase onto a kept image (copies what
# differs); relink: header-only rebase onto a rewritten image that reads the same
ImageAction = Literal["standalone", "rebase", "relink"]


@dataclass
class ImageOp:
    """Write a new image for a kept point's disk, reading exactly like the old one."""

    point: str
    disk: str
    old: str                    # recorded image (relative to BACKUP_DIR), left untouched
    new: str                    # the new file, recorded by the commit
    action: ImageAction
    backing: Optional[str]      # the new image's backing (relative to BACKUP_DIR)

    def describe(self) -> str:
        if self.action == "standalone":
            return f"point {self.point} disk {self.disk}: made standalone ({self.new})"
        how = "merged onto" if self.action == "rebase" else "relinked to"
        return f"point {self.point} disk {self.disk}: {how} {self.backing} ({self.new})"


@dataclass
class PrunePlan:
    decisions: List[Decision]
    drop: List[str]                                   # point ids
    ops: List[ImageOp]
    xml_copies: List[Tuple[str, str]]                 # (from, to) relative paths
    notes: List[str]                                  # what happens to kept points, for the report
    new_chain: Chain                                  # the chain after the prune (sizes/hashes of new
                                                      # images filled in later)

    @property
    def keep(self) -> List[str]:
        return [d.point for d in self.decisions if d.keep]


_GEN = re.compile(r"^(?P<stem>.+?)(?:\.(?P<gen>\d+))?\.qcow2$")


def _next_name(rel: str, taken: Set[str]) -> str:
    """points/0008/vda.qcow2 -> points/0008/vda.1.qcow2 -> points/0008/vda.2.qcow2 ..."""
    pp = PurePosixPath(rel)
    m = _GEN.match(pp.name)
    stem, gen = (m["stem"], int(m["gen"] or 0)) if m else (pp.stem, 0)
    while True:
        gen += 1
        cand = str(pp.parent / f"{stem}.{gen}.qcow2")
        if cand not in taken:
            taken.add(cand)
            return cand


def plan_prune(chain: Chain, decisions: List[Decision]) -> PrunePlan:
    """What to write and record so every kept point reads exactly as before without the dropped ones."""
    keep = {d.point for d in decisions if d.keep}
    if chain.points and chain.points[-1].id not in keep:
        raise UsageError("the newest point must be kept")
    kept = [p for p in chain.points if p.id in keep]
    drop = [p.id for p in chain.points if p.id not in keep]
    dropped_images = {d.image for p in chain.points if p.id not in keep for d in p.disks.values()}
    owner = {d.image: p.id for p in chain.points for d in p.disks.values()}
    taken = {d.image for p in chain.points for d in p.disks.values()}
    taken |= {x for p in chain.points for x in (p.domain_xml, p.checkpoint_xml)}

    # A chain whose full is dropped gets its oldest kept point as the new base.
    new_base: Dict[str, Point] = {}
    for p in kept:
        if p.chain not in keep and p.chain not in new_base:
            new_base[p.chain] = p

    ops: List[ImageOp] = []
    renamed: Dict[str, str] = {}
    for p in kept:
        for disk, img in sorted(p.disks.items()):
            if img.backing is None:
                continue
            target: Optional[str]
            action: ImageAction
            if img.backing in dropped_images:
                below = chain.image_chain(p, disk)[1:]
                target = next((rel for rel in below if rel not in dropped_images), None)
                base = new_base.get(p.chain)
                if target is None and base is not None and base.id != p.id:
                    bimg = base.disks.get(disk)
                    if bimg is not None and bimg.virtual_size == img.virtual_size:
                        target = bimg.image
                action = "rebase" if target else "standalone"
            elif img.backing in renamed:
                target, action = img.backing, "relink"
            else:
                continue
            final = renamed.get(target, target) if target else None
            new_name = _next_name(img.image, taken)
            ops.append(ImageOp(p.id, disk, img.image, new_name, action, final))
            renamed[img.image] = new_name

    after = copy.deepcopy(chain)
    after.points = [p for p in after.points if p.id in keep]
    op_for = {(o.point, o.disk): o for o in ops}
    notes: List[str] = []
    xml_copies: List[Tuple[str, str]] = []
    for p in after.points:
        for disk, img in p.disks.items():
            o = op_for.get((p.id, disk))
            if o is not None:
                img.image, img.backing = o.new, o.backing
                img.copied_full = o.backing is None
                img.size, img.digest = 0, None      # filled in once the file is written
        base = new_base.get(p.chain)
        if base is not None:
            old_full = chain.point(p.chain)
            p.chain = base.id
            if base.id == p.id:
                # Its images now hold the whole disk. Differentials layer on it and copy what
                # changed since the dropped full's checkpoint: older than this point, so a
                # superset of what changed since it, and that checkpoint's bitmaps still exist.
                was = f"{p.level} on {p.parent}" if p.parent else p.level
                p.level, p.parent, p.base_checkpoint = "full", None, None
                p.checkpoint = old_full.checkpoint
                xml_to = _next_xml_name(p.id, old_full.id, taken)
                xml_copies.append((old_full.checkpoint_xml, xml_to))
                p.checkpoint_xml = xml_to
                # a byte copy (checked against this digest before and after): same hash
                p.checkpoint_xml_digest = old_full.checkpoint_xml_digest
                p.reason = (f"new base of the chain after prune (was {was}; merged full {old_full.id}; "
                            f"takes over checkpoint {old_full.checkpoint})")
                notes.append(f"point {p.id} becomes the chain's full (was {was}) and takes over "
                             f"checkpoint {old_full.checkpoint} of point {old_full.id}")
        if p.parent is not None and p.parent not in keep:
            owners = sorted({owner_new for d in p.disks.values() if d.backing
                             for owner_new in [_owner_of(d.backing, renamed, owner)]})
            old_parent = p.parent
            p.parent = owners[-1] if owners else None
            notes.append(f"point {p.id} now layered on {p.parent or 'nothing (standalone)'} "
                         f"(was {old_parent})")
    for o in ops:
        notes.append(o.describe())
    after.validate(hashed=False)
    return PrunePlan(decisions, drop, ops, xml_copies, notes, after)


def _owner_of(image: str, renamed: Dict[str, str], owner: Dict[str, str]) -> str:
    back = {v: k for k, v in renamed.items()}
    return owner[back.get(image, image)]


def _next_xml_name(point_id: str, from_id: str, taken: Set[str]) -> str:
    n = 0
    while True:
        cand = f"{POINTS_DIR}/{point_id}/checkpoint-{from_id}{'' if n == 0 else f'.{n}'}.xml"
        if cand not in taken:
            taken.add(cand)
            return cand
        n += 1


# --- unrecorded files ----------------------------------------------------------------------
# ...qcow2.z: qemu_img.recompress's twin of an image, left by a run killed while it wrote it
_OURS = re.compile(r"^(?:.*\.qcow2(?:\.z)?|checkpoint.*\.xml|domain.*\.xml)$")


def unrecorded(bdir: BackupDir, chain: Chain) -> List[Path]:
    """Files and point dirs that this chain does not record and that only a prune leaves behind.

    Whole dirs of dropped points (id below next_seq, so never a backup's unfinished point) and,
    inside recorded point dirs, images and XML files the metadata no longer names.
    """
    out: List[Path] = []
    points_dir = bdir.path / POINTS_DIR
    check_no_symlinks(bdir, chain)
    if not points_dir.is_dir():
        return out
    recorded = {p.id for p in chain.points}
    files = {bdir.resolve(x) for p in chain.points
             for x in [p.domain_xml, p.checkpoint_xml, *(d.image for d in p.disks.values())]}
    for entry in sorted(points_dir.iterdir()):
        if not entry.name.isdigit():
            continue                                    # e.g. a backup's NNNN.partial
        if entry.name not in recorded:
            if int(entry.name) < chain.next_seq and not entry.is_symlink() and entry.is_dir():
                out.append(entry)
            continue
        for f in sorted(entry.iterdir()):
            if not f.is_symlink() and f.is_file() and _OURS.match(f.name) and f not in files:
                out.append(f)
    return out


def check_no_symlinks(bdir: BackupDir, chain: Chain) -> None:
    """Refuse (exit 2, nothing changed) a symlink anywhere prune would read, write or delete:
    `points/`, a point dir, or a file inside a recorded point dir. Only virtbackup creates
    entries there; a symlink was put by someone else, and following it would delete or write
    outside the backup directory."""
    points_dir = bdir.path / POINTS_DIR
    if points_dir.is_symlink():
        raise UnsafePath(f"{points_dir} is a symlink; virtbackup never follows symlinks inside a backup directory")
    if not points_dir.is_dir():
        return
    recorded = {p.id for p in chain.points}
    for entry in sorted(points_dir.iterdir()):
        if entry.is_symlink():
            raise UnsafePath(f"{entry} is a symlink; virtbackup never follows symlinks inside a backup "
                             "directory (remove it; nothing was changed)")
        if entry.name in recorded and entry.is_dir():
            for f in sorted(entry.iterdir()):
                if f.is_symlink():
                    raise UnsafePath(f"{f} is a symlink; virtbackup never follows symlinks inside a backup "
                                     "directory (remove it; nothing was changed)")


def check_sources(bdir: BackupDir, chain: Chain, plan: "PrunePlan") -> None:
    """Every recorded image a rewrite reads must match its recorded size, link and hash.

    A prune that rewrote kept points from damaged data would record fresh hashes of wrong
    data: damage that verify can see would become damage nobody can see. Refused (exit 1,
    nothing changed), naming the images and the points it cannot consolidate."""
    reads: Dict[Tuple[str, str], List[str]] = {(o.point, o.disk): chain.image_chain(chain.point(o.point), o.disk)
                                                for o in plan.ops}
    wanted = list(dict.fromkeys(rel for rels in reads.values() for rel in rels))
    # the checkpoint XML a new base takes over is copied: a changed one is refused like an image
    xml_damage = integrity.check_xml(bdir, chain, [src for src, _ in plan.xml_copies])
    if xml_damage:
        takers = sorted(PurePosixPath(dst).parts[1] for src, dst in plan.xml_copies
                        if src in {d.image for d in xml_damage})
        listed = "; ".join(f"{d.where}: {d.problem}" for d in xml_damage)
        raise DamageFound(f"prune refused: it would copy damaged {listed}; cannot consolidate point(s) "
                          f"{', '.join(takers)}; nothing was changed (see 'virtbackup verify')")
    damage = integrity.check_images(bdir, chain, wanted)
    if not damage:
        return
    bad = {d.image for d in damage}
    stuck = sorted({pid for (pid, _), rels in reads.items() if bad.intersection(rels)})
    listed = "; ".join(f"{d.where}: {d.problem}" for d in damage[:3])
    more = f"; {len(damage) - 3} more" if len(damage) > 3 else ""
    raise DamageFound(f"prune refused: it would rewrite kept points from damaged image(s) {listed}{more}; "
                      f"cannot consolidate point(s) {', '.join(stuck)}; nothing was changed "
                      "(see 'virtbackup verify')")


# --- execution ---------------------------------------------------------------------------------
@dataclass
class PruneResult:
    dry_run: bool
    plan: PrunePlan
    removed: List[str] = field(default_factory=list)     # relative paths deleted
    leftovers: List[str] = field(default_factory=list)   # unrecorded files of an interrupted run, deleted
                                                         # first (dry run: would be)
    warnings: List[str] = field(default_factory=list)    # e.g. no run log could be written

    def to_json(self) -> Dict[str, Any]:
        """{"dry_run", "points": [{"point", "keep", "reasons"}], "kept", "dropped", "changes",
        "removed", "leftovers", "warnings"} (the `prune --json` output)."""
        return {"dry_run": self.dry_run, "points": [asdict(d) for d in self.plan.decisions],
                "kept": self.plan.keep, "dropped": self.plan.drop, "changes": self.plan.notes,
                "removed": self.removed, "leftovers": self.leftovers, "warnings": self.warnings}


def _remove(bdir: BackupDir, paths: List[Path]) -> List[str]:
    done = []
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        done.append(str(p.relative_to(bdir.path)))
    if paths:
        fsync_path(bdir.path / POINTS_DIR)
    return done


def _in_use(paths: List[Path]) -> List[str]:
    """Images a running QEMU has open (e.g. as the backing of an instant restore)."""
    return [str(p) for p in paths if p.is_file() and qemu_img.image_in_use(str(p))]


def _write_image(bdir: BackupDir, op: ImageOp, key: Optional[Key] = None,
                 iter_time: Optional[int] = None, compression: Optional[str] = None) -> None:
    """Write one rewritten image; in an encrypted chain it stays encrypted with the same key, in
    a compressed one (`compression`: the point's) it holds compressed clusters again: a safe
    rebase writes what it merges as plain clusters, so that image is then compressed into a
    twin (qemu_img.compress_into), which replaces it before anything records it."""
    old, new = bdir.resolve(op.old), bdir.resolve(op.new)
    create_new(new)                 # O_EXCL|O_NOFOLLOW: never through a symlink put at the name
    try:
        if op.action == "standalone":
            qemu_img.convert(old, new, key=key, encrypt_iter_time=iter_time if key is not None else None,
                             compression=compression)
        else:
            # A copy in the same directory: its relative backing link resolves like the original's.
            proc = qemu_img.execute(["cp", "--reflink=auto", "--", str(old), str(new)])
            if proc.returncode != 0:
                raise OperationFailed(f"cannot copy {old}: {proc.stderr.strip()}")
            assert op.backing is not None
            qemu_img.rebase(new, bdir.backing_link(op.new, op.backing), safe=op.action == "rebase", key=key)
            if op.action == "rebase" and compression is not None:
                qemu_img.recompress(new, compression)   # the merged clusters were written plain
        os.chmod(new, 0o600)
        fsync_path(new)
    except BaseException:
        try:
            new.unlink()
        except OSError:
            pass
        raise


def prune(backup_dir: Path, policy: Policy, dry_run: bool = False, key: Optional[Key] = None,
          users: Optional[Mapping[str, str]] = None) -> PruneResult:
    """An encrypted chain needs its `key` (unless `dry_run`): rewritten images are encrypted too.

    `users`: images of this directory (real paths) a defined domain's disk is layered on (an
    instant or live restore), with who: the prune is refused (also as a dry run) when it would
    remove or rewrite one of them."""
    bdir = BackupDir(Path(backup_dir))
    policy.check()
    first = bdir.load()                           # exit 2 on a missing/corrupt dir before locking
    if key is not None or not dry_run:
        check_key(first.encryption, key, f"backup directory {bdir.path}")
    # a dry run changes nothing in the directory, not even a log
    log_problems: List[str] = []
    with dir_lock(bdir), (contextlib.nullcontext() if dry_run else runlog.run_log(bdir.path, "prune",
                                                                                  log_problems.append)):
        log.info("prune of %s: %s%s", bdir.path, policy, " (dry run)" if dry_run else "")
        chain = bdir.load()
        if chain.encryption != first.encryption and (key is not None or not dry_run):
            check_key(chain.encryption, key, f"backup directory {bdir.path}")
        if not chain.points:
            raise UsageError(f"{backup_dir} has no restore points")
        plan = plan_prune(chain, decide(chain.points, policy))
        result = PruneResult(dry_run, plan, warnings=log_problems)
        leftovers = unrecorded(bdir, chain)          # refuses symlinks before anything changes
        check_sources(bdir, chain, plan)
        touched = [bdir.resolve(d.image) for p in chain.points for d in p.disks.values()
                   if p.id in plan.drop or any(o.old == d.image for o in plan.ops)]
        for path in touched:
            who = (users or {}).get(os.path.realpath(path))
            if who is not None:
                raise OperationFailed(f"{path} is the backing of {who}; finish it first ('virtbackup restore "
                                      "--resume-live NAME' or 'virtbackup flatten OVERLAY'), or undefine it; "
                                      "nothing was changed")
        if dry_run:
            result.leftovers = [str(p.relative_to(bdir.path)) for p in leftovers]
            return result
        busy = _in_use(touched)
        if busy:
            raise OperationFailed(f"{busy[0]} is open in a running QEMU (an instant restore?); "
                                  "flatten or stop it first; nothing was changed")
        result.leftovers = _remove(bdir, leftovers)
        if not plan.drop:
            return result
        written: List[Path] = []
        try:
            for op in plan.ops:
                _write_image(bdir, op, key, chain.encryption.iter_time_ms if chain.encryption else None,
                             chain.point(op.point).compression)
                written.append(bdir.resolve(op.new))
            for src, dst in plan.xml_copies:
                target = bdir.resolve(dst)
                fd = open_new(target)
                written.append(target)
                with os.fdopen(fd, "wb") as out, open(bdir.resolve(src), "rb") as inp:
                    shutil.copyfileobj(inp, out)
                os.chmod(target, 0o600)
                fsync_path(target)
                taker = next(p for p in plan.new_chain.points if p.checkpoint_xml == dst)
                problem = integrity.xml_problem(bdir, dst, taker.checkpoint_xml_digest)
                if problem:                 # changed since check_sources: never recorded as good
                    raise OperationFailed(f"copy {dst} of {src}: {problem}")
            images = {(p.id, n): d for p in plan.new_chain.points for n, d in p.disks.items()}
            for op in plan.ops:
                path = bdir.resolve(op.new)
                img = images[(op.point, op.disk)]
                img.size = path.stat().st_size
                img.record_hash(path)
                if chain.encryption is None:    # what it holds now (a merge adds, a relink keeps)
                    img.data_size = qemu_img.data_size(path)
            for pid in {o.point for o in plan.ops} | {PurePosixPath(d).parts[1] for _, d in plan.xml_copies}:
                fsync_path(bdir.point_dir(pid))
        except BaseException as exc:
            # Nothing recorded was touched: take back what this run wrote and report.
            for path in written:
                try:
                    path.unlink()
                except OSError:
                    pass
            if isinstance(exc, (VirtBackupError, OSError)):
                raise OperationFailed(f"prune failed, nothing was changed: {exc}") from None
            raise
        bdir.save(plan.new_chain)                 # the commit: from here on the new chain is the truth
        log.info("committed: kept %s, dropped %s", ", ".join(plan.keep), ", ".join(plan.drop))
        try:
            result.removed = _remove(bdir, unrecorded(bdir, plan.new_chain))
        except OSError as e:
            raise OperationFailed(f"pruned, but cannot remove {e.filename}: {e.strerror}; "
                                  "the next prune removes it") from None
        return result
