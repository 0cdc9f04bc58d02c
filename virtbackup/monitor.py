"""QMP passthrough (`qemu-monitor-command`) for what libvirt does not expose: bitmap state.

Read-only in normal runs (query-named-block-nodes). Passthrough marks the domain "tainted" in
libvirt's log; that is expected and harmless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import libvirt
import libvirt_qemu

from .errors import HostError
from .host import Disk, libvirt_message


def qmp(dom: libvirt.virDomain, execute: str, arguments: Optional[Dict[str, Any]] = None) -> Any:
    cmd: Dict[str, Any] = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0)
    except libvirt.libvirtError as e:
        raise HostError(f"QMP {execute} failed: {libvirt_message(e)}") from None
    data = json.loads(reply)
    if "error" in data:
        raise HostError(f"QMP {execute} failed: {data['error'].get('desc')}")
    return data.get("return")


def hmp(dom: libvirt.virDomain, command: str) -> str:
    try:
        return libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    except libvirt.libvirtError as e:
        raise HostError(f"HMP {command.split()[0]} failed: {libvirt_message(e)}") from None


@dataclass(frozen=True)
class Bitmap:
    name: str
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool
    granularity: int
    count: int          # dirty bytes


def bitmaps_by_node(dom: libvirt.virDomain) -> Dict[str, List[Bitmap]]:
    nodes = qmp(dom, "query-named-block-nodes", {"flat": True})
    out: Dict[str, List[Bitmap]] = {}
    for node in nodes:
        out[node["node-name"]] = [
            Bitmap(name=b.get("name", ""), recording=bool(b.get("recording")), busy=bool(b.get("busy")),
                   persistent=bool(b.get("persistent")), inconsistent=bool(b.get("inconsistent")),
                   granularity=int(b.get("granularity", 0)), count=int(b.get("count", 0)))
            for b in node.get("dirty-bitmaps", [])
        ]
    return out


def disk_bitmaps(dom: libvirt.virDomain, disks: List[Disk]) -> Dict[str, List[Bitmap]]:
    """Bitmaps on each disk's top (format) node, keyed by disk target."""
    nodes = bitmaps_by_node(dom)
    return {d.target: nodes.get(d.node_name or "", []) for d in disks}
