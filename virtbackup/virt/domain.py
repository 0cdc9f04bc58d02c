"""The libvirt implementation of plan.DomainView: what planning reads about a real domain."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import libvirt

from virtbackup.errors import BackupFailed
from virtbackup.virt import bitmaps, checkpoints, host
from virtbackup.virt.bitmaps import Bitmap
from virtbackup.virt.host import Disk


class LibvirtDomain:
    """A libvirt domain seen through the questions backup and repair planning ask."""

    def __init__(self, dom: libvirt.virDomain):
        self.dom = dom

    def disks(self) -> List[Disk]:
        flags = 0 if self.dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE
        return host.domain_disks(self.dom.XMLDesc(flags))

    def disk_size(self, target: str) -> int:
        try:
            return int(host.call(self.dom.blockInfo, target)[0])
        except libvirt.libvirtError:
            # a shut-off domain's network disk: libvirt has no storage backend to ask; say what
            # the backup can't do rather than libvirt's "missing storage backend"
            if not self.dom.isActive():
                for d in self.disks():
                    if d.target == target and d.offline_reason():
                        raise BackupFailed(str(d.offline_reason())) from None
            raise

    def checkpoint_disks(self, name: str) -> Optional[List[str]]:
        cp = checkpoints.lookup(self.dom, name)
        if cp is None:
            return None
        return checkpoints.tracked_disks(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))

    def checkpoint_names(self) -> List[str]:
        return checkpoints.names(self.dom)

    def bitmaps(self, disks: Sequence[Disk]) -> Dict[str, List[Bitmap]]:
        return bitmaps.of_domain(self.dom, disks)


def eligible_disks(dom: libvirt.virDomain) -> List[Disk]:
    """The disks that carry checkpoints' bitmaps (qcow2 disks a backup takes part with)."""
    return [d for d in LibvirtDomain(dom).disks() if d.skip_reason() is None and d.bitmap_reason() is None]
