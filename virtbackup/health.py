"""Chain health: what bitmaps and checkpoints a domain carries, whose they are, and repair.

virtbackup's checkpoints and bitmaps are named `virtbackup-<dir id>-<point id>`; everything
else is foreign and is only ever reported, never changed. Repair handles what people hit most:
libvirt lost its checkpoint metadata (redefine from the XML saved in the backup dir), bitmaps
broken by a crash, orphaned bitmaps of interrupted runs, checkpoints no backup needs any more.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import libvirt
from lxml import etree

from . import checkpoints, host, monitor, qemuimg, xmlbuild
from .chain import BackupDir, Chain
from .errors import VirtBackupError

OWNED = re.compile(r"^virtbackup-(?P<dir>[0-9a-f]{8})-(?P<point>\d{4,})$")
_DESC_DIR = re.compile(r" into (?P<dir>/.*)$")


def owner_of(name: str) -> Optional[Dict[str, str]]:
    m = OWNED.match(name)
    return {"dir_id": m["dir"], "point": m["point"]} if m else None


def eligible_disks(dom: libvirt.virDomain) -> List[host.Disk]:
    flags = 0 if dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE
    return [d for d in host.domain_disks(dom.XMLDesc(flags)) if d.skip_reason() is None]


def disk_bitmaps(dom: libvirt.virDomain, disks: Optional[List[host.Disk]] = None) -> Dict[str, List[monitor.Bitmap]]:
    """Bitmaps per disk: live state from QEMU when running, from the qcow2 headers when off."""
    disks = eligible_disks(dom) if disks is None else disks
    if dom.isActive():
        return monitor.disk_bitmaps(dom, disks)
    out: Dict[str, List[monitor.Bitmap]] = {}
    for d in disks:
        info = qemuimg.info(d.source, force_share=True)  # type: ignore[arg-type]
        bms = ((info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or []
        out[d.target] = [monitor.Bitmap(name=b["name"], recording="auto" in b.get("flags", []), busy=False,
                                        persistent=True, inconsistent="in-use" in b.get("flags", []),
                                        granularity=int(b.get("granularity", 0)), count=-1) for b in bms]
    return out


def bitmap_problem(bitmaps: Dict[str, List[monitor.Bitmap]], disks: List[str], name: str) -> Optional[str]:
    """Why bitmap `name` can't be trusted on these disks (None = it can)."""
    for disk in disks:
        bm = next((b for b in bitmaps.get(disk, []) if b.name == name), None)
        if bm is None:
            return f"bitmap {name} is missing on disk {disk}"
        if bm.inconsistent:
            return f"bitmap {name} on disk {disk} is inconsistent (QEMU stopped uncleanly)"
        if not bm.recording:
            return f"bitmap {name} on disk {disk} is not recording"
        if bm.busy:
            return f"bitmap {name} on disk {disk} is busy (another job uses it)"
    return None


# --- status ------------------------------------------------------------------------------------
def status(dom: libvirt.virDomain) -> Dict[str, Any]:
    """Per disk the bitmaps with their flags and owner; every checkpoint with its owner."""
    cps: Dict[str, Dict[str, Any]] = {}
    for cp in dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL):
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
    bitmaps = disk_bitmaps(dom, elig)
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
    return {"domain": dom.name(), "uuid": dom.UUIDString(), "active": bool(dom.isActive()),
            "disks": disks, "checkpoints": list(cps.values())}


# --- repair ------------------------------------------------------------------------------------
@dataclass
class Action:
    kind: str                    # delete-checkpoint | remove-bitmap | redefine-checkpoint
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


def _tracked(dom: libvirt.virDomain, bdir: Optional[BackupDir], point: Any, name: str) -> Optional[List[str]]:
    """Disks the checkpoint records: from libvirt if it knows it, else from the saved XML."""
    cp = checkpoints.lookup(dom, name)
    if cp is not None:
        return checkpoints.tracked_disks(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    if bdir is not None:
        try:
            return checkpoints.tracked_disks(bdir.resolve(point.checkpoint_xml).read_text())
        except (OSError, ValueError, etree.LxmlError):
            return None
    return None


def plan_repair(dom: libvirt.virDomain, chain: Chain, fix_broken: bool = True,
                bdir: Optional[BackupDir] = None) -> List[Action]:
    """What to change so this backup dir's chain is clean. Touches only names with our prefix.

    fix_broken=False keeps needed checkpoints whose bitmaps are broken (a backup run wants to
    report them and fall back to a full; the full's success then retires them).
    """
    prefix = chain.checkpoint_prefix()
    needed = chain.needed_checkpoints()
    known = set(checkpoints.ours(dom, prefix))
    elig = eligible_disks(dom)
    present = {d.target for d in elig}
    bitmaps = disk_bitmaps(dom, elig)
    by_cp = {p.checkpoint: p for p in chain.points}
    actions: List[Action] = []
    keep_bitmaps = set()
    redefined: List[str] = []
    for name in sorted(known):
        if name not in needed:
            actions.append(Action("delete-checkpoint", name, "no future backup of this directory needs it"))
    for name in needed:
        point = by_cp[name]
        tracked = _tracked(dom, bdir, point, name)
        disks = sorted(set(point.disks) & present & (set(tracked) if tracked is not None else set(point.disks)))
        problem = bitmap_problem(bitmaps, disks, name) if disks else "none of its disks is attached"
        if name in known:
            keep_bitmaps.add(name)
            if problem and fix_broken:
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
                saved = bdir.resolve(by_cp[a.name].checkpoint_xml).read_text()
                checkpoints.redefine(dom, xmlbuild.redefine_xml(saved, a.parent))
            a.done = True
        except (VirtBackupError, libvirt.libvirtError, OSError, ValueError, etree.LxmlError) as e:
            a.error = host.libvirt_message(e)


def repair(uri: Optional[str], domain: str, backup_dir: Any, dry_run: bool = False) -> RepairReport:
    from .chain import dir_lock, domain_lock
    bdir = BackupDir(backup_dir)
    chain = bdir.load()
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, domain)
        bdir.check_owner(chain, dom.name(), dom.UUIDString())
        report = RepairReport(dom.name(), dry_run=dry_run)
        with domain_lock(dom.UUIDString()), dir_lock(bdir):   # same order as backup
            report.actions = plan_repair(dom, chain, bdir=bdir)
            if not dry_run:
                apply_repair(dom, bdir, chain, report.actions)
        return report


def domain_status(uri: Optional[str], domain: str) -> Dict[str, Any]:
    with host.connection(uri) as conn:
        return status(host.lookup_domain(conn, domain))
