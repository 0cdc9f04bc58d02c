"""The XML of a restored point defined as a new domain: the point's saved XML with a new identity
and its disks pointing at the restored images (or instant-restore overlays). Pure XML: the
libvirt calls (define, start) are host.py's.

The new domain must never share anything writable with the original: it gets a new name and
UUID, libvirt generates new MAC addresses and a fresh NVRAM, and every disk that was not restored
is removed (removable media are kept, ejected), so it can't write into the original's storage.

Nor does it take any host path from the backup directory (invariant 8; the saved XML is checked
against its recorded hash, but older points have none, and a backup dir may come from another
host): the emulator is dropped (libvirt takes this host's for the arch and machine), a firmware
loader or NVRAM template outside this host's firmware directories is refused, a direct-boot
kernel, initrd or device tree outside its boot directories is dropped (the guest boots from its
disks), and every device or setting that names a host file, device or socket is removed or loses
that path (domxml.py lists them, from libvirt's domaincommon.rng), each with a note.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from lxml import etree

from virtbackup import env
from virtbackup.virt.domxml import REMOVABLE, DomainXML

# The live-restore record (liverestore.py) in a domain's <metadata>: which overlays a live restore
# of which backup dir and point still has to make independent. Here because a restored domain is
# defined with it (before the domain exists nothing can lose it) and never inherits one.
LIVE_NS = "https://virtbackup.invalid/xmlns/live-restore/1"
LIVE_KEY = "virtbackup-live"


def live_record(backup_dir: str, point: str, images: Dict[str, Path], namespaced: bool = True,
                secret: Optional[str] = None) -> etree._Element:
    """<live backup-dir= point= [secret=]><disk target= overlay=/>...</live>; `namespaced=False`
    for libvirt's setMetadata (which adds the namespace itself). `secret`: the UUID of the
    libvirt secret the domain's encrypted backing images are opened with (an encrypted backup:
    the resume needs the key and defines that secret again, see liverestore.py)."""
    tag = f"{{{LIVE_NS}}}live" if namespaced else "live"
    root = etree.Element(tag, nsmap={LIVE_KEY: LIVE_NS} if namespaced else None)
    root.set("backup-dir", backup_dir)
    root.set("point", point)
    if secret is not None:
        root.set("secret", secret)
    for disk, path in sorted(images.items()):
        etree.SubElement(root, f"{{{LIVE_NS}}}disk" if namespaced else "disk", target=disk, overlay=str(path))
    return root


# Where libvirt's and the distributions' firmware descriptors point (OVMF, AAVMF, SeaBIOS, QEMU's own).
FIRMWARE_DIRS = ("/usr/share/OVMF", "/usr/share/AAVMF", "/usr/share/qemu", "/usr/share/seabios",
                 "/usr/share/qemu-efi-aarch64", "/usr/share/edk2")


def host_file_in(path: str, dirs: Sequence[str]) -> bool:
    """`path` is a regular file of this host inside one of `dirs` (also after resolving links)."""
    if not path.startswith("/") or os.path.normpath(path) != path:
        return False
    real = os.path.realpath(path)
    inside = [d for d in dirs if d.startswith("/")]
    return (os.path.isfile(real) and any(path.startswith(d.rstrip("/") + "/") for d in inside)
            and any(real.startswith(os.path.realpath(d) + "/") for d in inside))


def _drop_host_paths(dom: DomainXML, notes: List[str]) -> None:
    """What of the saved XML names host paths (see the module docstring): refused (ValueError)
    or dropped with a note."""
    for what, path in (("firmware loader", dom.loader), ("NVRAM template", dom.nvram_template)):
        if path is not None and not host_file_in(path, FIRMWARE_DIRS):
            raise ValueError(f"its {what} {path!r} is not a firmware file of this host "
                             f"(in {', '.join(FIRMWARE_DIRS)}); not defining a domain that loads it")
    emulator = dom.drop_emulator()
    if emulator:
        notes.append(f"emulator {emulator} not taken from the backup: libvirt uses this host's")
    boot = dom.direct_boot
    outside = sorted(f"{k} {v}" for k, v in boot.items() if not host_file_in(v, env.boot_dirs()))
    if outside:
        dom.drop_direct_boot()
        notes.append(f"direct kernel boot removed ({', '.join(outside)} not in this host's boot directories "
                     f"{', '.join(env.boot_dirs())}): the domain boots from its disks")
    for tag in dom.drop_os_host_files():
        notes.append(f"<os><{tag}> removed: it loads host files")
    for tag in dom.drop_foreign_namespaces():
        notes.append(f"<{tag}> (hypervisor-specific namespace) removed: raw arguments can name host paths")
    for tag in dom.drop_host_settings():
        notes.append(f"<{tag}> removed: a host resource of the original domain")
    for what in dom.remove_host_devices():
        notes.append(f"{what} removed: it uses a host file, device or socket")
    for what in dom.strip_device_host_paths():
        notes.append(f"{what} dropped: a host path (libvirt chooses its own)")


def encrypted_backing(disk_el: etree._Element, chain: Sequence[Path], secret: str) -> None:
    """Spell out the backing chain under a disk's overlay (top first, absolute paths), every
    layer LUKS-encrypted and opened with the libvirt secret `secret`, ended by an empty
    <backingStore/>. libvirt 9.0 probes a chain it is not given, and a probed chain has no key:
    given one, it hands each layer its key and uses no header to find the next."""
    for old in disk_el.findall("backingStore"):
        disk_el.remove(old)
    anchor = disk_el.find("source")
    parent = disk_el
    for path in chain:
        store = etree.Element("backingStore", type="file")
        etree.SubElement(store, "format", type="qcow2")
        src = etree.SubElement(store, "source", file=str(path))
        enc = etree.SubElement(src, "encryption", format="luks")
        etree.SubElement(enc, "secret", type="passphrase", uuid=secret)
        if parent is disk_el and anchor is not None:
            anchor.addnext(store)
        else:
            parent.append(store)
        parent = store
    parent.append(etree.Element("backingStore"))


def restored_domain_xml(saved_xml: str, name: str, images: Dict[str, Path],
                        uuid: Optional[str] = None,
                        live: Optional["tuple[str, str]"] = None,
                        backing: Optional[Mapping[str, Sequence[Path]]] = None,
                        secret: Optional[str] = None) -> "tuple[str, List[str]]":
    """The XML to define, and notes on what was left out (one line each).

    `live`: (backup dir, point) of a live restore: the domain is defined with its record.
    `backing` and `secret` (a live restore of an encrypted backup): each overlay's encrypted
    backing chain, opened with that libvirt secret (recorded in the live record too)."""
    if (backing is None) != (secret is None) or (secret is not None and live is None):
        raise ValueError("an encrypted backing chain needs a live restore, its chains and its secret")
    dom = DomainXML.parse(saved_xml)
    notes: List[str] = []
    dom.set_identity(name, uuid or str(uuidlib.uuid4()))
    # a point of a domain that was itself being live-restored: its record names the original's
    # overlays, never this domain's
    if dom.drop_metadata(LIVE_NS):
        notes.append("the original's unfinished live-restore record removed")
    if live is not None:
        dom.set_metadata(live_record(live[0], live[1], images, secret=secret))
    _drop_host_paths(dom, notes)
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
            if backing is not None and secret is not None:
                encrypted_backing(disk.el, backing[dev], secret)
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
        added = dom.add_file_disk(dev, bus, images[dev])
        if backing is not None and secret is not None:
            encrypted_backing(added.el, backing[dev], secret)
        notes.append(f"disk {dev} attached on bus {bus}: it was hot-plugged (not in the saved domain XML)")
    return dom.to_string(), notes


def _bus_for(dev: str, q35: bool) -> Optional[str]:
    """The bus a libvirt target name implies (vdX virtio, sdX scsi, hdX ide/sata, xvdX xen)."""
    for prefix, bus in (("vd", "virtio"), ("sd", "scsi"), ("hd", "sata" if q35 else "ide"), ("xvd", "xen")):
        if dev.startswith(prefix):
            return bus
    return None


__all__ = ["FIRMWARE_DIRS", "encrypted_backing", "host_file_in", "restored_domain_xml"]
