"""The bitmap layer: which dirty bitmaps a disk carries, and whether one can serve an incremental.

One place for the rule that guards invariant 4 (never a silently incomplete incremental) and for
the two ways of reading bitmap state: QEMU's view of a running domain (QMP
`query-named-block-nodes`, through libvirt's passthrough or a private QEMU) and the qcow2 headers
of a shut-off domain's images (`qemu-img info`). Backup planning, the offline runner, status and
repair all ask here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import libvirt

from virtbackup.qemu import qemu_img
from virtbackup.virt import monitor
from virtbackup.virt.host import Disk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bitmap:
    """One dirty bitmap as QEMU (or a qcow2 header) reports it."""

    name: str
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool
    granularity: int
    count: int          # dirty bytes; -1 when unknown (read from an image header)


def from_qmp(node: Mapping[str, Any]) -> List[Bitmap]:
    """The bitmaps of one node of a `query-named-block-nodes` reply."""
    return [Bitmap(name=b.get("name", ""), recording=bool(b.get("recording")), busy=bool(b.get("busy")),
                   persistent=bool(b.get("persistent")), inconsistent=bool(b.get("inconsistent")),
                   granularity=int(b.get("granularity", 0)), count=int(b.get("count", 0)))
            for b in node.get("dirty-bitmaps", [])]


def header_list(info: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The bitmap list of a `qemu-img info --output=json` result (the only parser of it)."""
    bms = ((info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or []
    return [dict(b) for b in bms]


def header_flags(image: Path) -> Dict[str, List[str]]:
    """Persistent bitmaps in a qcow2 header: name -> flags (`auto` = recording, `in-use` = was
    open for writing when its QEMU stopped, i.e. inconsistent). Read with -U: the image may be
    open elsewhere."""
    return {str(b["name"]): [str(f) for f in (b.get("flags") or [])]
            for b in header_list(qemu_img.info(image, force_share=True))}


def from_header(image: Path) -> List[Bitmap]:
    """The bitmaps of a qcow2 that no QEMU has loaded (a shut-off domain's image)."""
    return [Bitmap(name=str(b["name"]), recording="auto" in (b.get("flags") or []), busy=False,
                   persistent=True, inconsistent="in-use" in (b.get("flags") or []),
                   granularity=int(b.get("granularity", 0)), count=-1)
            for b in header_list(qemu_img.info(image, force_share=True))]


def live(dom: libvirt.virDomain, disks: Sequence[Disk]) -> Dict[str, List[Bitmap]]:
    """Bitmaps on each running disk's top (format) node, keyed by disk target."""
    nodes = {n["node-name"]: n for n in monitor.qmp(dom, "query-named-block-nodes", {"flat": True})}
    return {d.target: from_qmp(nodes.get(d.node_name or "", {})) for d in disks}


def of_domain(dom: libvirt.virDomain, disks: Sequence[Disk]) -> Dict[str, List[Bitmap]]:
    """Bitmaps per disk: live state from QEMU when running, from the qcow2 headers when off."""
    if dom.isActive():
        return live(dom, disks)
    return {d.target: from_header(Path(d.source or "")) for d in disks}


def problem(bitmaps: Mapping[str, Iterable[Bitmap]], disks: Iterable[str], name: str) -> Optional[str]:
    """Why bitmap `name` cannot serve an incremental on these disks (None = it can): it must be
    present, recording, not busy and consistent on every one of them."""
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


def stored_ok(image: Path, name: str) -> bool:
    """After a private QEMU quit: bitmap `name` is in the header, recording and consistent."""
    flags = header_flags(image).get(name)
    return flags is not None and "in-use" not in flags and "auto" in flags
