"""The XML of a restored point defined as a new domain: the point's saved XML with a new identity
and its disks pointing at the restored images (or instant-restore overlays). Pure XML: the
libvirt calls (define, start) are host.py's.

The new domain must never share anything writable with the original: it gets a new name and
UUID, libvirt generates new MAC addresses and a fresh NVRAM, and every disk that was not restored
is removed (removable media are kept, ejected), so it can't write into the original's storage.
"""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Dict, List, Optional

from virtbackup.virt.domxml import REMOVABLE, DomainXML


def restored_domain_xml(saved_xml: str, name: str, images: Dict[str, Path],
                        uuid: Optional[str] = None) -> "tuple[str, List[str]]":
    """The XML to define, and notes on what was left out (one line each)."""
    dom = DomainXML.parse(saved_xml)
    notes: List[str] = []
    dom.set_identity(name, uuid or str(uuidlib.uuid4()))
    if dom.drop_nvram():                     # the original's EFI variable store; libvirt makes a new one
        notes.append("NVRAM not restored (not in the backup): a fresh one is created from the template")
    dom.drop_macs()
    dom.drop_channel_paths()
    # host resources the original domain uses: a copy must not write into or take them
    for tag in ("filesystem", "hostdev", "redirdev", "smartcard"):
        for _el in dom.remove_devices(tag):
            notes.append(f"<{tag}> removed: it is the original domain's host resource")
    for tag in ("serial", "console", "parallel", "channel"):
        for el in dom.remove_devices(tag, lambda el: el.get("type") in ("file", "dev", "pipe")):
            notes.append(f"<{tag} type='{el.get('type')}'> removed: it writes to the original's host path")
    seen = set()
    for disk in dom.disks:
        dev = disk.target
        seen.add(dev)
        if dev is not None and dev in images:
            disk.set_file_source(images[dev])
        elif disk.device in REMOVABLE:
            disk.eject()
            notes.append(f"{disk.device} {dev}: kept without media")
        else:
            dom.remove_disk(disk)
            notes.append(f"disk {dev} removed: not restored (not in the point, or not selected)")
    q35 = "q35" in dom.machine
    for dev in sorted(set(images) - seen):
        # In the point but not in its saved (inactive) XML: hot-plugged, never made persistent.
        # Attach it like the others, on the bus its name implies, and say so.
        bus = _bus_for(dev, q35)
        if bus is None:
            notes.append(f"disk {dev} restored to {images[dev]} but not attached: it was hot-plugged "
                         "(not in the saved domain XML) and its bus can't be told from its name; attach it "
                         "with 'virsh attach-disk'")
            continue
        dom.add_file_disk(dev, bus, images[dev])
        notes.append(f"disk {dev} attached on bus {bus}: it was hot-plugged (not in the saved domain XML)")
    return dom.to_string(), notes


def _bus_for(dev: str, q35: bool) -> Optional[str]:
    """The bus a libvirt target name implies (vdX virtio, sdX scsi, hdX ide/sata, xvdX xen)."""
    for prefix, bus in (("vd", "virtio"), ("sd", "scsi"), ("hd", "sata" if q35 else "ide"), ("xvd", "xen")):
        if dev.startswith(prefix):
            return bus
    return None


__all__ = ["restored_domain_xml"]
