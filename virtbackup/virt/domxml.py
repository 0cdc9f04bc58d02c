"""Domain XML as one typed object: parsed once, read and edited through it, written back.

Every module that reads or rewrites a domain's XML (disk inspection, the guest agent channel,
the restored and the drill domain, live restore's backing chain, the offline runner's emulator)
goes through `DomainXML` instead of walking lxml elements itself, so the knowledge of where
libvirt keeps what (`devices/disk/source@file|dev|name`, `backingStore`, `alias`, ...) is here
once. Pure XML: no libvirt calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from lxml import etree

from virtbackup.errors import OperationFailed

AGENT_CHANNEL = "org.qemu.guest_agent.0"
REMOVABLE = ("cdrom", "floppy")


def _source_name(src: Optional[etree._Element]) -> Optional[str]:
    """What a <source> points at: a file or block device path, or a network/volume name."""
    if src is None:
        return None
    return src.get("file") or src.get("dev") or src.get("name") or src.get("volume")


class DiskXML:
    """One <disk> of a domain."""

    def __init__(self, el: etree._Element):
        self.el = el

    @property
    def target(self) -> Optional[str]:
        t = self.el.find("target")
        return t.get("dev") if t is not None else None

    @property
    def device(self) -> str:
        return self.el.get("device", "disk")

    @property
    def type(self) -> str:
        return self.el.get("type", "file")

    @property
    def format(self) -> Optional[str]:
        driver = self.el.find("driver")
        return driver.get("type") if driver is not None else None

    @property
    def source(self) -> Optional[str]:
        return _source_name(self.el.find("source"))

    @property
    def source_index(self) -> Optional[int]:
        src = self.el.find("source")
        idx = src.get("index") if src is not None else None
        return int(idx) if idx is not None else None

    @property
    def alias(self) -> Optional[str]:
        a = self.el.find("alias")
        return a.get("name") if a is not None else None

    @property
    def backing_source(self) -> Optional[str]:
        """The backing file under the active layer (live XML's first <backingStore>), None if none."""
        src = self.el.find("./backingStore/source")
        return None if src is None else (_source_name(src) or "?")

    def set_file_source(self, path: Path, fmt: str = "qcow2") -> None:
        """Point the disk at a local image file: no other source, no backing store, the driver's format."""
        self.el.set("type", "file")
        for tag in ("source", "backingStore"):
            for old in self.el.findall(tag):
                self.el.remove(old)
        driver = self.el.find("driver")
        if driver is None:
            driver = etree.Element("driver", name="qemu")
            self.el.insert(0, driver)
        driver.set("type", fmt)
        driver.addnext(etree.Element("source", file=str(path)))

    def eject(self) -> None:
        """No media (removable devices), no backing store."""
        for tag in ("source", "backingStore"):
            for old in self.el.findall(tag):
                self.el.remove(old)


class DomainXML:
    """A domain's XML (live or inactive, or as saved in a backup dir)."""

    def __init__(self, root: etree._Element):
        self.root = root

    @classmethod
    def parse(cls, xml: str) -> "DomainXML":
        """XML that does not parse raises lxml's XMLSyntaxError (an etree.LxmlError): callers reading
        a saved XML file turn it into their own one-line error."""
        return cls(etree.fromstring(xml.encode()))

    def to_string(self) -> str:
        return etree.tostring(self.root, encoding="unicode")

    # -- reading ----------------------------------------------------------------------------------
    @property
    def devices(self) -> etree._Element:
        devices = self.root.find("devices")
        if devices is None:
            raise OperationFailed("the domain XML has no <devices>")
        return devices

    @property
    def disks(self) -> List[DiskXML]:
        return [DiskXML(d) for d in self.root.findall("./devices/disk")]

    def disk(self, target: str) -> Optional[DiskXML]:
        return next((d for d in self.disks if d.target == target), None)

    @property
    def emulator(self) -> str:
        return (self.root.findtext("devices/emulator") or "").strip()

    @property
    def machine(self) -> str:
        os_type = self.root.find("os/type")
        return (os_type.get("machine") or "") if os_type is not None else ""

    @property
    def has_agent_channel(self) -> bool:
        return any(t.get("name") == AGENT_CHANNEL for t in self.root.iterfind("./devices/channel/target"))

    # -- editing ----------------------------------------------------------------------------------
    def set_text(self, tag: str, text: Optional[str], after: Optional[str] = None) -> None:
        """Set a top-level element's text, creating it (after `after`, else first) when missing."""
        el = self.root.find(tag)
        if el is None:
            el = etree.Element(tag)
            prev = self.root.find(after) if after else None
            if prev is not None:
                prev.addnext(el)
            else:
                self.root.insert(0, el)
        el.text = text

    def set_identity(self, name: str, uuid: str) -> None:
        """A new name and UUID, and an empty <genid/> where there was one (libvirt makes a new one)."""
        self.set_text("name", name)
        self.set_text("uuid", uuid, after="name")
        genid = self.root.find("genid")
        if genid is not None:
            genid.text = None

    def drop_nvram(self) -> bool:
        """Remove the EFI variable store reference (libvirt makes a fresh one); True if there was one."""
        os_el = self.root.find("os")
        found = os_el.findall("nvram") if os_el is not None else []
        for nv in found:
            os_el.remove(nv)  # type: ignore[union-attr]
        return bool(found)

    def drop_macs(self) -> None:
        """Interfaces without MAC addresses: libvirt generates new ones."""
        for iface in self.devices.findall("interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)

    def drop_channel_paths(self) -> None:
        """unix channels without a socket path: libvirt generates a per-domain one."""
        for ch in self.devices.findall("channel"):
            src = ch.find("source")
            if ch.get("type") == "unix" and src is not None and "path" in src.attrib:
                del src.attrib["path"]

    def remove_devices(self, tag: str, where: Callable[[etree._Element], bool] = lambda _el: True
                       ) -> List[etree._Element]:
        """Remove the <devices> children named `tag` for which `where` holds; the removed ones."""
        devices = self.devices
        gone = [el for el in devices.findall(tag) if where(el)]
        for el in gone:
            devices.remove(el)
        return gone

    def remove_disk(self, disk: DiskXML) -> None:
        self.devices.remove(disk.el)

    def add_file_disk(self, target: str, bus: str, path: Path, fmt: str = "qcow2") -> DiskXML:
        disk = etree.SubElement(self.devices, "disk", type="file", device="disk")
        etree.SubElement(disk, "driver", name="qemu", type=fmt)
        etree.SubElement(disk, "source", file=str(path))
        etree.SubElement(disk, "target", dev=target, bus=bus)
        return DiskXML(disk)

    def add_file_serial(self, path: Path) -> None:
        serial = etree.SubElement(self.devices, "serial", type="file")
        etree.SubElement(serial, "source", path=str(path))
        etree.SubElement(serial, "target", port="0")


__all__ = ["AGENT_CHANNEL", "REMOVABLE", "DiskXML", "DomainXML"]
