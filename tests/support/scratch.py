"""Scratch domains without a guest OS, for the tests, the demo and the benchmark.

Test/demo code, not part of the package (the wheel does not ship it): scripts/demo.py and
scripts/benchmark.py import it from the repository.

Data gets into the running guest's disks through HMP `qemu-io` on the disk's qdev (the same
path guest I/O takes), and `DiskModel` keeps what the guest should see, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path
from typing import Dict, List, Optional

import libvirt
from lxml import etree

from tests.support.qemu import hmp
from virtbackup.qemu import qemu_img
from virtbackup.virt import host

MiB = 1 << 20


def _virt_type() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


def domain_xml(name: str, disks: Dict[str, Path], memory_mib: int = 64) -> str:
    dom = etree.Element("domain", type=_virt_type())
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "uuid").text = str(uuidlib.uuid4())
    etree.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    etree.SubElement(dom, "vcpu").text = "1"
    os_el = etree.SubElement(dom, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    etree.SubElement(dom, "on_crash").text = "destroy"
    devices = etree.SubElement(dom, "devices")
    etree.SubElement(devices, "emulator").text = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    for target, path in disks.items():
        disk = etree.SubElement(devices, "disk", type="file", device="disk")
        etree.SubElement(disk, "driver", name="qemu", type="qcow2")
        etree.SubElement(disk, "source", file=str(path))
        etree.SubElement(disk, "target", dev=target, bus="virtio")
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(dom, encoding="unicode")


class DiskModel:
    """What the guest sees on one disk: starts zeroed, follows every write."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def write(self, pattern: int, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes([pattern]) * length

    def snapshot(self) -> bytes:
        return bytes(self.data)


class ScratchDomain:
    def __init__(self, conn: libvirt.virConnect, name: str, workdir: Path,
                 disks: Optional[Dict[str, int]] = None, memory_mib: int = 64):
        self.conn = conn
        self.name = name
        self.workdir = Path(workdir)
        self.disk_sizes = disks or {"vda": 64 * MiB}
        self.memory_mib = memory_mib
        self.models = {t: DiskModel(s) for t, s in self.disk_sizes.items()}
        self.dom: Optional[libvirt.virDomain] = None

    def disk_path(self, target: str) -> Path:
        return self.workdir / f"{self.name}-{target}.qcow2"

    def create(self, start: bool = True) -> "ScratchDomain":
        self.workdir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for t, size in self.disk_sizes.items():
            paths[t] = self.disk_path(t)
            qemu_img.create(paths[t], size)
        self.dom = self.conn.defineXML(domain_xml(self.name, paths, self.memory_mib))
        if start:
            self.dom.create()
        return self

    def _qdev(self, target: str) -> str:
        assert self.dom is not None
        for d in host.domain_disks(self.dom.XMLDesc(0)):
            if d.target == target and d.alias:
                return f"/machine/peripheral/{d.alias}/virtio-backend"
        raise KeyError(f"disk {target} has no alias (is the domain running?)")

    def qemu_io(self, target: str, command: str) -> str:
        assert self.dom is not None
        return hmp(self.dom, f'qemu-io -d {self._qdev(target)} "{command}"')

    def write(self, target: str, pattern: int, offset: int, length: int) -> None:
        """Write `length` bytes of `pattern` (0 = zeroes via write -z) and flush."""
        if pattern == 0:
            self.qemu_io(target, f"write -z {offset} {length}")
        else:
            self.qemu_io(target, f"write -P {pattern:#04x} {offset} {length}")
        self.qemu_io(target, "flush")
        self.models[target].write(pattern, offset, length)

    def expected(self) -> Dict[str, bytes]:
        return {t: m.snapshot() for t, m in self.models.items()}

    def remove(self) -> None:
        """Destroy, undefine (with checkpoint metadata) and delete the disk files. Never raises."""
        remove_domain(self.conn, self.name)
        for t in self.disk_sizes:
            try:
                self.disk_path(t).unlink()
            except OSError:
                pass


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy and undefine a domain with its checkpoint/snapshot/NVRAM metadata. Never raises."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError:
        pass


def read_raw(image: Path) -> bytes:
    """An image's guest-visible content (through its backing chain) as raw bytes."""
    out = Path(str(image) + ".raw-check")
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)],
                       check=True, capture_output=True)
        return out.read_bytes()
    finally:
        try:
            out.unlink()
        except OSError:
            pass


def first_difference(a: bytes, b: bytes) -> Optional[int]:
    if a == b:
        return None
    if len(a) != len(b):
        return min(len(a), len(b))
    n = 0
    step = 1 << 16
    while a[n:n + step] == b[n:n + step]:
        n += step
    while a[n] == b[n]:
        n += 1
    return n


def backing_chain(image: Path) -> List[str]:
    return [i["filename"] for i in qemu_img.info(image, backing_chain=True)]


def write_offline(sd: ScratchDomain, target: str, pattern: int, offset: int, length: int) -> None:
    """Write into a shut-off domain's image through QEMU's block layer (`qemu-io` binary).

    Going through QEMU matters: it marks the image's persistent bitmaps, as guest writes would.
    """
    cmd = f"write -z {offset} {length}" if pattern == 0 else f"write -P {pattern:#04x} {offset} {length}"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(sd.disk_path(target))],
                   check=True, capture_output=True)
    sd.models[target].write(pattern, offset, length)


def stop_cleanly(sd: ScratchDomain) -> None:
    """Stop a running scratch domain so that QEMU stores its bitmaps (no OS to shut down).

    `destroy` with VIR_DOMAIN_DESTROY_GRACEFUL sends QEMU only SIGTERM, which it answers with
    an orderly exit (images closed, persistent bitmaps written); a plain destroy may SIGKILL it,
    which leaves every bitmap in-use/inconsistent. Observed on libvirt 9.0 / QEMU 7.2: ~1.6 s.
    """
    assert sd.dom is not None
    sd.dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
