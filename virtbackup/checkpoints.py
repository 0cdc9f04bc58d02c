"""libvirt checkpoints that virtbackup owns: lookup, delete, cleanup.

Only checkpoints whose names carry a backup dir's prefix (`virtbackup-<dir_id>-`) are ever
deleted; checkpoints of other tools and of other backup dirs are left alone.
"""

from __future__ import annotations

import subprocess
from typing import Iterable, List, Optional

import libvirt

from . import qemuimg, xmlbuild
from .host import libvirt_message, transient_retry


@transient_retry
def lookup(dom: libvirt.virDomain, name: str) -> Optional[libvirt.virDomainCheckpoint]:
    try:
        return dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        raise


@transient_retry
def names(dom: libvirt.virDomain) -> List[str]:
    return [cp.getName() for cp in dom.listAllCheckpoints(0)]


def ours(dom: libvirt.virDomain, prefix: str) -> List[str]:
    return [n for n in names(dom) if n.startswith(prefix)]


def delete(dom: libvirt.virDomain, name: str, sources: Iterable[str] = ()) -> Optional[str]:
    """Delete checkpoint `name` and its bitmaps. Returns None, or a warning when it could not.

    On a shut-off domain libvirt can only drop the metadata; the bitmaps are then removed from
    the images with `qemu-img bitmap --remove` (nobody has them open while the domain is off).
    """
    try:
        cp = lookup(dom, name)
        if dom.isActive():
            if cp is not None:
                transient_retry(cp.delete)(0)
            return None
        if cp is not None:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as e:
        return f"could not delete checkpoint {name}: {libvirt_message(e)}"
    warnings = [w for w in (remove_bitmap_offline(src, name) for src in sources) if w]
    return "; ".join(warnings) or None


def remove_bitmap_offline(image: str, bitmap: str) -> Optional[str]:
    try:
        info = qemuimg.info(image)  # type: ignore[arg-type]
    except Exception as e:  # image gone or busy: nothing we can do offline
        return f"could not inspect {image}: {e}"
    bitmaps = ((info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or []
    if not any(b.get("name") == bitmap for b in bitmaps):
        return None
    proc = subprocess.run([qemuimg.QEMU_IMG, "bitmap", "--remove", image, bitmap],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"could not remove bitmap {bitmap} from {image}: {proc.stderr.strip()}"
    return None


def saved_xml(cp: libvirt.virDomainCheckpoint) -> str:
    """The checkpoint's XML without <domain>: redefinable even after the domain got a new UUID."""
    return cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)


def redefine(dom: libvirt.virDomain, xml: str) -> None:
    """Reinstate checkpoint metadata from saved XML; validated against the bitmaps when running."""
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        transient_retry(dom.checkpointCreateXML)(xml, flags)
    except libvirt.libvirtError as e:
        if flags & libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE:
            # validation failed after the metadata went in: take it out again
            name = xmlbuild.parse(xml).findtext("name")
            cp = lookup(dom, name) if name else None
            if cp is not None:
                try:
                    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                except libvirt.libvirtError:
                    pass
        raise e


def tracked_disks(xml: str) -> List[str]:
    """Disks whose writes a checkpoint records (its <disk checkpoint='bitmap'> entries)."""
    return [str(d.get("name")) for d in xmlbuild.parse(xml).findall("disks/disk") if d.get("checkpoint", "bitmap") == "bitmap"]
