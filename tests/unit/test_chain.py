"""The chain model: validation, what a future backup needs, atomic save, locks."""

from __future__ import annotations

import json
import os
import stat

import pytest

from virtbackup.errors import ChainCorrupt, LockBusy, OperationFailed, PointNotFound, UnsafePath, UsageError
from virtbackup.store.chain import BackupDir, Chain, DiskImage, FileLock, Point, create_new, shared_lock, user_path
from virtbackup.store.digest import Digest


def img(pid: str, backing: str | None = None) -> DiskImage:
    return DiskImage(image=f"points/{pid}/vda.qcow2", backing=backing, virtual_size=1 << 20, size=1,
                     digest=Digest("blake3", "0" * 64), copied_full=backing is None)


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
    (lambda d: d["points"][1].update(disks={"/../../srv/x": d["points"][1]["disks"]["vda"]}), "disk name"),
    (lambda d: d["points"][1].update(disks={"vda/../x": d["points"][1]["disks"]["vda"]}), "disk name"),
    (lambda d: d["points"][1].update(disks={"": d["points"][1]["disks"]["vda"]}), "disk name"),
    (lambda d: d["points"][1]["disks"]["vda"].update(size="1"), "wrong field types"),
    (lambda d: d["points"][1]["disks"]["vda"].update(image=7), "is corrupt"),
    (lambda d: d.update(schema=True), "unsupported schema version True"),
    (lambda d: d["points"][1]["disks"]["vda"]["digest"].update(algorithm="md5"), "point 0002 disk vda: .*md5"),
    (lambda d: d["points"][1]["disks"]["vda"].pop("digest"), "point 0002 disk vda: no content hash"),
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


def test_deeply_nested_metadata_is_corrupt_not_an_internal_error(tmp_path):
    (tmp_path / "virtbackup.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(ChainCorrupt, match="nested too deeply"):
        BackupDir(tmp_path).load()


def test_symlinked_metadata_and_paths_are_refused(tmp_path):
    bd = BackupDir(tmp_path)
    bd.save(sample())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "0002").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath, match="symlink"):
        bd.resolve("points/0002/vda.qcow2")
    assert bd.resolve("points/0001/vda.qcow2") == tmp_path / "points/0001/vda.qcow2"
    (tmp_path / "real.json").write_text((tmp_path / "virtbackup.json").read_text())
    os.unlink(tmp_path / "virtbackup.json")
    (tmp_path / "virtbackup.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(UnsafePath):
        bd.load()


def test_new_files_are_never_created_through_symlinks(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "target")
    with pytest.raises(UnsafePath):
        create_new(tmp_path / "dangling")
    assert not (tmp_path / "target").exists()
    create_new(tmp_path / "f")
    with pytest.raises(OperationFailed, match="exists"):
        create_new(tmp_path / "f")


def test_empty_paths_are_usage_errors():
    for bad in ("", "  ", None):
        with pytest.raises(UsageError, match="empty"):
            user_path(bad, "BACKUP_DIR")
    assert str(user_path(".", "X")) == "."


def test_lock_file_symlink_is_refused_and_target_untouched(tmp_path):
    (tmp_path / "precious").write_text("precious")
    (tmp_path / "l").symlink_to(tmp_path / "precious")
    for shared in (False, True):
        with pytest.raises(UnsafePath):
            with FileLock(tmp_path / "l", "thing", shared=shared):
                pass
    assert (tmp_path / "precious").read_text() == "precious"


def test_shared_lock_readers_share_and_writer_waits_bounded(tmp_path):
    bd = BackupDir(tmp_path)
    with shared_lock(bd), shared_lock(bd, wait=0):
        with pytest.raises(LockBusy, match="being read|another virtbackup run"):
            with FileLock(tmp_path / ".virtbackup.lock", "dir", wait=0.3):
                pass
    with FileLock(tmp_path / ".virtbackup.lock", "dir"):
        with pytest.raises(LockBusy):
            with shared_lock(bd, wait=0.2):
                pass


def test_shared_lock_never_creates_the_directory(tmp_path):
    """A reader (restore, verify, a drill, files) asked for a missing dir must not create it."""
    from virtbackup.errors import UsageError
    from virtbackup.store.chain import BackupDir, shared_lock
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="does not exist"):
        with shared_lock(BackupDir(missing)):
            pass
    assert not missing.exists()


def test_a_non_empty_dir_without_metadata_is_refused_untouched(tmp_path):
    """Hostile pass D11: points/0001..0012 without virtbackup.json lost one point dir per backup run
    ('left unrecorded by an interrupted run'). Now: exit 2 before anything, nothing touched."""
    import subprocess
    import sys

    from virtbackup.errors import BackupDirError

    bdir = tmp_path / "bk"
    for i in range(1, 13):
        (bdir / "points" / f"{i:04d}").mkdir(parents=True)
        (bdir / "points" / f"{i:04d}" / "vda.qcow2").write_bytes(b"guest data")
    before = sorted(str(p.relative_to(bdir)) for p in bdir.rglob("*"))
    with pytest.raises(BackupDirError, match=r"is not empty \(points\) and holds no virtbackup metadata"):
        BackupDir(bdir).check_usable()
    r = subprocess.run([sys.executable, "-m", "virtbackup.cli", "backup", "no-such-domain", str(bdir)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds no virtbackup metadata" in r.stderr, r
    assert sorted(str(p.relative_to(bdir)) for p in bdir.rglob("*")) == before
    # what our own killed first run leaves, and a fresh filesystem's lost+found, still count as new
    fresh = tmp_path / "fresh"
    (fresh / "logs").mkdir(parents=True)
    (fresh / "lost+found").mkdir()
    (fresh / ".virtbackup.lock").touch()
    assert BackupDir(fresh).check_usable() is False
    assert BackupDir(tmp_path / "new").check_usable() is True
