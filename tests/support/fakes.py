"""A fake domain for planning tests: plan.DomainView answered from plain data (pure logic only;
behaviour against libvirt is tested with real domains)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from virtbackup.virt.bitmaps import Bitmap
from virtbackup.virt.host import Disk


def qcow2(target: str, index: int = 1) -> Disk:
    return Disk(target=target, device="disk", type="file", format="qcow2", source=f"/vm/{target}.qcow2",
                alias=f"virtio-disk{index}", index=index)


def bitmap(name: str, recording: bool = True, inconsistent: bool = False, busy: bool = False) -> Bitmap:
    return Bitmap(name=name, recording=recording, busy=busy, persistent=True, inconsistent=inconsistent,
                  granularity=65536, count=0)


@dataclass
class FakeDomain:
    """Disks, their sizes, libvirt's checkpoints (name -> tracked disks) and the bitmaps per disk."""

    disk_list: List[Disk]
    sizes: Dict[str, int]
    checkpoints: Dict[str, List[str]] = field(default_factory=dict)
    disk_bitmaps: Dict[str, List[Bitmap]] = field(default_factory=dict)
    bitmap_error: Optional[Exception] = None

    def disks(self) -> List[Disk]:
        return list(self.disk_list)

    def disk_size(self, target: str) -> int:
        return self.sizes[target]

    def checkpoint_disks(self, name: str) -> Optional[List[str]]:
        return self.checkpoints.get(name)

    def checkpoint_names(self) -> List[str]:
        return list(self.checkpoints)

    def bitmaps(self, disks: Sequence[Disk]) -> Dict[str, List[Bitmap]]:
        if self.bitmap_error is not None:
            raise self.bitmap_error
        return {d.target: list(self.disk_bitmaps.get(d.target, [])) for d in disks}
