"""The chain model: validation, what a future backup needs, atomic save, locks."""

from __future__ import annotations

import json
import stat

import pytest

from virtbackup.chain import BackupDir, Chain, DiskImage, FileLock, Point
from virtbackup.errors import ChainCorrupt, LockBusy, PointNotFound


def img(pid: str, backing: str | None = None) -> DiskImage:
    return DiskImage(image=f"points/{pid}/vda.qcow2", backing=backing, virtual_size=1 << 20, size=1,
                     sha256="0" * 64, copied_full=backing is None)


def pt(pid: str, level: str, parent: str | None, chain: str) -> Point:
    backing = f"points/{parent}/vda.qcow2" if parent else None
    return Point(id=pid, level=level, created="2026-01-01T00:00:00+00:00", checkpoint=f"virtbackup-x-{pid}",
                 base_checkpoint=f"virtbackup-x-{parent}" if parent else None, parent=parent, chain=chain,
                 disks={"vda": img(pid, backing)}, domain_xml=f"points/{pid}/domain.xml",
                 checkpoint_xml=f"points/{pid}/checkpoint.xml")


def sample() -> Chain:
    c = Chain(domain_name="d", domain_uuid="u", dir_id="x")
    c.points = [pt("0001", "full", None, "0001"), pt("0002", "inc", "0001", "0001"),
                pt("0003", "diff", "0001", "0001"), pt("0004", "inc", "0003", "0001")]
    c.next_seq = 5
    return c


def test_needed_checkpoints_are_full_and_latest():
    c = sample()
    assert c.needed_checkpoints() == ["virtbackup-x-0001", "virtbackup-x-0004"]
    c.points = c.points[:1]
    assert c.needed_checkpoints() == ["virtbackup-x-0001"]


def test_image_chain_follows_backing():
    c = sample()
    assert c.image_chain(c.point("0004"), "vda") == ["points/0004/vda.qcow2", "points/0003/vda.qcow2",
                                                     "points/0001/vda.qcow2"]
    assert c.point(None).id == "0004" and c.point("latest").id == "0004"
    with pytest.raises(PointNotFound):
        c.point("0099")


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d["points"][1]["disks"]["vda"].update(image="/etc/passwd"), "outside"),
    (lambda d: d["points"][1]["disks"]["vda"].update(backing="points/../../x"), "outside"),
    (lambda d: d["points"][1].update(level="weekly"), "unknown level"),
    (lambda d: d["points"][1].update(parent="0009"), "not an earlier point"),
    (lambda d: d["points"][1]["disks"]["vda"].update(backing="points/0009/vda.qcow2"), "not an earlier image"),
    (lambda d: d.update(schema=99), "schema"),
    (lambda d: d["points"].append(d["points"][0]), "duplicate"),
    (lambda d: d.update(next_seq=1), "next_seq"),
    (lambda d: d["points"][1].update(created="yesterday"), "bad creation time"),
    (lambda d: d["points"][1].update(disks=[]), "is corrupt"),
])
def test_bad_metadata_is_refused(tmp_path, mutate, msg):
    data = sample().to_json()
    mutate(data)
    (tmp_path / "virtbackup.json").write_text(json.dumps(data))
    with pytest.raises(ChainCorrupt, match=msg):
        BackupDir(tmp_path).load()


def test_save_is_atomic_private_and_round_trips(tmp_path):
    bd = BackupDir(tmp_path)
    bd.save(sample())
    assert stat.S_IMODE((tmp_path / "virtbackup.json").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    assert BackupDir(tmp_path).load().to_json() == sample().to_json()


def test_lock_is_exclusive_and_released(tmp_path):
    with FileLock(tmp_path / "l", "thing"):
        with pytest.raises(LockBusy, match="another virtbackup run"):
            with FileLock(tmp_path / "l", "thing"):
                pass
    with FileLock(tmp_path / "l", "thing"):
        pass
