"""Test helpers that drive QEMU itself: HMP passthrough (qemu-io into a running guest disk).

Tests only: virtbackup never sends HMP (its QMP passthrough is virt/monitor.py)."""

from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator

import libvirt
import libvirt_qemu

from virtbackup.errors import HostError
from virtbackup.virt.host import libvirt_message


def hmp(dom: libvirt.virDomain, command: str) -> str:
    """One HMP command through libvirt (`virsh qemu-monitor-command --hmp`)."""
    try:
        return str(libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))
    except libvirt.libvirtError as e:
        raise HostError(f"HMP {command.split()[0]} failed: {libvirt_message(e)}") from e


def _qmp(dom: libvirt.virDomain, execute: str, arguments: dict) -> None:
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(
            dom, json.dumps({"execute": execute, "arguments": arguments}), 0))
    except libvirt.libvirtError as e:
        raise HostError(f"QMP {execute} failed: {libvirt_message(e)}") from e
    if "error" in reply:
        raise HostError(f"QMP {execute} failed: {reply['error'].get('desc')}")


@contextlib.contextmanager
def slow_reads(dom: libvirt.virDomain, target: str, iops: int) -> Iterator[Callable[[], None]]:
    """Every read of disk `target`'s image limited to `iops` requests a second, the backup job's
    reads included, from its first byte: a QEMU throttle filter put between the disk's qcow2 node
    and its file node (`blockdev-reopen`). A test then holds a push job in flight for as long as it
    likes. Catching a job as it appears does not: block-copy starts its first 64 copies at once, so
    `block-job-set-speed` or a pause that comes 0.1 s late finds 100 MiB copied (two CI failures).

    Yields `lift()`, which removes the limit (also done on leaving). Seen here: reads queued under
    the limit when the job starts hold QEMU's monitor once, for about 64/iops seconds."""
    from virtbackup.virt import host
    fmt = next(d.node_name for d in host.domain_disks(dom.XMLDesc(0)) if d.target == target)
    assert fmt, f"disk {target} has no node name"
    storage = fmt.replace("-format", "-storage")            # libvirt's names for the two nodes
    group, node = f"vbtest-tg-{target}", f"vbtest-throttle-{target}"
    _qmp(dom, "object-add", {"qom-type": "throttle-group", "id": group, "limits": {"iops-read": iops}})
    _qmp(dom, "blockdev-add", {"driver": "throttle", "node-name": node, "throttle-group": group,
                               "file": storage})
    _qmp(dom, "blockdev-reopen", {"options": [{"node-name": fmt, "driver": "qcow2", "file": node}]})

    def lift() -> None:
        _qmp(dom, "qom-set", {"path": group, "property": "limits", "value": {"iops-read": 0}})

    try:
        yield lift
    finally:
        # back to the plain graph where nothing holds the filter; else the domain's removal does it
        with contextlib.suppress(HostError):
            lift()
            _qmp(dom, "blockdev-reopen", {"options": [{"node-name": fmt, "driver": "qcow2", "file": storage}]})
            _qmp(dom, "blockdev-del", {"node-name": node})
            _qmp(dom, "object-del", {"id": group})
