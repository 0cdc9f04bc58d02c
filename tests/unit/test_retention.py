"""Retention decisions and prune plans on fake chains (no libvirt, no images), and point selection."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from virtbackup.errors import PointNotFound, UsageError
from virtbackup.store import chain as chainmod
from virtbackup.store.chain import Chain, DiskImage, Point
from virtbackup.store.digest import Digest
from virtbackup.store.retention import Decision, Policy, decide, plan_prune, unrecorded

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)


def make_chain(spec: Sequence[Tuple[str, Optional[int]]], disks: Sequence[str] = ("vda",),
               times: Optional[List[datetime]] = None) -> Chain:
    """spec: (level, index of the parent in spec or None) per point; ids 0001, 0002, ..."""
    c = Chain(domain_name="d", domain_uuid="u", dir_id="abcd1234")
    for i, (level, parent) in enumerate(spec):
        pid = f"{i + 1:04d}"
        par = c.points[parent] if parent is not None else None
        when = times[i] if times else T0 + timedelta(hours=i)
        imgs: Dict[str, DiskImage] = {}
        for d in disks:
            imgs[d] = DiskImage(image=f"points/{pid}/{d}.qcow2", backing=par.disks[d].image if par else None,
                                virtual_size=1 << 24, size=1000,
                                digest=Digest("blake3", f"{pid}{d}".encode().hex().ljust(64, "0")),
                                copied_full=par is None)
        c.points.append(Point(
            id=pid, level=level, created=when.isoformat(), checkpoint=c.checkpoint_name(pid),
            base_checkpoint=par.checkpoint if par else None, parent=par.id if par else None,
            chain=pid if level == "full" else par.chain,  # type: ignore[union-attr]
            disks=imgs, domain_xml=f"points/{pid}/domain.xml", checkpoint_xml=f"points/{pid}/checkpoint.xml"))
        c.next_seq = i + 2
    c.validate()
    return c


def keep_ids(c: Chain, ids: Sequence[str]) -> List[Decision]:
    return [Decision(p.id, p.id in ids, ["test"]) for p in c.points]


def by_id(c: Chain) -> Dict[str, Point]:
    return {p.id: p for p in c.points}


# --- decide ---------------------------------------------------------------------------------
def test_keep_newest_n_with_reasons():
    c = make_chain([("full", None)] + [("inc", i) for i in range(9)])
    ds = decide(c.points, Policy(keep=3))
    assert [d.point for d in ds if d.keep] == ["0008", "0009", "0010"]
    assert all(d.reasons for d in ds)
    assert "--keep 3" in ds[-1].reasons[0]
    assert ds[0].reasons == ["not selected by any --keep rule"]


def test_keep_more_than_there_are_keeps_all():
    c = make_chain([("full", None), ("inc", 0)])
    assert all(d.keep for d in decide(c.points, Policy(keep=5)))


def test_daily_and_weekly_keep_newest_of_each_period():
    times = [datetime(2026, 11, d, h, tzinfo=timezone.utc) for d, h in
             [(16, 9), (16, 18), (17, 9), (23, 8), (23, 20), (24, 1), (24, 12)]]
    c = make_chain([("full", None)] + [("inc", i) for i in range(6)], times=times)
    daily = decide(c.points, Policy(keep_daily=2))
    assert [d.point for d in daily if d.keep] == ["0005", "0007"]     # newest of 11-24 and of 11-23
    assert any("day 2026-11-23" in r for r in daily[4].reasons)
    weekly = decide(c.points, Policy(keep_weekly=2))
    # ISO weeks: 16th is a Monday (W47), 23rd and 24th are in W48
    assert [d.point for d in weekly if d.keep] == ["0003", "0007"]
    both = decide(c.points, Policy(keep=1, keep_daily=1, keep_weekly=2))
    assert len(both[-1].reasons) == 3


def test_newest_is_always_kept_and_empty_policy_refused():
    c = make_chain([("full", None), ("inc", 0)], times=[T0, T0 - timedelta(days=30)])
    ds = decide(c.points, Policy(keep_weekly=1))
    assert ds[-1].keep
    with pytest.raises(UsageError):
        decide(c.points, Policy())
    with pytest.raises(UsageError):
        decide(c.points, Policy(keep=-1))


# --- plan_prune -------------------------------------------------------------------------------
def test_linear_chain_oldest_kept_becomes_new_base():
    c = make_chain([("full", None)] + [("inc", i) for i in range(9)], disks=("vda", "vdb"))
    plan = plan_prune(c, decide(c.points, Policy(keep=3)))
    assert plan.drop == [f"{i:04d}" for i in range(1, 8)]
    acts = {(o.point, o.disk): (o.action, o.new, o.backing) for o in plan.ops}
    assert acts[("0008", "vda")] == ("standalone", "points/0008/vda.1.qcow2", None)
    assert acts[("0009", "vda")] == ("relink", "points/0009/vda.1.qcow2", "points/0008/vda.1.qcow2")
    assert acts[("0010", "vdb")] == ("relink", "points/0010/vdb.1.qcow2", "points/0009/vdb.1.qcow2")
    p = by_id(plan.new_chain)
    assert list(p) == ["0008", "0009", "0010"]
    assert p["0008"].level == "full" and p["0008"].parent is None and p["0008"].chain == "0008"
    # the new base takes over the dropped full's checkpoint: the one differentials count from
    assert p["0008"].checkpoint == c.points[0].checkpoint
    assert plan.xml_copies == [("points/0001/checkpoint.xml", "points/0008/checkpoint-0001.xml")]
    assert p["0008"].checkpoint_xml == "points/0008/checkpoint-0001.xml"
    assert p["0009"].chain == p["0010"].chain == "0008" and p["0009"].parent == "0008"
    assert p["0008"].disks["vda"].copied_full and not p["0009"].disks["vda"].copied_full
    assert plan.new_chain.needed_checkpoints() == c.needed_checkpoints()
    assert plan.new_chain.next_seq == c.next_seq and plan.new_chain.dir_id == c.dir_id


def test_diff_on_dropped_full_is_merged_onto_new_base():
    # 1 full, 2 inc, 3 inc, 4 diff(1), 5 inc(4), 6 diff(1), 7 inc(6)
    c = make_chain([("full", None), ("inc", 0), ("inc", 1), ("diff", 0), ("inc", 3), ("diff", 0), ("inc", 5)])
    plan = plan_prune(c, keep_ids(c, ["0003", "0006", "0007"]))
    acts = {o.point: (o.action, o.backing) for o in plan.ops}
    assert acts == {"0003": ("standalone", None),
                    "0006": ("rebase", "points/0003/vda.1.qcow2"),
                    "0007": ("relink", "points/0006/vda.1.qcow2")}
    p = by_id(plan.new_chain)
    assert p["0006"].parent == "0003" and p["0006"].level == "diff" and p["0006"].chain == "0003"
    # the diff counted changes since the old full's checkpoint, which the new base now carries
    assert p["0006"].base_checkpoint == p["0003"].checkpoint


def test_gap_in_kept_points_rebases_onto_nearest_kept_ancestor():
    c = make_chain([("full", None), ("inc", 0), ("inc", 1), ("inc", 2), ("inc", 3)])
    plan = plan_prune(c, keep_ids(c, ["0001", "0003", "0005"]))
    acts = {o.point: (o.action, o.backing) for o in plan.ops}
    assert acts == {"0003": ("rebase", "points/0001/vda.qcow2"), "0005": ("rebase", "points/0003/vda.1.qcow2")}
    p = by_id(plan.new_chain)
    assert p["0001"].level == "full" and p["0001"].checkpoint == c.points[0].checkpoint
    assert p["0003"].parent == "0001" and p["0005"].parent == "0003" and p["0005"].chain == "0001"
    assert not plan.xml_copies


def test_old_chain_dropped_whole_and_nothing_to_merge():
    c = make_chain([("full", None), ("inc", 0), ("full", None), ("inc", 2)])
    plan = plan_prune(c, decide(c.points, Policy(keep=2)))
    assert plan.drop == ["0001", "0002"] and plan.ops == [] and not plan.xml_copies
    assert [p.id for p in plan.new_chain.points] == ["0003", "0004"]


def test_keep_spanning_two_chains():
    c = make_chain([("full", None), ("inc", 0), ("inc", 1), ("full", None), ("diff", 3)])
    plan = plan_prune(c, decide(c.points, Policy(keep=3)))
    assert [(o.point, o.action) for o in plan.ops] == [("0003", "standalone")]
    p = by_id(plan.new_chain)
    assert p["0003"].level == "full" and p["0004"].chain == "0004" and p["0005"].parent == "0004"
    assert plan.new_chain.needed_checkpoints() == c.needed_checkpoints()


def test_repeated_prune_names_next_generation():
    c = make_chain([("full", None)] + [("inc", i) for i in range(5)])
    once = plan_prune(c, decide(c.points, Policy(keep=4))).new_chain
    twice = plan_prune(once, decide(once.points, Policy(keep=2)))
    assert {o.point: o.new for o in twice.ops} == {"0005": "points/0005/vda.2.qcow2",
                                                   "0006": "points/0006/vda.2.qcow2"}
    assert twice.new_chain.points[0].checkpoint == c.points[0].checkpoint
    assert twice.new_chain.points[0].checkpoint_xml == "points/0005/checkpoint-0003.xml"


def test_plan_refuses_dropping_the_newest():
    c = make_chain([("full", None), ("inc", 0)])
    with pytest.raises(UsageError):
        plan_prune(c, keep_ids(c, ["0001"]))


def test_unrecorded_finds_only_what_a_prune_leaves(tmp_path: Path):
    from virtbackup.store.chain import BackupDir
    c = make_chain([("full", None), ("inc", 0)])
    c.next_seq = 4
    for rel in ["points/0001/vda.qcow2", "points/0001/domain.xml", "points/0001/checkpoint.xml",
                "points/0002/vda.qcow2", "points/0002/domain.xml", "points/0002/checkpoint.xml",
                "points/0002/vda.1.qcow2", "points/0002/checkpoint-0000.xml", "points/0002/notes.txt",
                "points/0000/vda.qcow2", "points/0003/vda.qcow2", "points/0004.partial/vda.qcow2"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    got = sorted(str(p.relative_to(tmp_path)) for p in unrecorded(BackupDir(tmp_path), c))
    # 0003 is below next_seq and not recorded; a backup's 0004.partial and user files stay
    assert got == ["points/0000", "points/0002/checkpoint-0000.xml", "points/0002/vda.1.qcow2", "points/0003"]


# --- point selection by time -------------------------------------------------------------------
def test_point_by_time():
    c = make_chain([("full", None), ("inc", 0), ("inc", 1)])       # 10:00, 11:00, 12:00 UTC
    assert c.point("2026-11-20T11:30:00Z").id == "0002"
    assert c.point("2026-11-20T11:00:00+00:00").id == "0002"          # at or before: equal counts
    assert c.point("2026-11-20T13:30:00+02:00").id == "0002"          # 11:30 UTC
    assert c.point("2026-11-20T12:00:00").id == "0003"                # naive = UTC
    assert c.point("2026-11-21").id == "0003"                         # a date: its 00:00 UTC
    assert c.point("latest").id == "0003" and c.point("0001").id == "0001"
    with pytest.raises(PointNotFound, match="at or before"):
        c.point("2026-11-20T09:59:59Z")
    with pytest.raises(PointNotFound, match="no restore point '0009'"):
        c.point("0009")
    with pytest.raises(PointNotFound):
        c.point("yesterday")
    assert chainmod.parse_point_time("0002") is None


def test_a_new_base_takes_over_the_dropped_fulls_checkpoint_xml_digest():
    """D9: the copied checkpoint XML keeps the digest of the file it is a byte copy of; the domain
    XML (not copied) keeps its own."""
    c = make_chain([("full", None)] + [("inc", i) for i in range(4)])
    for p in c.points:
        p.domain_xml_digest = Digest("blake3", f"d{p.id}".encode().hex().ljust(64, "0"))
        p.checkpoint_xml_digest = Digest("blake3", f"c{p.id}".encode().hex().ljust(64, "0"))
    plan = plan_prune(c, decide(c.points, Policy(keep=2)))
    p = by_id(plan.new_chain)
    assert plan.xml_copies == [("points/0001/checkpoint.xml", "points/0004/checkpoint-0001.xml")]
    assert p["0004"].checkpoint_xml_digest == c.points[0].checkpoint_xml_digest
    assert p["0004"].domain_xml_digest == c.points[3].domain_xml_digest
    assert p["0005"].checkpoint_xml_digest == c.points[4].checkpoint_xml_digest
