"""Domain XML as one typed object: parsed once, read and edited through it, written back.

Every module that reads or rewrites a domain's XML (disk inspection, the guest agent channel,
the restored and the drill domain, live restore's backing chain, the offline runner's emulator)
goes through `DomainXML` instead of walking lxml elements itself, so the knowledge of where
libvirt keeps what (`devices/disk/source@file|dev|name`, `backingStore`, `alias`, ...) is here
once. Pure XML: no libvirt calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from lxml import etree

from virtbackup.errors import OperationFailed

AGENT_CHANNEL = "org.qemu.guest_agent.0"
REMOVABLE = ("cdrom", "floppy")
DIRECT_BOOT = ("kernel", "initrd", "dtb")
RNG_DEVICES = ("/dev/urandom", "/dev/random", "/dev/hwrng")


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
        """Point the disk at a local image file: no other source, no backing store, the driver's format,
        no network credentials (<auth> of an RBD/iSCSI disk names a host secret)."""
        self.el.set("type", "file")
        for tag in ("source", "backingStore", "mirror", "auth"):
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
        for tag in ("source", "backingStore", "mirror"):
            for old in self.el.findall(tag):
                self.el.remove(old)
        if self.type not in ("file", "block"):      # network, volume, vhostuser, dir: an empty drive
            self.el.set("type", "file")


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

    # -- host paths (libvirt's domaincommon.rng: every element or attribute naming a host file,
    # device, directory or socket, and what restoredom.py does with it) ----------------------------
    def drop_emulator(self) -> Optional[str]:
        """Remove <devices><emulator>: libvirt fills in this host's binary for the arch and
        machine when the domain is defined. The old value, if there was one."""
        old = self.emulator or None
        for el in self.root.findall("devices/emulator"):
            self.devices.remove(el)
        return old

    @property
    def loader(self) -> Optional[str]:
        """The firmware file <os><loader> names (None: none, or firmware autoselection)."""
        text = (self.root.findtext("os/loader") or "").strip()
        return text or None

    @property
    def nvram_template(self) -> Optional[str]:
        nv = self.root.find("os/nvram")
        return nv.get("template") if nv is not None else None

    @property
    def direct_boot(self) -> Dict[str, str]:
        """Host files of a direct kernel boot: {"kernel"|"initrd"|"dtb": path}."""
        out = {}
        for tag in DIRECT_BOOT:
            text = (self.root.findtext(f"os/{tag}") or "").strip()
            if text:
                out[tag] = text
        return out

    def drop_direct_boot(self) -> None:
        """No kernel, initrd, device tree or kernel command line: the guest boots from its disks."""
        self._remove(*(f"os/{t}" for t in (*DIRECT_BOOT, "cmdline")))

    def drop_os_host_files(self) -> List[str]:
        """ACPI tables loaded from host files (<os><acpi><table>), a container's init/initdir."""
        return self._remove("os/acpi", "os/init", "os/initdir")

    def drop_foreign_namespaces(self) -> List[str]:
        """Elements of other XML namespaces (qemu:commandline, qemu:override, xen:commandline ...),
        except inside <metadata>: raw hypervisor arguments can name any host path or program."""
        gone = []
        for el in list(self.root.iter()):
            if not isinstance(el.tag, str) or not el.tag.startswith("{"):
                continue
            if any(a.tag == "metadata" for a in el.iterancestors()):
                continue
            parent = el.getparent()
            if parent is not None:
                gone.append(etree.QName(el).localname)
                parent.remove(el)
        return gone

    def set_metadata(self, el: etree._Element) -> None:
        """Put a namespaced element under <metadata>, replacing one of the same namespace (what
        libvirt's setMetadata does for a running domain, here before the domain exists)."""
        ns = etree.QName(el).namespace
        meta = self.root.find("metadata")
        if meta is None:
            meta = etree.SubElement(self.root, "metadata")
            # libvirt's schema wants <metadata> early; after <description>/<title>, or after <uuid>
            anchor = next((self.root.find(t) for t in ("description", "title", "uuid", "name")
                           if self.root.find(t) is not None), None)
            if anchor is not None:
                anchor.addnext(meta)
        for old in [c for c in meta if isinstance(c.tag, str) and etree.QName(c).namespace == ns]:
            meta.remove(old)
        meta.append(el)

    def drop_metadata(self, ns: str) -> int:
        """Remove every <metadata> child of namespace `ns`; how many there were."""
        meta = self.root.find("metadata")
        if meta is None:
            return 0
        gone = [c for c in meta if isinstance(c.tag, str) and etree.QName(c).namespace == ns]
        for c in gone:
            meta.remove(c)
        return len(gone)

    def drop_host_settings(self) -> List[str]:
        """Domain-level settings that take host resources by path or label: security labels
        (a static DAC label runs QEMU as any user), <launchSecurity>, <blkiotune> host block
        devices, <resource> cgroup partitions, <sysinfo> fw_cfg entries read from host files."""
        return self._remove(".//seclabel", "launchSecurity", "blkiotune/device", "resource",
                            "sysinfo/entry[@file]")

    def strip_device_host_paths(self) -> List[str]:
        """Host paths inside devices that are otherwise kept: interface scripts (run by libvirt),
        tap/vhost backends and fixed tap names, option ROM files, character device logs, ttys,
        graphics sockets and render nodes. libvirt generates what it needs in their place."""
        gone = self._remove("devices/interface/script", "devices/interface/downscript",
                            "devices/interface/backend", "devices/interface/target", "devices/*/log")
        for xpath, attr in (("devices//rom", "file"), ("devices/*", "tty"), ("devices/graphics", "socket"),
                            ("devices/graphics/listen", "socket"), ("devices/graphics/gl", "rendernode"),
                            ("devices/video/model/acceleration", "rendernode"), ("devices/audio", "serverName")):
            for el in self.root.findall(xpath):
                if attr in el.attrib:
                    del el.attrib[attr]
                    gone.append(f"{el.tag} {attr}")
        return gone

    def remove_host_devices(self) -> List[str]:
        """Remove the devices that take a host file, device or socket by path: vhost-user and
        host-device interfaces, evdev and passthrough input, TPM passthrough or external, ivshmem
        (<shmem>), NVDIMM and virtio-pmem memory backed by host files, an RNG reading anything but
        /dev/urandom, /dev/random or /dev/hwrng, audio to files or host sound devices, sanlock
        leases, and serial/console/parallel ports on unix sockets. "<tag type='x'>" of each."""
        def tpm_of_host(el: etree._Element) -> bool:
            backend = el.find("backend")
            return backend is None or backend.get("type") != "emulator" or backend.find("source") is not None

        def rng_of_host(el: etree._Element) -> bool:
            backend = el.find("backend")
            return backend is None or backend.get("model") != "random" or \
                (backend.text or "").strip() not in ("", *RNG_DEVICES)

        rules: List[Tuple[str, Callable[[etree._Element], bool]]] = [
            ("interface", lambda el: el.get("type") in ("vhostuser", "hostdev")),
            ("input", lambda el: el.get("type") in ("evdev", "passthrough") or el.find("source") is not None),
            ("tpm", tpm_of_host),
            ("shmem", lambda _el: True),
            ("memory", lambda el: el.find("source/path") is not None),
            ("rng", rng_of_host),
            ("audio", lambda el: el.get("type") in ("file", "alsa", "oss")),
            ("lease", lambda _el: True),
        ]
        rules += [(tag, lambda el: el.get("type") == "unix") for tag in ("serial", "console", "parallel")]
        gone = []
        for tag, where in rules:
            for el in self.remove_devices(tag, where):
                gone.append(f"<{tag}" + (f" type='{el.get('type')}'" if el.get("type") else "") + ">")
                if tag == "audio" and el.get("id"):     # the sound cards' references to it
                    for ref in self.root.findall(f"devices/sound/audio[@id='{el.get('id')}']"):
                        ref.getparent().remove(ref)  # type: ignore[union-attr]
        return gone

    def _remove(self, *xpaths: str) -> List[str]:
        gone = []
        for xpath in xpaths:
            for el in self.root.findall(xpath):
                parent = el.getparent()
                if parent is not None:
                    gone.append(el.tag)
                    parent.remove(el)
        return gone

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


__all__ = ["AGENT_CHANNEL", "DIRECT_BOOT", "REMOVABLE", "DiskXML", "DomainXML"]
