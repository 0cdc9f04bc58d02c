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

from lxml import etree

from virtbackup.errors import OperationFailed

REMOVABLE = ("cdrom", "floppy")


def restored_domain_xml(saved_xml: str, name: str, images: Dict[str, Path],
                        uuid: Optional[str] = None) -> "tuple[str, List[str]]":
    """The XML to define, and notes on what was left out (one line each)."""
    root = etree.fromstring(saved_xml.encode())
    notes: List[str] = []
    _set_child(root, "name", name, after=None)
    _set_child(root, "uuid", uuid or str(uuidlib.uuid4()), after="name")
    genid = root.find("genid")
    if genid is not None:
        genid.text = None                    # empty <genid/>: libvirt makes a new VM generation id
    os_el = root.find("os")
    if os_el is not None:
        for nv in os_el.findall("nvram"):    # the original's EFI variable store; libvirt makes a new one
            os_el.remove(nv)
            notes.append("NVRAM not restored (not in the backup): a fresh one is created from the template")
    devices = root.find("devices")
    if devices is None:
        raise OperationFailed("the saved domain XML has no <devices>")
    for iface in devices.findall("interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)                # libvirt generates a new MAC address
    for ch in devices.findall("channel"):
        src = ch.find("source")
        if ch.get("type") == "unix" and src is not None and "path" in src.attrib:
            del src.attrib["path"]           # libvirt generates a per-domain socket path
    # host resources the original domain uses: a copy must not write into or take them
    for tag in ("filesystem", "hostdev", "redirdev", "smartcard"):
        for el in devices.findall(tag):
            devices.remove(el)
            notes.append(f"<{tag}> removed: it is the original domain's host resource")
    for tag in ("serial", "console", "parallel", "channel"):
        for el in devices.findall(tag):
            if el.get("type") in ("file", "dev", "pipe"):
                devices.remove(el)
                notes.append(f"<{tag} type='{el.get('type')}'> removed: it writes to the original's host path")
    seen = set()
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        seen.add(dev)
        for bs in disk.findall("backingStore"):
            disk.remove(bs)
        if dev is not None and dev in images:
            disk.set("type", "file")
            for src in disk.findall("source"):
                disk.remove(src)
            src = etree.Element("source", file=str(images[dev]))
            driver = disk.find("driver")
            if driver is None:
                driver = etree.Element("driver", name="qemu")
                disk.insert(0, driver)
            driver.set("type", "qcow2")
            driver.addnext(src)
        elif disk.get("device", "disk") in REMOVABLE:
            for src in disk.findall("source"):
                disk.remove(src)
            notes.append(f"{disk.get('device')} {dev}: kept without media")
        else:
            devices.remove(disk)
            notes.append(f"disk {dev} removed: not restored (not in the point, or not selected)")
    machine = (root.findtext("os/type") or "", root.find("os/type"))
    q35 = machine[1] is not None and "q35" in (machine[1].get("machine") or "")
    for dev in sorted(set(images) - seen):
        # In the point but not in its saved (inactive) XML: hot-plugged, never made persistent.
        # Attach it like the others, on the bus its name implies, and say so.
        bus = _bus_for(dev, q35)
        if bus is None:
            notes.append(f"disk {dev} restored to {images[dev]} but not attached: it was hot-plugged "
                         "(not in the saved domain XML) and its bus can't be told from its name; attach it "
                         "with 'virsh attach-disk'")
            continue
        disk = etree.SubElement(devices, "disk", type="file", device="disk")
        etree.SubElement(disk, "driver", name="qemu", type="qcow2")
        etree.SubElement(disk, "source", file=str(images[dev]))
        etree.SubElement(disk, "target", dev=dev, bus=bus)
        notes.append(f"disk {dev} attached on bus {bus}: it was hot-plugged (not in the saved domain XML)")
    return etree.tostring(root, encoding="unicode"), notes


def _bus_for(dev: str, q35: bool) -> Optional[str]:
    """The bus a libvirt target name implies (vdX virtio, sdX scsi, hdX ide/sata, xvdX xen)."""
    for prefix, bus in (("vd", "virtio"), ("sd", "scsi"), ("hd", "sata" if q35 else "ide"), ("xvd", "xen")):
        if dev.startswith(prefix):
            return bus
    return None


def _set_child(root: etree._Element, tag: str, text: str, after: Optional[str]) -> None:
    el = root.find(tag)
    if el is None:
        el = etree.Element(tag)
        prev = root.find(after) if after else None
        if prev is not None:
            prev.addnext(el)
        else:
            root.insert(0, el)
    el.text = text


__all__ = ["restored_domain_xml"]
