"""Chain health: what bitmaps and checkpoints a domain carries, whose they are, and repair.

virtbackup's checkpoints and bitmaps are named `virtbackup-<dir id>-<point id>`; everything
else is foreign and is only ever reported, never changed. Repair handles what people hit most:
libvirt lost its checkpoint metadata (redefine from the XML saved in the backup dir), bitmaps
broken by a crash, orphaned bitmaps of interrupted runs, checkpoints no backup needs any more.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Literal, Optional, Set

import libvirt
from lxml import etree

from virtbackup.errors import VirtBackupError
from virtbackup.runners.plan import DomainView
from virtbackup.store import integrity
from virtbackup.store.chain import BackupDir, Chain, Point
from virtbackup.virt import checkpoints, host, monitor, xmlbuild
from virtbackup.virt.bitmaps import problem as bitmap_problem
from virtbackup.virt.domain import LibvirtDomain, eligible_disks

log = logging.getLogger(__name__)

OWNED = re.compile(r"^virtbackup-(?P<dir>[0-9a-f]{8})-(?P<point>\d{4,})$")
_DESC_DIR = re.compile(r" into (?P<dir>/.*)$")


def owner_of(name: str) -> Optional[Dict[str, str]]:
    m = OWNED.match(name)
    return {"dir_id": m["dir"], "point": m["point"]} if m else None


# --- status ------------------------------------------------------------------------------------
@dataclass
class StatusReport:
    """`virtbackup status`: per disk its bitmaps with flags and owner; every checkpoint."""

    domain: str
    uuid: str
    active: bool
    disks: Dict[str, Any]               # target -> {"source", "bitmaps": [{name, flags..., owner, ...}]}
    checkpoints: List[Dict[str, Any]]   # {"name", "parent", "owner", "dir_id", "point", "backup_dir", "disks"}

    def to_json(self) -> Dict[str, Any]:
        """{"domain", "uuid", "active", "disks": {...}, "checkpoints": [...]} (the `--json` output)."""
        return asdict(self)


def status(dom: libvirt.virDomain) -> StatusReport:
    """Per disk the bitmaps with their flags and owner; every checkpoint with its owner."""
    cps: Dict[str, Dict[str, Any]] = {}
    for cp in host.call(dom.listAllCheckpoints, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL):
        name = cp.getName()
        try:
            parent: Optional[str] = cp.getParent().getName()
        except libvirt.libvirtError:
            parent = None
        root = xmlbuild.parse(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        desc = root.findtext("description") or ""
        m = _DESC_DIR.search(desc)
        own = owner_of(name)
        cps[name] = {"name": name, "parent": parent, "owner": "virtbackup" if own else "foreign",
                     "dir_id": own["dir_id"] if own else None, "point": own["point"] if own else None,
                     "backup_dir": m["dir"] if (own and m) else None,
                     "disks": [d.get("name") for d in root.findall("disks/disk") if d.get("checkpoint") != "no"]}
    disks: Dict[str, Any] = {}
    elig = eligible_disks(dom)
    bitmaps = LibvirtDomain(dom).bitmaps(elig)
    for d in elig:
        rows = []
        for b in bitmaps.get(d.target, []):
            own = owner_of(b.name)
            cp = cps.get(b.name)
            rows.append({**asdict(b), "owner": "virtbackup" if own else "foreign",
                         "checkpoint": b.name if cp else None,
                         "dir_id": own["dir_id"] if own else None,
                         "backup_dir": cp["backup_dir"] if cp else None})
        disks[d.target] = {"source": d.source, "bitmaps": rows}
    return StatusReport(dom.name(), dom.UUIDString(), bool(dom.isActive()), disks, list(cps.values()))


# --- repair ------------------------------------------------------------------------------------
ActionKind = Literal["delete-checkpoint", "remove-bitmap", "redefine-checkpoint"]


@dataclass
class Action:
    kind: ActionKind
    name: str                    # checkpoint / bitmap name
    reason: str
    disk: Optional[str] = None   # for remove-bitmap
    parent: Optional[str] = None  # for redefine-checkpoint
    done: bool = False
    error: Optional[str] = None


@dataclass
class RepairReport:
    domain: str
    actions: List[Action] = field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return all(a.error is None for a in self.actions)

    @property
    def failure(self) -> Optional[str]:
        """One line naming the first action that failed (None when all went well)."""
        bad = next((a for a in self.actions if a.error), None)
        return f"repair failed: {bad.kind} {bad.name}: {bad.error}" if bad else None

    def to_json(self) -> Dict[str, Any]:
        """{"domain", "dry_run", "ok", "actions": [{"kind", "name", "reason", "disk", "parent",
        "done", "error"}]} (the `--json` output, without its "error" member)."""
        return {"domain": self.domain, "dry_run": self.dry_run, "ok": self.ok,
                "actions": [asdict(a) for a in self.actions]}


def _tracked(view: DomainView, bdir: Optional[BackupDir], point: Point, name: str) -> Optional[List[str]]:
    """Disks the checkpoint records: from libvirt if it knows it, else from the saved XML."""
    tracked = view.checkpoint_disks(name)
    if tracked is not None:
        return tracked
    if bdir is not None:
        if integrity.xml_problem(bdir, point.checkpoint_xml, point.checkpoint_xml_digest):
            return None                 # changed since the backup: not read
        try:
            return checkpoints.tracked_disks(bdir.resolve(point.checkpoint_xml).read_text())
        except (OSError, ValueError, etree.LxmlError):
            return None
    return None


def plan_repair(view: DomainView, chain: Chain, fix_broken: bool = True,
                bdir: Optional[BackupDir] = None) -> List[Action]:
    """What to change so this backup dir's chain is clean. Touches only names with our prefix.

    fix_broken=False keeps needed checkpoints whose bitmaps are broken (a backup run wants to
    report them and fall back to a full; the full's success then retires them).
    """
    prefix = chain.checkpoint_prefix()
    needed = chain.needed_checkpoints()
    known = {n for n in view.checkpoint_names() if n.startswith(prefix)}
    elig = [d for d in view.disks() if d.skip_reason() is None and d.bitmap_reason() is None]
    present = {d.target for d in elig}
    bitmaps = view.bitmaps(elig)
    by_cp = {p.checkpoint: p for p in chain.points}
    actions: List[Action] = []
    keep_bitmaps: Set[str] = set()
    redefined: List[str] = []
    for name in sorted(known):
        if name not in needed:
            actions.append(Action("delete-checkpoint", name, "no future backup of this directory needs it"))
    for name in needed:
        point = by_cp[name]
        tracked = _tracked(view, bdir, point, name)
        disks = sorted(set(point.disks) & present & (set(tracked) if tracked is not None else set(point.disks)))
        problem = bitmap_problem(bitmaps, disks, name) if disks else "none of its disks is attached"
        # broken on some disks only, it still serves the others (a backup copies those disks
        # whole); only a checkpoint that no disk can use is worth deleting
        useless = not disks or all(bitmap_problem(bitmaps, [t], name) for t in disks)
        if name in known:
            keep_bitmaps.add(name)
            if problem and useless and fix_broken:
                actions.append(Action("delete-checkpoint", name, f"{problem}; the next backup starts a new chain"))
        elif not problem:
            parent = redefined[-1] if redefined else None
            actions.append(Action("redefine-checkpoint", name,
                                  "libvirt lost its metadata; bitmaps are intact on "
                                  + ", ".join(disks), parent=parent))
            redefined.append(name)
            keep_bitmaps.add(name)
    for disk, bms in sorted(bitmaps.items()):
        for b in bms:
            if b.name.startswith(prefix) and b.name not in keep_bitmaps:
                if b.name in known:
                    continue   # removed with its checkpoint
                why = "inconsistent bitmap" if b.inconsistent else "orphaned bitmap"
                actions.append(Action("remove-bitmap", b.name, f"{why} with no checkpoint", disk=disk))
    return actions


def apply_repair(dom: libvirt.virDomain, bdir: BackupDir, chain: Chain, actions: List[Action]) -> None:
    disks = {d.target: d for d in eligible_disks(dom)}
    by_cp = {p.checkpoint: p for p in chain.points}
    for a in actions:
        try:
            if a.kind == "delete-checkpoint":
                srcs = [d.source for d in disks.values() if d.source]
                warn = checkpoints.delete(dom, a.name, srcs)
                if warn:
                    raise VirtBackupError(warn)
            elif a.kind == "remove-bitmap":
                d = disks[a.disk or ""]
                if dom.isActive():
                    monitor.qmp(dom, "block-dirty-bitmap-remove", {"node": d.node_name, "name": a.name})
                else:
                    warn = checkpoints.remove_bitmap_offline(d.source or "", a.name)
                    if warn:
                        raise VirtBackupError(warn)
            elif a.kind == "redefine-checkpoint":
                point = by_cp[a.name]
                problem = integrity.xml_problem(bdir, point.checkpoint_xml, point.checkpoint_xml_digest)
                if problem:             # never redefined from a changed file
                    raise VirtBackupError(f"saved checkpoint XML {point.checkpoint_xml}: {problem}")
                saved = bdir.resolve(point.checkpoint_xml).read_text()
                checkpoints.redefine(dom, xmlbuild.redefine_xml(saved, a.parent))
            a.done = True
        except (VirtBackupError, libvirt.libvirtError, OSError, ValueError, etree.LxmlError) as e:
            a.error = host.libvirt_message(e)
            log.warning("repair %s %s failed: %s", a.kind, a.name, a.error)
        else:
            log.info("repair %s %s%s: %s", a.kind, a.name, f" on {a.disk}" if a.disk else "", a.reason)
