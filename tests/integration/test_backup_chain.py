"""full -> inc -> inc -> diff -> inc on a real 2-disk domain; every point restored byte for byte."""

from __future__ import annotations

import json

from tests.support.helpers import (
    assert_point_restores,
    checkpoint_names,
    cli,
    finish,
    our_bitmaps,
    start_cli,
    take_backup,
    wait_for,
)
from tests.support.qemu import slow_reads

MiB = 1 << 20
KiB = 1 << 10


backup = take_backup


def test_full_inc_inc_diff_inc_restore_every_point(make_domain, tmp_path):
    d = make_domain({"vda": 64 * MiB, "vdb": 32 * MiB})
    bdir = tmp_path / "backups"
    expected = {}

    # G0: data on both disks
    d.write("vda", 0x11, 0, 1 * MiB)
    d.write("vda", 0x12, 40 * MiB, 256 * KiB)
    d.write("vdb", 0x21, 1 * MiB, 2 * MiB)
    r = backup(d.name, bdir, "full")
    assert r["point"]["level"] == "full" and r["point"]["id"] == "0001"
    expected["0001"] = d.expected()

    # G1: partial overwrite, a zeroed range, a new segment
    d.write("vda", 0x31, 512 * KiB, 1 * MiB)
    d.write("vda", 0, 40 * MiB, 64 * KiB)
    d.write("vdb", 0x41, 30 * MiB, 64 * KiB)
    r = backup(d.name, bdir, "inc")
    assert r["point"]["level"] == "inc" and r["point"]["parent"] == "0001"
    expected["0002"] = d.expected()

    # G2: end of disk, zeroes over old data, a small write inside a cluster
    d.write("vda", 0x51, 63 * MiB, 1 * MiB)
    d.write("vdb", 0, 1 * MiB, 512 * KiB)
    d.write("vdb", 0x52, 0, 4 * KiB)
    r = backup(d.name, bdir, "auto")      # auto continues the chain
    assert r["point"]["level"] == "inc" and r["point"]["parent"] == "0002"
    expected["0003"] = d.expected()
    inc_sizes = {k: v["size"] for k, v in r["point"]["disks"].items()}

    # G3 then a differential: everything since the full, layered directly on the full
    d.write("vda", 0x61, 20 * MiB, 128 * KiB)
    r = backup(d.name, bdir, "diff")
    assert r["point"]["level"] == "diff" and r["point"]["parent"] == "0001"
    assert r["point"]["base_checkpoint"] == r["point"]["checkpoint"].replace("0004", "0001")
    expected["0004"] = d.expected()

    d.write("vdb", 0x71, 16 * MiB, 1 * MiB)
    r = backup(d.name, bdir, "inc")
    assert r["point"]["parent"] == "0004"
    expected["0005"] = d.expected()

    # an incremental holds the changes only, not the disk
    assert inc_sizes["vdb"] < 1 * MiB, inc_sizes

    # list --json follows the contract
    lst = cli("list", bdir, "--json")
    assert lst.rc == 0, lst
    data = lst.json()
    assert data["domain"] == d.name
    assert [p["id"] for p in data["points"]] == ["0001", "0002", "0003", "0004", "0005"]
    assert [p["level"] for p in data["points"]] == ["full", "inc", "inc", "diff", "inc"]
    for p in data["points"]:
        assert set(p["disks"]) == {"vda", "vdb"}
        assert p["created"].endswith("+00:00") and p["checkpoint"].startswith("virtbackup-")
    text = cli("list", bdir)
    assert text.rc == 0 and "0005" in text.out and "diff" in text.out

    # relative backing links, saved XML beside the images
    from virtbackup.qemu import qemu_img
    assert qemu_img.info(bdir / "points/0002/vda.qcow2")["backing-filename"] == "../0001/vda.qcow2"
    assert qemu_img.info(bdir / "points/0004/vdb.qcow2")["backing-filename"] == "../0001/vdb.qcow2"
    assert qemu_img.info(bdir / "points/0001/vda.qcow2").get("backing-filename") is None
    for pid in expected:
        assert "<domaincheckpoint>" in (bdir / f"points/{pid}/checkpoint.xml").read_text()
        assert d.name in (bdir / f"points/{pid}/domain.xml").read_text()

    # only the checkpoints a future backup needs are kept: the full's (diff) and the latest (inc)
    prefix = data["points"][0]["checkpoint"][:-4]
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0001", prefix + "0005"]

    v = cli("verify", bdir)
    assert v.rc == 0, v

    # every point restores to exactly what the guest saw when its backup started
    for pid, exp in expected.items():
        assert_point_restores(bdir, pid, exp, tmp_path / f"restore-{pid}")


def test_eight_incrementals_keep_at_most_two_bitmaps(make_domain, tmp_path):
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    expected = {}
    r = backup(d.name, bdir, "auto")
    prefix = r["point"]["checkpoint"][:-4]
    expected[r["point"]["id"]] = d.expected()
    for i in range(8):
        d.write("vda", 0x20 + i, i * MiB + 4096 * i, 300 * KiB)
        d.write("vdb", 0x40 + i, (15 - i) * MiB, 64 * KiB)
        r = backup(d.name, bdir, "auto")
        assert r["point"]["level"] == "inc"
        expected[r["point"]["id"]] = d.expected()
        for disk, names in our_bitmaps(d.dom, prefix).items():
            assert len(names) <= 2, (disk, names)
        assert len([n for n in checkpoint_names(d.dom) if n.startswith(prefix)]) <= 2
    assert len(expected) == 9
    for pid in ("0001", "0005", "0009"):
        assert_point_restores(bdir, pid, expected[pid], tmp_path / f"r{pid}")
    assert cli("verify", bdir).rc == 0


def test_new_full_starts_new_chain_and_old_points_still_restore(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir, "full")
    e1 = d.expected()
    d.write("vda", 0x22, 2 * MiB, 1 * MiB)
    backup(d.name, bdir, "inc")
    d.write("vda", 0x33, 4 * MiB, 1 * MiB)
    r = backup(d.name, bdir, "full")
    assert r["point"]["chain"] == "0003"
    prefix = r["point"]["checkpoint"][:-4]
    # the old chain's checkpoints are no longer needed: gone from libvirt and from the disk
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0003"]
    assert our_bitmaps(d.dom, prefix) == {"vda": [prefix + "0003"]}
    d.write("vda", 0x44, 6 * MiB, 1 * MiB)
    r = backup(d.name, bdir, "diff")
    assert r["point"]["parent"] == "0003"
    assert_point_restores(bdir, "0001", e1, tmp_path / "r1")
    assert_point_restores(bdir, "0004", d.expected(), tmp_path / "r4")


def test_only_selected_disk_and_json_output(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vdb", 0x5a, 0, 1 * MiB)
    r = cli("backup", d.name, bdir, "--disk", "vdb", "--json")
    assert r.rc == 0, r
    assert set(r.json()["point"]["disks"]) == {"vdb"}
    # the next run with all disks: vda is new since the base point, so it is copied whole
    d.write("vda", 0x6b, 0, 1 * MiB)
    r = cli("backup", d.name, bdir, "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert p["level"] == "inc" and p["disks"]["vda"]["copied_full"] and not p["disks"]["vdb"]["copied_full"]
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")
    json.dumps(p)


def test_a_hot_plugged_raw_disk_is_backed_up_whole_not_skipped(make_domain, tmp_path):
    """D16 (this test said the opposite in 0.2: 'skipping disk vdc: format raw', exit 0): a raw
    disk takes part in every point, copied whole; a cdrom-like device would still be skipped."""
    import libvirt
    d = make_domain({"vda": 16 * MiB})
    raw = tmp_path / "disks" / "extra.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    d.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{raw}'/>"
        "<target dev='vdc' bus='virtio'/></disk>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    d.write("vda", 0x11, 0, 1 * MiB)
    r = cli("backup", d.name, tmp_path / "bk", "--json")
    assert r.rc == 0, r
    assert "skipping disk" not in r.err and r.json()["skipped"] == {}
    assert set(r.json()["point"]["disks"]) == {"vda", "vdc"}
    d.write("vda", 0x12, 2 * MiB, 1 * MiB)
    r = cli("backup", d.name, tmp_path / "bk", "--json")
    assert r.rc == 0 and r.json()["point"]["level"] == "inc", r
    assert r.json()["point"]["disks"]["vdc"]["copied_full"] is True
    assert "disk vdc copied whole: format 'raw' cannot hold a dirty bitmap" in r.err, r
    want = {"vda": d.expected()["vda"], "vdc": bytes(8 * MiB)}
    assert_point_restores(tmp_path / "bk", "0002", want, tmp_path / "r2")


def test_writes_during_the_job_land_in_the_next_point_not_this_one(make_domain, tmp_path):
    """The point in time is the job's start: later writes go to the next incremental."""
    import libvirt

    from virtbackup.virt import monitor
    d = make_domain({"vda": 256 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 192 * MiB)
    before = d.expected()
    # 8 reads of at most 1 MiB a second: the job needs 24 s for the data, however loaded the host
    with slow_reads(d.dom, "vda", iops=8) as lift:
        proc = start_cli("backup", d.name, bdir, "--json", "--mode", "push")
        try:
            job = wait_for("the backup job", lambda: (monitor.qmp(d.dom, "query-block-jobs") or [None])[0])
            assert d.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
            assert job["offset"] < 150 * MiB, f"job too far already ({job['offset']})"
            d.write("vda", 0x22, 150 * MiB, 4 * MiB)     # over data not copied yet
            d.write("vda", 0x33, 250 * MiB, 1 * MiB)     # into a hole
            job = monitor.qmp(d.dom, "query-block-jobs")[0]
            assert job["offset"] < job["len"], "the job ended before the writes"
            lift()
            r = finish(proc, timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert r.rc == 0, r
    assert_point_restores(bdir, "0001", before, tmp_path / "r1")
    r = cli("backup", d.name, bdir, "--level", "inc", "--json")
    assert r.rc == 0, r
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")


def test_relative_backup_and_output_dirs(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x11, 0, 1 * MiB)
    r = cli("backup", d.name, "bk", cwd=tmp_path)
    assert r.rc == 0, r
    d.write("vda", 0x22, 1 * MiB, 1 * MiB)
    assert cli("backup", d.name, "./bk/", cwd=tmp_path).rc == 0
    r = cli("restore", "bk", "out", cwd=tmp_path)
    assert r.rc == 0, r
    assert cli("verify", "bk", cwd=tmp_path).rc == 0
    assert_point_restores(tmp_path / "bk", "0002", d.expected(), tmp_path / "r2")
