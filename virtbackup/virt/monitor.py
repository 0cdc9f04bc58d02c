"""QMP passthrough (`qemu-monitor-command`) for what libvirt does not expose.

Read-only in normal runs (query-named-block-nodes, see bitmaps.py); repair removes orphaned
bitmaps through it. Passthrough marks the domain "tainted" in libvirt's log; that is expected and
harmless. Every command is logged at debug.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Optional

import libvirt
import libvirt_qemu

from virtbackup.errors import HostError
from virtbackup.virt.host import libvirt_message

log = logging.getLogger(__name__)


def qmp(dom: libvirt.virDomain, execute: str, arguments: Optional[Dict[str, Any]] = None) -> Any:
    cmd: Dict[str, Any] = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    text = json.dumps(cmd)
    log.debug("QMP %s -> %s", dom.name(), text)
    started = time.monotonic()
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
    except libvirt.libvirtError as e:
        raise HostError(f"QMP {execute} failed: {libvirt_message(e)}") from e
    log.debug("QMP %s <- %s (%.3fs)", dom.name(), reply[:2000], time.monotonic() - started)
    data = json.loads(reply)
    if "error" in data:
        raise HostError(f"QMP {execute} failed: {data['error'].get('desc')}")
    return data.get("return")
