"""Failures leave the chain intact; bad input exits 2 and changes nothing."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

from tests.support.helpers import (
    assert_point_restores,
    checkpoint_names,
    cli,
    guest_data_byte,
    one_error_line,
    our_bitmaps,
    snapshot_dir,
    tmpfs,
)
from virtbackup.store.digest import file_digest

MiB = 1 << 20


def test_enospc_during_incremental_keeps_chain_and_retry_has_every_write(make_domain, tmp_path):
    d = make_domain({"vda": 64 * MiB})
    with tmpfs(tmp_path / "tiny", "6M") as mnt:
        bdir = mnt / "bk"
        d.write("vda", 0x11, 0, 1 * MiB)
        r = cli("backup", d.name, bdir, "--json", "--mode", "push")   # pull's ENOSPC: test_pull.py
        assert r.rc == 0, r
        e1 = d.expected()
        before_files = snapshot_dir(bdir)
        before_cps = checkpoint_names(d.dom)
        prefix = r.json()["point"]["checkpoint"][:-4]
        before_bitmaps = our_bitmaps(d.dom, prefix)

        d.write("vda", 0x22, 8 * MiB, 12 * MiB)        # more than the space left
        r = cli("backup", d.name, bdir, "--level", "inc", "--mode", "push")
        assert r.rc == 1, r
        assert "No space left on device" in one_error_line(r)
        assert snapshot_dir(bdir) == before_files       # metadata and images exactly as before
        assert checkpoint_names(d.dom) == before_cps    # the failed run's checkpoint is gone
        assert our_bitmaps(d.dom, prefix) == before_bitmaps
        assert not list((bdir / "points").glob("*.partial"))

        d.write("vda", 0x33, 30 * MiB, 1 * MiB)        # written after the failure
        subprocess.run(["mount", "-o", "remount,size=64M", str(mnt)], check=True)
        r = cli("backup", d.name, bdir, "--level", "inc", "--json")
        assert r.rc == 0, r
        assert r.json()["point"]["parent"] == "0001"
        assert_point_restores(bdir, r.json()["point"]["id"], d.expected(), tmp_path / "r2")
        assert_point_restores(bdir, "0001", e1, tmp_path / "r1")


def test_unknown_domain_exit_2_and_nothing_created(tmp_path):
    bdir = tmp_path / "bk"
    r = cli("backup", "no-such-domain-xyz", bdir)
    assert r.rc == 2, r
    assert "domain 'no-such-domain-xyz' not found" in one_error_line(r)
    assert not bdir.exists()
    r = cli("backup", "no-such-domain-xyz", bdir, "--json")
    assert r.rc == 2 and r.json()["error"]["exit_code"] == 2


def test_inactive_domain_is_backed_up_without_starting_it(make_domain, tmp_path):
    """A shut-off domain is backed up offline (tests/integration/test_offline.py); libvirt never starts it."""
    d = make_domain({"vda": 16 * MiB}, start=False)
    log = Path(f"/var/log/libvirt/qemu/{d.name}.log")
    r = cli("backup", d.name, tmp_path / "bk", "--json")
    assert r.rc == 0, r
    assert not d.dom.isActive() and not log.exists()
    assert checkpoint_names(d.dom) == [r.json()["point"]["checkpoint"]]


def test_bad_backup_dirs_exit_2_before_libvirt(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    afile = tmp_path / "file"
    afile.write_text("x")
    for target, msg in ((tmp_path / "missing" / "bk", "does not exist"), (afile, "not a directory")):
        r = cli("backup", d.name, target)
        assert r.rc == 2, r
        assert msg in one_error_line(r)
    with tmpfs(tmp_path / "ro", "1M", "ro") as ro:
        r = cli("backup", d.name, ro)
        assert r.rc == 2 and "not writable" in one_error_line(r), r
    for cmd in (("list", tmp_path / "nope"), ("verify", tmp_path / "nope"),
                ("restore", tmp_path / "nope", tmp_path / "out")):
        r = cli(*cmd)
        assert r.rc == 2 and "does not exist" in one_error_line(r), r
    assert checkpoint_names(d.dom) == []


def test_corrupt_metadata_and_unknown_point(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    assert cli("backup", d.name, bdir).rc == 0
    meta = bdir / "virtbackup.json"
    good = meta.read_text()

    r = cli("restore", bdir, tmp_path / "out", "--point", "0042")
    assert r.rc == 2 and "no restore point '0042'" in one_error_line(r), r
    r = cli("restore", bdir, tmp_path / "out", "--disk", "vdz")
    assert r.rc == 2 and "vdz" in one_error_line(r), r
    r = cli("backup", d.name, bdir, "--disk", "vdz")
    assert r.rc == 2 and "domain has no disk 'vdz'" in one_error_line(r), r

    cps = checkpoint_names(d.dom)
    data = json.loads(good)
    data["points"][0]["disks"]["vda"]["image"] = "../../etc/passwd"
    for bad in (good[: len(good) // 2], "[]", json.dumps(data)):
        meta.write_text(bad)
        files = snapshot_dir(bdir)
        for cmd in (("list", bdir), ("backup", d.name, bdir), ("verify", bdir),
                    ("restore", bdir, tmp_path / "out")):
            r = cli(*cmd)
            assert r.rc == 2, (cmd, r)
            assert "corrupt" in one_error_line(r), r
        assert snapshot_dir(bdir) == files
        assert checkpoint_names(d.dom) == cps
    r = cli("list", bdir)
    assert "outside the backup directory" in r.err
    meta.write_text(good)
    assert cli("verify", bdir).rc == 0


def test_backup_dir_of_another_domain_exit_2(make_domain, tmp_path):
    a = make_domain({"vda": 16 * MiB})
    b = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    assert cli("backup", a.name, bdir).rc == 0
    files = snapshot_dir(bdir)
    r = cli("backup", b.name, bdir)
    assert r.rc == 2, r
    assert a.name in one_error_line(r) and a.dom.UUIDString() in r.err
    assert snapshot_dir(bdir) == files and checkpoint_names(b.dom) == []


def test_second_backup_while_locked_fails_at_once(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    assert cli("backup", d.name, bdir).rc == 0
    files = snapshot_dir(bdir)
    with open(bdir / ".virtbackup.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = cli("backup", d.name, bdir, timeout=30)
        assert r.rc == 1 and "another virtbackup run" in one_error_line(r), r
    assert snapshot_dir(bdir) == files
    # the lock of a run that died is gone with it: the next run proceeds
    assert cli("backup", d.name, bdir).rc == 0


def test_verify_names_damaged_image_and_restore_refuses_missing(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    assert cli("backup", d.name, bdir).rc == 0
    d.write("vdb", 0x22, 0, 1 * MiB)
    assert cli("backup", d.name, bdir).rc == 0
    assert cli("verify", bdir).rc == 0
    # new images record a BLAKE3 hash of the final file (b3sum checks it by hand); a record
    # written with SHA-256 (before BLAKE3) still verifies with SHA-256
    meta_path = bdir / "virtbackup.json"
    meta = json.loads(meta_path.read_text())
    rec = meta["points"][1]["disks"]["vdb"]
    assert rec["digest"] == {"algorithm": "blake3", "value": file_digest(bdir / rec["image"], "blake3")}
    if shutil.which("b3sum"):
        out = subprocess.run(["b3sum", "--no-names", str(bdir / rec["image"])], capture_output=True, text=True)
        assert out.stdout.strip() == rec["digest"]["value"]
    rec = meta["points"][0]["disks"]["vda"]
    rec["digest"] = {"algorithm": "sha256", "value": file_digest(bdir / rec["image"], "sha256")}
    meta_path.write_text(json.dumps(meta))
    assert cli("verify", bdir).rc == 0

    # flip one byte of guest data inside the full's vda image (its record: SHA-256)
    img = bdir / "points/0001/vda.qcow2"
    off = guest_data_byte(img)
    with open(img, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    r = cli("verify", bdir, "--json")
    assert r.rc == 1, r
    line = one_error_line(r)
    assert "points/0001/vda.qcow2" in line and "point 0001" in line and "hash (sha256)" in line
    assert r.json()["damaged_points"] == ["0001", "0002"]
    # and in an image recorded with BLAKE3 (point 0002's vdb)
    img = bdir / "points/0002/vdb.qcow2"
    off = guest_data_byte(img)
    with open(img, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))
    r = cli("verify", bdir, "--point", "0002", "--json")
    assert r.rc == 1 and any(x["image"] == "points/0002/vdb.qcow2" and "hash (blake3)" in x["problem"]
                             for x in r.json()["damage"]), r
    r = cli("verify", bdir, "--point", "0002")
    assert r.rc == 1
    # the other disk's chain is fine; verify still names only the damaged image
    assert "vdb" not in one_error_line(r)

    # a missing image: verify and restore say which, exit 1, and restore writes nothing
    (bdir / "points/0001/vdb.qcow2").rename(tmp_path / "moved.qcow2")
    r = cli("verify", bdir, "--point", "0002")
    assert r.rc == 1 and "points/0001/vdb.qcow2" in r.err and "image is missing" in r.err, r
    r = cli("restore", bdir, tmp_path / "out")
    line = one_error_line(r)
    assert r.rc == 1 and "points/0001/vdb.qcow2 (point 0001, disk vdb): image is missing" in line, r
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_restore_never_overwrites(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    assert cli("backup", d.name, bdir).rc == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.qcow2").write_text("precious")
    r = cli("restore", bdir, out)
    assert r.rc == 2 and "exists" in one_error_line(r), r
    assert (out / "vda.qcow2").read_text() == "precious"
