"""Test helpers that drive QEMU itself: HMP passthrough (qemu-io into a running guest disk).

Tests only: virtbackup never sends HMP (its QMP passthrough is virt/monitor.py)."""

from __future__ import annotations

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
