"""Backup planning and repair planning against a fake domain (the rules, not libvirt)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from tests.support.fakes import FakeDomain, bitmap, qcow2
from virtbackup.errors import DiskNotFound, HostError, LevelNotPossible, UsageError
from virtbackup.health import plan_repair
from virtbackup.runners.plan import plan_backup
from virtbackup.store.chain import BackupDir, Chain, DiskImage, Point
from virtbackup.virt.host import Disk

MiB = 1 << 20


def chain_with(levels: List[str], disks=("vda",)) -> Chain:
    c = Chain("dom", "uuid", dir_id="abcd1234")
    full = None
    prev = None
    for i, level in enumerate(levels, 1):
        pid = f"{i:04d}"
        full = pid if level == "full" else full
        parent = None if level == "full" else (prev if level == "inc" else full)
        imgs = {d: DiskImage(f"points/{pid}/{d}.qcow2",
                             None if parent is None else f"points/{parent}/{d}.qcow2", 64 * MiB, 1, "x")
                for d in disks}
        c.points.append(Point(pid, level, f"2026-11-30T00:00:0{i}+00:00", c.checkpoint_name(pid),  # type: ignore[arg-type]
                              None if parent is None else c.checkpoint_name(parent), parent, full or pid, imgs,
                              f"points/{pid}/domain.xml", f"points/{pid}/checkpoint.xml"))
        prev = pid
        c.next_seq = i + 1
    return c


def healthy(c: Chain, disks=("vda",)) -> FakeDomain:
    """A domain where libvirt knows every needed checkpoint and its bitmaps are fine."""
    needed = c.needed_checkpoints()
    return FakeDomain([qcow2(d, i) for i, d in enumerate(disks, 1)], {d: 64 * MiB for d in disks},
                      {n: list(disks) for n in needed}, {d: [bitmap(n) for n in needed] for d in disks})


BDIR = BackupDir(Path("/backups/dom"))


def test_first_backup_is_a_full_and_targets_sit_in_the_partial_dir():
    c = Chain("dom", "uuid", dir_id="abcd1234")
    plan = plan_backup(healthy(c), c, BDIR, "auto")
    assert plan.level == "full" and plan.base is None and plan.point_id == "0001"
    assert plan.reason == "new chain: there is no previous backup in this directory"
    (dp,) = plan.disks
    assert dp.mode == "full" and dp.base_bitmap is None and dp.target.backing_link is None
    assert dp.target.path == Path("/backups/dom/points/0001.partial/vda.qcow2")
    assert dp.target.image == "points/0001/vda.qcow2" and dp.target.encryption is None
    assert plan.checkpoint == "virtbackup-abcd1234-0001"


def test_incremental_reads_the_latest_bitmap_and_layers_on_the_latest_image():
    c = chain_with(["full", "inc"])
    plan = plan_backup(healthy(c), c, BDIR, "auto")
    assert plan.level == "inc" and plan.base is not None and plan.base.id == "0002"
    (dp,) = plan.disks
    assert dp.mode == "bitmap" and dp.base_bitmap == c.checkpoint_name("0002")
    assert dp.target.backing == "points/0002/vda.qcow2" and dp.target.backing_link == "../0002/vda.qcow2"


def test_differential_reads_the_fulls_bitmap():
    c = chain_with(["full", "inc"])
    plan = plan_backup(healthy(c), c, BDIR, "diff")
    assert plan.level == "diff" and plan.base is not None and plan.base.id == "0001"
    assert plan.disks[0].base_bitmap == c.checkpoint_name("0001")


@pytest.mark.parametrize("bm, why", [
    (None, "is missing on disk vda"),
    (dict(inconsistent=True), "inconsistent"),
    (dict(recording=False), "not recording"),
    (dict(busy=True), "busy"),
])
def test_a_doubtful_bitmap_never_serves_an_incremental(bm, why):
    c = chain_with(["full", "inc"])
    dom = healthy(c)
    base = c.checkpoint_name("0002")
    dom.disk_bitmaps["vda"] = [b for b in dom.disk_bitmaps["vda"] if b.name != base]
    if bm is not None:
        dom.disk_bitmaps["vda"].append(bitmap(base, **bm))
    with pytest.raises(LevelNotPossible, match=why):
        plan_backup(dom, c, BDIR, "inc")
    plan = plan_backup(dom, c, BDIR, "auto")
    assert plan.level == "full" and why in (plan.reason or "") and plan.reason.startswith("new chain:")


@pytest.mark.parametrize("level", ["auto", "inc", "diff"])
@pytest.mark.parametrize("bm, why", [
    (None, "is missing on disk vdb"),
    (dict(inconsistent=True), "inconsistent"),
    (dict(recording=False), "not recording"),
])
def test_one_disks_unusable_bitmap_copies_only_that_disk_whole(level, bm, why):
    c = chain_with(["full", "inc"], disks=("vda", "vdb"))
    dom = healthy(c, disks=("vda", "vdb"))
    base = c.checkpoint_name("0002" if level != "diff" else "0001")
    dom.disk_bitmaps["vdb"] = [b for b in dom.disk_bitmaps["vdb"] if b.name != base]
    if bm is not None:
        dom.disk_bitmaps["vdb"].append(bitmap(base, **bm))
    plan = plan_backup(dom, c, BDIR, level)  # type: ignore[arg-type]
    assert plan.level == ("inc" if level == "auto" else level) and plan.reason is None
    modes = {dp.disk.target: dp for dp in plan.disks}
    assert modes["vda"].mode == "bitmap" and modes["vda"].base_bitmap == base
    assert modes["vdb"].mode == "full" and why in (modes["vdb"].why_full or "")
    assert modes["vdb"].target.backing is None and modes["vdb"].base_bitmap is None


def test_every_disks_bitmap_unusable_means_a_new_chain_naming_each():
    c = chain_with(["full", "inc"], disks=("vda", "vdb"))
    dom = healthy(c, disks=("vda", "vdb"))
    base = c.checkpoint_name("0002")
    dom.disk_bitmaps["vda"] = [b for b in dom.disk_bitmaps["vda"] if b.name != base]
    dom.disk_bitmaps["vdb"] = [bitmap(base, inconsistent=True) if b.name == base else b
                               for b in dom.disk_bitmaps["vdb"]]
    with pytest.raises(LevelNotPossible, match="missing on disk vda.*vdb is inconsistent"):
        plan_backup(dom, c, BDIR, "inc")
    plan = plan_backup(dom, c, BDIR, "auto")
    assert plan.level == "full" and "vda" in (plan.reason or "") and "vdb" in (plan.reason or "")


def test_unknown_checkpoint_or_uninspectable_bitmaps_mean_a_full():
    c = chain_with(["full"])
    dom = healthy(c)
    dom.checkpoints.clear()
    assert "is not known to libvirt" in (plan_backup(dom, c, BDIR, "auto").reason or "")
    dom = healthy(c)
    dom.bitmap_error = HostError("QMP query-named-block-nodes failed: gone")
    assert "cannot inspect bitmaps" in (plan_backup(dom, c, BDIR, "auto").reason or "")


def test_new_resized_and_untracked_disks_are_copied_whole_inside_an_incremental():
    c = chain_with(["full"], disks=("vda", "vdb", "vdc"))
    dom = healthy(c, disks=("vda", "vdb", "vdc"))
    dom.disk_list.append(qcow2("vdd", 4))
    dom.sizes["vdd"] = 8 * MiB
    dom.sizes["vdb"] = 128 * MiB                            # resized
    dom.checkpoints[c.checkpoint_name("0001")] = ["vda", "vdb"]   # vdc not tracked
    plan = plan_backup(dom, c, BDIR, "inc")
    modes = {dp.disk.target: (dp.mode, dp.why_full) for dp in plan.disks}
    assert modes["vda"] == ("bitmap", None)
    assert modes["vdb"][0] == "full" and "resized" in (modes["vdb"][1] or "")
    assert modes["vdc"][0] == "full" and "does not track" in (modes["vdc"][1] or "")
    assert modes["vdd"] == ("full", "disk is new since the base point")
    assert all(dp.target.backing is None for dp in plan.disks if dp.mode == "full")


def test_disk_selection_and_skipped_disks():
    c = Chain("dom", "uuid")
    raw = Disk("vdb", "disk", "file", "raw", "/vm/b.raw", "virtio-disk1", 2)
    cdrom = Disk("sda", "cdrom", "file", "raw", None, "sata0-0-0", None)
    dom = FakeDomain([qcow2("vda"), raw, cdrom], {"vda": MiB, "vdb": MiB, "sda": 0})
    plan = plan_backup(dom, c, BDIR, "full")
    # D16: a raw disk is never left out (it used to be skipped: "format 'raw'"); only the cdrom is
    assert [dp.disk.target for dp in plan.disks] == ["vda", "vdb"]
    assert set(plan.skipped) == {"sda"} and "cdrom" in plan.skipped["sda"]
    assert [dp.tracks for dp in plan.disks] == [True, False]
    assert "cannot hold a dirty bitmap" in (plan.disks[1].why_full or "")
    with pytest.raises(DiskNotFound):
        plan_backup(dom, c, BDIR, "full", only=["vdz"])
    with pytest.raises(UsageError, match="disk sda cannot be backed up: device type 'cdrom'"):
        plan_backup(dom, c, BDIR, "full", only=["sda"])
    with pytest.raises(UsageError, match="unknown level"):
        plan_backup(dom, c, BDIR, "weekly")  # type: ignore[arg-type]


# --- repair planning ----------------------------------------------------------------------------
def kinds(actions) -> List[tuple]:
    return [(a.kind, a.name) + ((a.disk,) if a.disk else ()) for a in actions]


def test_repair_of_a_healthy_chain_does_nothing():
    c = chain_with(["full", "inc", "inc"])
    assert plan_repair(healthy(c), c) == []


def test_repair_deletes_unneeded_and_broken_checkpoints_and_orphans_only_of_this_dir():
    c = chain_with(["full", "inc", "inc"])
    dom = healthy(c)
    old = c.checkpoint_name("0002")                 # no longer needed
    dom.checkpoints[old] = ["vda"]
    dom.checkpoints["someone-elses"] = ["vda"]
    dom.disk_bitmaps["vda"] += [bitmap(old), bitmap("someone-elses"), bitmap("virtbackup-abcd1234-0009")]
    latest = c.checkpoint_name("0003")
    dom.disk_bitmaps["vda"] = [b for b in dom.disk_bitmaps["vda"] if b.name != latest] + [
        bitmap(latest, inconsistent=True)]
    actions = plan_repair(dom, c)
    assert kinds(actions) == [
        ("delete-checkpoint", old),
        ("delete-checkpoint", latest),
        ("remove-bitmap", "virtbackup-abcd1234-0009", "vda"),
    ]
    assert "inconsistent" in actions[1].reason
    # a backup's own cleanup keeps broken needed checkpoints (planning reports them)
    assert ("delete-checkpoint", latest) not in kinds(plan_repair(dom, c, fix_broken=False))


def test_repair_keeps_a_needed_checkpoint_broken_on_some_disks_only():
    c = chain_with(["full", "inc"], disks=("vda", "vdb"))
    dom = healthy(c, disks=("vda", "vdb"))
    full = c.checkpoint_name("0001")
    dom.disk_bitmaps["vdb"] = [b for b in dom.disk_bitmaps["vdb"] if b.name != full]
    assert plan_repair(dom, c) == []                # it still serves vda's differentials
    dom.disk_bitmaps["vda"] = [bitmap(full, inconsistent=True) if b.name == full else b
                               for b in dom.disk_bitmaps["vda"]]
    assert kinds(plan_repair(dom, c)) == [("delete-checkpoint", full)]   # now it serves no disk


def test_repair_redefines_lost_checkpoints_parent_first_when_bitmaps_are_intact():
    c = chain_with(["full", "inc"])
    dom = healthy(c)
    dom.checkpoints.clear()                          # libvirt lost its metadata
    actions = plan_repair(dom, c)
    assert kinds(actions) == [("redefine-checkpoint", c.checkpoint_name("0001")),
                              ("redefine-checkpoint", c.checkpoint_name("0002"))]
    assert actions[0].parent is None and actions[1].parent == c.checkpoint_name("0001")
    # a lost checkpoint whose bitmap is gone is not redefined; its orphan-free state stays
    dom.disk_bitmaps["vda"] = [bitmap(c.checkpoint_name("0001"))]
    assert kinds(plan_repair(dom, c)) == [("redefine-checkpoint", c.checkpoint_name("0001"))]


@pytest.mark.parametrize("kind, fmt, source", [("file", "raw", "/vm/vda.raw"), ("block", "raw", "/dev/vg0/sys"),
                                               ("network", "raw", "rbd/sys"), ("network", None, None),
                                               ("volume", "raw", "pool-vol")])
def test_a_disk_without_bitmaps_is_copied_whole_in_every_point_of_a_mixed_chain(kind, fmt, source):
    """D16: a raw/block/network system disk beside a qcow2 data disk: every point holds it whole
    (recorded with why), the qcow2 disk continues from its bitmap; the checkpoint tracks only it."""
    c = chain_with(["full", "inc"], disks=("vda", "vdb"))
    dom = healthy(c, disks=("vda", "vdb"))
    dom.disk_list[0] = Disk("vda", "disk", kind, fmt, source, "virtio-disk0", 1)
    for cp in dom.checkpoints:
        dom.checkpoints[cp] = ["vdb"]          # checkpoint='no' on vda
    dom.disk_bitmaps["vda"] = []
    plan = plan_backup(dom, c, BDIR, "auto")
    assert plan.level == "inc" and not plan.skipped
    modes = {dp.disk.target: (dp.mode, dp.tracks, dp.why_full, dp.target.backing) for dp in plan.disks}
    assert modes["vda"][:2] == ("full", False) and "cannot hold a dirty bitmap" in modes["vda"][2]
    assert modes["vda"][3] is None
    assert modes["vdb"] == ("bitmap", True, None, "points/0002/vdb.qcow2")


def test_a_domain_whose_disks_all_lack_bitmaps_gets_fulls_and_says_why():
    c = chain_with(["full"], disks=("vda",))
    dom = FakeDomain([Disk("vda", "disk", "file", "raw", "/vm/vda.raw", "virtio-disk0", 1)], {"vda": 64 * MiB},
                     {n: [] for n in c.needed_checkpoints()}, {})
    plan = plan_backup(dom, c, BDIR, "auto")
    assert plan.level == "full" and "no disk of the domain can hold a dirty bitmap (vda: format 'raw')" in plan.reason
    with pytest.raises(LevelNotPossible, match="cannot take an incremental backup: no disk .* dirty bitmap"):
        plan_backup(dom, c, BDIR, "inc")
