"""Chain health: lost checkpoint metadata, crashes, foreign checkpoints, two dirs, changing disks,
status and repair. Every restore is checked byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import libvirt

from tests.support.helpers import assert_point_restores, checkpoint_names, cli, our_bitmaps, snapshot_dir, take_backup

MiB = 1 << 20


def backup(name, bdir, level="auto"):
    return take_backup(name, bdir, level)["point"]


def clean_stop(dom) -> None:
    """Stop QEMU cleanly (no OS to shut down), so that it stores the persistent bitmaps."""
    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)


def test_checkpoint_metadata_lost_then_redefined_and_chain_continues(make_domain, tmp_path, conn):
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 2 * MiB)
    backup(d.name, bdir)
    d.write("vdb", 0x22, 1 * MiB, 1 * MiB)
    p2 = backup(d.name, bdir)
    prefix = p2["checkpoint"][:-4]

    # clean stop (QMP quit stores the bitmaps), then libvirt forgets the domain's checkpoints:
    # undefine --checkpoints-metadata and define again; the bitmaps stay in the images
    clean_stop(d.dom)
    xml = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    d.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    d.dom = conn.defineXML(xml)
    assert checkpoint_names(d.dom) == []
    d.dom.create()
    for disk in ("vda", "vdb"):
        assert sorted(our_bitmaps(d.dom, prefix)[disk]) == [prefix + "0001", prefix + "0002"]

    d.write("vda", 0x33, 8 * MiB, 1 * MiB)
    r = cli("backup", d.name, bdir, "--level", "inc", "--json")
    assert r.rc == 0, r
    assert "redefine-checkpoint" in r.err
    p3 = r.json()["point"]
    assert p3["level"] == "inc" and p3["parent"] == "0002"
    assert_point_restores(bdir, "0003", d.expected(), tmp_path / "r3")
    # the differential base (the full's checkpoint) was redefined too
    d.write("vdb", 0x44, 4 * MiB, 1 * MiB)
    p4 = backup(d.name, bdir, "diff")
    assert p4["parent"] == "0001"
    assert_point_restores(bdir, "0004", d.expected(), tmp_path / "r4")


def test_metadata_and_bitmaps_lost_inc_refuses_auto_starts_new_chain(make_domain, tmp_path):
    from virtbackup.virt import monitor
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    p1 = backup(d.name, bdir)
    cp = d.dom.checkpointLookupByName(p1["checkpoint"])
    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    monitor.qmp(d.dom, "block-dirty-bitmap-remove", {"node": "libvirt-1-format", "name": p1["checkpoint"]})
    d.write("vda", 0x22, 2 * MiB, 1 * MiB)
    files = snapshot_dir(bdir)
    r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 2, r
    assert "cannot take an incremental backup" in r.err and "not known to libvirt" in r.err
    assert snapshot_dir(bdir) == files
    p2 = backup(d.name, bdir, "auto")
    assert p2["level"] == "full" and "new chain" in p2["reason"]
    lst = cli("list", bdir)
    assert "new chain" in lst.out
    assert_point_restores(bdir, p2["id"], d.expected(), tmp_path / "r2")


def test_qemu_killed_inc_refused_auto_full_and_broken_bitmaps_cleaned(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir)
    d.write("vdb", 0x22, 0, 1 * MiB)
    p2 = backup(d.name, bdir)
    prefix = p2["checkpoint"][:-4]
    # QEMU writes bitmaps created during a run only when it closes the image; a bitmap loaded
    # from the image is flagged in-use while open. Restart cleanly so the crash finds them stored.
    clean_stop(d.dom)
    d.dom.create()
    d.write("vda", 0x33, 4 * MiB, 1 * MiB)     # written, then the VM crashes
    pid = int(open(f"/run/libvirt/qemu/{d.name}.pid").read())
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not d.dom.isActive():
            break
        time.sleep(0.05)
    d.dom.create()
    r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 2, r
    assert "inconsistent" in r.err and r.err.count("virtbackup: error:") == 1
    p3 = backup(d.name, bdir, "auto")
    assert p3["level"] == "full" and "inconsistent" in p3["reason"]
    # the crashed chain's checkpoints and bitmaps are gone; only the new full's remain
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [p3["checkpoint"]]
    assert our_bitmaps(d.dom, prefix) == {"vda": [p3["checkpoint"]], "vdb": [p3["checkpoint"]]}
    assert_point_restores(bdir, p3["id"], d.expected(), tmp_path / "r3")
    d.write("vdb", 0x44, 8 * MiB, 1 * MiB)
    p4 = backup(d.name, bdir, "inc")
    assert_point_restores(bdir, p4["id"], d.expected(), tmp_path / "r4")


def test_foreign_checkpoint_untouched_and_two_dirs_alternate(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    subprocess.run(["virsh", "checkpoint-create-as", d.name, "someone-elses"], check=True, capture_output=True)
    daily, weekly = tmp_path / "daily", tmp_path / "weekly"
    expected = {}
    for i in range(6):
        d.write("vda", 0x10 + i, i * MiB, 512 * 1024)
        bdir = daily if i % 2 == 0 else weekly
        p = backup(d.name, bdir)
        expected[(bdir, p["id"])] = d.expected()
        assert p["level"] == ("full" if i < 2 else "inc")
        names = checkpoint_names(d.dom)
        assert "someone-elses" in names
        for b in (daily, weekly):
            if (b / "virtbackup.json").exists():
                prefix = cli("list", b, "--json").json()["points"][0]["checkpoint"][:-4]
                assert 1 <= len([n for n in names if n.startswith(prefix)]) <= 2
    from virtbackup.virt import bitmaps as bitmap_layer
    from virtbackup.virt.domain import LibvirtDomain, eligible_disks
    bitmaps = LibvirtDomain(d.dom).bitmaps(eligible_disks(d.dom))["vda"]
    assert bitmaps == bitmap_layer.of_domain(d.dom, eligible_disks(d.dom))["vda"]
    foreign = next(b for b in bitmaps if b.name == "someone-elses")
    assert foreign.recording and not foreign.inconsistent
    for b in (daily, weekly):
        r = cli("repair", d.name, b)
        assert r.rc == 0 and "nothing to repair" in r.out, r
    assert "someone-elses" in checkpoint_names(d.dom)
    for (b, pid), exp in expected.items():
        assert_point_restores(b, pid, exp, tmp_path / f"r-{b.name}-{pid}")


def test_disk_resized_and_disk_attached_between_points(make_domain, tmp_path, conn):
    from tests.support import scratch
    from virtbackup.qemu import qemu_img
    d = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    d.write("vdb", 0x22, 15 * MiB, 1 * MiB)
    backup(d.name, bdir)
    e1 = d.expected()

    # grow vdb and write past its old end; attach a new disk vdc
    d.dom.blockResize("vdb", 24 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    d.models["vdb"].data.extend(bytes(8 * MiB))
    d.write("vdb", 0x33, 20 * MiB, 1 * MiB)
    vdc = tmp_path / "disks" / f"{d.name}-vdc.qcow2"
    qemu_img.create(vdc, 8 * MiB)
    d.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vdc}'/>"
        "<target dev='vdc' bus='virtio'/></disk>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    d.disk_sizes["vdc"] = 8 * MiB
    d.models["vdc"] = scratch.DiskModel(8 * MiB)
    d.write("vdc", 0x44, 1 * MiB, 1 * MiB)
    d.write("vda", 0x55, 2 * MiB, 1 * MiB)
    r = cli("backup", d.name, bdir, "--json")
    assert r.rc == 0, r
    p2 = r.json()["point"]
    assert p2["level"] == "inc"
    assert p2["disks"]["vdc"]["copied_full"] and p2["disks"]["vdb"]["copied_full"]
    assert not p2["disks"]["vda"]["copied_full"]
    assert "resized" in r.err and "new since" in r.err
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")
    assert qemu_img.info(tmp_path / "r2" / "vdb.qcow2")["virtual-size"] == 24 * MiB

    # vdc was attached to the live domain only: after a clean restart it is gone (hot-unplug
    # needs a guest OS); the chain continues for the remaining disks
    clean_stop(d.dom)
    d.dom.create()
    assert "vdc" not in d.dom.XMLDesc(0)
    del d.models["vdc"]
    d.write("vdb", 0x66, 22 * MiB, 1 * MiB)
    p3 = backup(d.name, bdir)
    assert p3["level"] == "inc" and set(p3["disks"]) == {"vda", "vdb"}
    assert not p3["disks"]["vdb"]["copied_full"]
    assert_point_restores(bdir, "0003", d.expected(), tmp_path / "r3")
    assert_point_restores(bdir, "0001", e1, tmp_path / "r1")


def test_status_matches_query_block_and_repair_fixes_orphan(make_domain, tmp_path):
    from virtbackup.virt import monitor
    d = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    subprocess.run(["virsh", "checkpoint-create-as", d.name, "foreign-cp"], check=True, capture_output=True)
    backup(d.name, bdir)
    d.write("vda", 0x11, 0, 3 * MiB)
    p2 = backup(d.name, bdir)
    d.write("vda", 0x12, 8 * MiB, 1 * MiB)
    prefix = p2["checkpoint"][:-4]

    st = cli("status", d.name, "--json")
    assert st.rc == 0, st
    st = st.json()
    raw = {n["node-name"]: n.get("dirty-bitmaps", [])
           for n in monitor.qmp(d.dom, "query-named-block-nodes", {"flat": True})}
    from virtbackup.virt import host
    for disk in host.domain_disks(d.dom.XMLDesc(0)):
        want = {b["name"]: (b["count"], b["recording"], b["busy"]) for b in raw[disk.node_name]}
        got = {b["name"]: (b["count"], b["recording"], b["busy"]) for b in st["disks"][disk.target]["bitmaps"]}
        assert got == want
        for b in st["disks"][disk.target]["bitmaps"]:
            assert b["owner"] == ("foreign" if b["name"] == "foreign-cp" else "virtbackup")
            if b["owner"] == "virtbackup":
                assert b["backup_dir"] == str(bdir)
    assert next(b for b in st["disks"]["vda"]["bitmaps"] if b["name"] == p2["checkpoint"])["count"] == 1 * MiB
    assert "foreign" in cli("status", d.name).out

    # plant an orphan bitmap of this dir (as an interrupted run whose checkpoint is gone would leave)
    orphan = prefix + "0042"
    monitor.qmp(d.dom, "block-dirty-bitmap-add", {"node": "libvirt-1-format", "name": orphan, "persistent": True})
    cps = checkpoint_names(d.dom)
    r = cli("repair", d.name, bdir, "--dry-run", "--json")
    assert r.rc == 0, r
    acts = r.json()["actions"]
    assert [(a["kind"], a["name"]) for a in acts] == [("remove-bitmap", orphan)]
    assert orphan in our_bitmaps(d.dom, prefix)["vdb"] + our_bitmaps(d.dom, prefix)["vda"]
    assert checkpoint_names(d.dom) == cps
    r = cli("repair", d.name, bdir)
    assert r.rc == 0 and "done: remove-bitmap" in r.out, r
    assert all(orphan not in v for v in our_bitmaps(d.dom, prefix).values())
    assert checkpoint_names(d.dom) == cps
    assert "someone" not in r.out and "foreign-cp" in checkpoint_names(d.dom)
    p3 = backup(d.name, bdir, "inc")
    assert_point_restores(bdir, p3["id"], d.expected(), tmp_path / "r3")


def test_copied_backup_dir_refused_moved_dir_continues(make_domain, tmp_path):
    import shutil
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir)
    copy = tmp_path / "bk-copy"
    shutil.copytree(bdir, copy)
    cps = checkpoint_names(d.dom)
    files = snapshot_dir(copy)
    for cmd in (("backup", d.name, copy), ("repair", d.name, copy)):
        r = cli(*cmd)
        assert r.rc == 2 and "is a copy of" in r.err, r
    assert checkpoint_names(d.dom) == cps and snapshot_dir(copy) == files
    # the original goes on, also when reached through a symlink; a moved directory goes on too
    d.write("vda", 0x22, 2 * MiB, 1 * MiB)
    link = tmp_path / "bk-link"
    link.symlink_to(bdir)
    backup(d.name, link, "inc")
    shutil.rmtree(copy)
    moved = tmp_path / "moved"
    bdir.rename(moved)
    d.write("vda", 0x33, 4 * MiB, 1 * MiB)
    p = backup(d.name, moved, "inc")
    assert p["parent"] == "0002"
    assert_point_restores(moved, p["id"], d.expected(), tmp_path / "r")


def test_prune_of_a_full_older_than_a_disk_keeps_inc_and_diff_going(make_domain, tmp_path):
    """After a prune the new base takes over the old full's checkpoint, which predates vdb:
    vdb is then copied whole instead of breaking the chain."""
    from tests.support import scratch
    from virtbackup.qemu import qemu_img
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir)
    vdb = tmp_path / "disks" / f"{d.name}-vdb.qcow2"
    qemu_img.create(vdb, 8 * MiB)
    d.dom.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vdb}'/>"
        "<target dev='vdb' bus='virtio'/></disk>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    d.disk_sizes["vdb"] = 8 * MiB
    d.models["vdb"] = scratch.DiskModel(8 * MiB)
    d.write("vdb", 0x22, 0, 1 * MiB)
    backup(d.name, bdir, "inc")
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 0, r
    for level in ("inc", "diff"):
        d.write("vda", 0x33, 2 * MiB, 512 * 1024)
        d.write("vdb", 0x44, 2 * MiB, 512 * 1024)
        r = cli("backup", d.name, bdir, "--level", level, "--json")
        assert r.rc == 0, r
        p = r.json()["point"]
        assert p["level"] == level and p["disks"]["vdb"]["copied_full"] and not p["disks"]["vda"]["copied_full"]
        assert_point_restores(bdir, p["id"], d.expected(), tmp_path / f"r-{level}")
    r = cli("repair", d.name, bdir, "--dry-run")
    assert r.rc == 0 and "nothing to repair" in r.out, r
