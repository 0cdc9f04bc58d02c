"""libvirt checkpoints that virtbackup owns: lookup, delete, cleanup.

Only checkpoints whose names carry a backup dir's prefix (`virtbackup-<dir_id>-`) are ever
deleted; checkpoints of other tools and of other backup dirs are left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, List, Optional

import libvirt

from virtbackup.errors import VirtBackupError
from virtbackup.qemu import qemu_img
from virtbackup.virt import bitmaps, xmlbuild
from virtbackup.virt.host import call, libvirt_message, transient_retry

log = logging.getLogger(__name__)


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
                try:
                    call(cp.delete, 0)
                except libvirt.libvirtError as e:
                    # libvirt 9.0 refuses the delete for ever ("not found in backing chain") when a
                    # bitmap of it is gone on some disk: QEMU killed before it stored a bitmap made in
                    # that run, or one removed behind libvirt's back. Remove the bitmaps of that name
                    # that are left ourselves, then drop the metadata.
                    if "not found in backing chain" not in libvirt_message(e):
                        raise
                    log.info("checkpoint %s lacks a bitmap on some disk (%s): removing the others "
                             "and its metadata", name, libvirt_message(e))
                    _remove_bitmaps_live(dom, name)
                    call(cp.delete, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            return None
        if cp is not None:
            call(cp.delete, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as e:
        return f"could not delete checkpoint {name}: {libvirt_message(e)}"
    except VirtBackupError as e:
        return f"could not delete checkpoint {name}: {e}"
    warnings = [w for w in (remove_bitmap_offline(src, name) for src in sources) if w]
    return "; ".join(warnings) or None


def _remove_bitmaps_live(dom: libvirt.virDomain, bitmap: str) -> None:
    """Remove bitmap `bitmap` (one of ours) from every disk of a running domain that has it."""
    from virtbackup.virt import host, monitor
    disks = [d for d in host.domain_disks(dom.XMLDesc(0)) if d.node_name]
    for target, bms in bitmaps.live(dom, disks).items():
        if any(b.name == bitmap for b in bms):
            node = next(d.node_name for d in disks if d.target == target)
            monitor.qmp(dom, "block-dirty-bitmap-remove", {"node": node, "name": bitmap})


def remove_bitmap_offline(image: str, bitmap: str) -> Optional[str]:
    """Remove bitmap `bitmap` from an image nobody has open; a warning when it could not."""
    try:
        present = bitmap in bitmaps.header_flags(Path(image))
    except VirtBackupError as e:  # image gone or busy: nothing we can do offline
        return f"could not inspect {image}: {e}"
    if not present:
        return None
    try:
        qemu_img.bitmap_remove(Path(image), bitmap)
    except VirtBackupError as e:
        return str(e)
    return None


def saved_xml(cp: libvirt.virDomainCheckpoint) -> str:
    """The checkpoint's XML without <domain>: redefinable even after the domain got a new UUID."""
    return str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))


def redefine(dom: libvirt.virDomain, xml: str) -> None:
    """Reinstate checkpoint metadata from saved XML; validated against the bitmaps when running."""
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        call(dom.checkpointCreateXML, xml, flags)
    except libvirt.libvirtError as e:
        if flags & libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE:
            # validation failed after the metadata went in: take it out again
            name = xmlbuild.parse(xml).findtext("name")
            cp = lookup(dom, name) if name else None
            if cp is not None:
                try:
                    call(cp.delete, libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                except libvirt.libvirtError:
                    pass
        raise e


def current(dom: libvirt.virDomain) -> Optional[str]:
    """libvirt's current checkpoint, which a new one must name as parent.

    libvirt has no API for it. It is the newest checkpoint created (or redefined) that has not
    been deleted since, and deleting the current one makes its parent current: so it is a leaf,
    and of the leaves the one created last.
    """
    best: Optional[str] = None
    best_time = -1
    for cp in call(dom.listAllCheckpoints, libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES):
        root = xmlbuild.parse(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        created = int(root.findtext("creationTime") or 0)
        if created >= best_time:
            best, best_time = cp.getName(), created
    return best


def tracked_disks(xml: str) -> List[str]:
    """Disks whose writes a checkpoint records (its <disk checkpoint='bitmap'> entries)."""
    return [str(d.get("name")) for d in xmlbuild.parse(xml).findall("disks/disk")
            if d.get("checkpoint", "bitmap") == "bitmap"]
