"""Per-disk fallback: a disk whose base bitmap is lost or inconsistent is copied whole inside an
incremental/differential while the other disks stay incremental; only when every disk's bitmap
is unusable does auto start a new chain. Real libvirtd and QEMU (online and offline), bitmaps
removed behind libvirt's back through QMP passthrough or `qemu-img bitmap`, or left in-use by a
killed QEMU; every point restored and compared byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict

import libvirt

from tests.support import scratch
from tests.support.helpers import (
    assert_point_restores,
    checkpoint_names,
    cli,
    image_held,
    our_bitmaps,
    snapshot_dir,
    take_backup,
)
from tests.support.schemas import validate
from virtbackup.virt import host, monitor

MiB = 1 << 20
KiB = 1 << 10


def data_bytes(image: Path) -> int:
    """Guest data stored in this image file itself (not read from its backing chain)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)], check=True,
                         capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def compressed_clusters(image: Path) -> int:
    out = subprocess.run(["qemu-img", "check", "-U", "--output=json", str(image)], capture_output=True,
                         text=True).stdout
    return int(json.loads(out).get("compressed-clusters", 0))


def remove_bitmap(dom: libvirt.virDomain, disk: str, name: str) -> None:
    """Behind libvirt's back (another tool, a converted image): QMP on the disk's format node."""
    node = next(d.node_name for d in host.domain_disks(dom.XMLDesc(0)) if d.target == disk)
    monitor.qmp(dom, "block-dirty-bitmap-remove", {"node": node, "name": name})


def image(bdir: Path, p: dict, disk: str) -> Path:
    return bdir / p["disks"][disk]["image"]


def test_online_lost_and_inconsistent_bitmaps_copy_only_that_disk(make_domain, tmp_path):
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    want: Dict[str, Dict[str, bytes]] = {}
    d.write("vda", 0x11, 0, 8 * MiB)
    d.write("vdb", 0x21, 0, 2 * MiB)
    # a compressed chain (issue 24): a disk copied whole inside an inc is compressed too
    r = cli("backup", d.name, bdir, "--level", "full", "--compress", "zstd", "--json")
    assert r.rc == 0, r
    p1 = r.json()["point"]
    want["0001"] = d.expected()

    # 1. vdb's base bitmap removed: auto takes an incremental, vdb copied whole in it
    remove_bitmap(d.dom, "vdb", p1["checkpoint"])
    d.write("vda", 0x12, 1 * MiB, 1 * MiB)
    d.write("vdb", 0x22, 4 * MiB, 512 * KiB)
    r = cli("backup", d.name, bdir, "--level", "auto")
    assert r.rc == 0, r
    assert "disk vdb copied whole" in r.out and "missing on disk vdb" in r.out, r
    p2 = validate("list", cli("list", bdir, "--json").json())["points"][1]
    assert p2["level"] == "inc" and p2["parent"] == "0001" and p2["reason"] is None
    assert p2["disks"]["vdb"]["copied_full"] and p2["disks"]["vdb"]["backing"] is None
    assert "bitmap" in p2["disks"]["vdb"]["full_reason"] and "missing" in p2["disks"]["vdb"]["full_reason"]
    assert not p2["disks"]["vda"]["copied_full"] and p2["disks"]["vda"]["full_reason"] is None
    assert scratch.backing_chain(image(bdir, p2, "vdb")) == [str(image(bdir, p2, "vdb"))]
    assert p2["compression"] == "zstd" and compressed_clusters(image(bdir, p2, "vdb")) > 0
    fallback = {t: data_bytes(image(bdir, p2, t)) for t in ("vda", "vdb")}
    assert fallback == {"vda": 1 * MiB, "vdb": 2 * MiB + 512 * KiB}, fallback
    # what the old behaviour (a new chain) would have copied: a full, into another directory
    other = take_backup(d.name, tmp_path / "bk-full", "full")["point"]
    full = sum(data_bytes(image(tmp_path / "bk-full", other, t)) for t in ("vda", "vdb"))
    assert full == 8 * MiB + 2 * MiB + 512 * KiB
    print(f"\nper-disk fallback point: {sum(fallback.values())} bytes of data copied "
          f"(vda incremental {fallback['vda']}, vdb whole {fallback['vdb']}); a full: {full} bytes")
    assert "vdb copied whole" in cli("list", bdir).out
    want["0002"] = d.expected()

    # 2. the new checkpoint gave vdb a good bitmap again: its next incremental is small
    d.write("vdb", 0x23, 8 * MiB, 256 * KiB)
    d.write("vda", 0x13, 2 * MiB, 128 * KiB)
    p3 = take_backup(d.name, bdir, "inc")["point"]
    assert not p3["disks"]["vdb"]["copied_full"] and not p3["disks"]["vda"]["copied_full"]
    nxt = {t: data_bytes(image(bdir, p3, t)) for t in ("vda", "vdb")}
    print(f"next incremental: vdb {nxt['vdb']} bytes for 256 KiB dirtied, vda {nxt['vda']} for 128 KiB")
    assert nxt == {"vda": 128 * KiB, "vdb": 256 * KiB}, nxt
    want["0003"] = d.expected()

    # 3. --level inc does the same (no refusal for a one-disk problem): vda's bitmap lost now
    remove_bitmap(d.dom, "vda", p3["checkpoint"])
    d.write("vda", 0x14, 3 * MiB, 64 * KiB)
    d.write("vdb", 0x24, 9 * MiB, 64 * KiB)
    r4 = take_backup(d.name, bdir, "inc")
    p4 = r4["point"]
    assert p4["level"] == "inc" and p4["disks"]["vda"]["copied_full"] and not p4["disks"]["vdb"]["copied_full"]
    assert "missing on disk vda" in p4["disks"]["vda"]["full_reason"]
    assert data_bytes(image(bdir, p4, "vdb")) == 64 * KiB
    assert not r4["warnings"], r4          # the retired checkpoint lacked a bitmap: deleted anyway
    want["0004"] = d.expected()

    # 4. a differential reads the full's checkpoint: vdb's is gone, so vdb is copied whole in it
    #    (each differential of this chain does so); vda's is intact: vda is a real differential
    d.write("vdb", 0x25, 10 * MiB, 64 * KiB)
    p5 = take_backup(d.name, bdir, "diff")["point"]
    assert p5["level"] == "diff" and p5["parent"] == "0001"
    assert p5["disks"]["vdb"]["copied_full"] and "missing on disk vdb" in p5["disks"]["vdb"]["full_reason"]
    assert not p5["disks"]["vda"]["copied_full"]
    assert data_bytes(image(bdir, p5, "vda")) == 1 * MiB + 128 * KiB + 64 * KiB   # all since 0001
    want["0005"] = d.expected()
    # the full's checkpoint, broken on vdb only, still serves vda: repair keeps it
    rep = cli("repair", d.name, bdir, "--dry-run", "--json")
    assert rep.rc == 0, rep
    assert not [a for a in rep.json()["actions"] if a["kind"] == "delete-checkpoint"], rep

    # 5. one disk's bitmaps inconsistent (its image left in-use by a killed QEMU), the other fine
    scratch.stop_cleanly(d)
    with image_held(d.disk_path("vda"), kill=True):
        pass
    d.dom.create()
    d.write("vda", 0x15, 5 * MiB, 64 * KiB)
    d.write("vdb", 0x26, 11 * MiB, 64 * KiB)
    p6 = take_backup(d.name, bdir, "auto")["point"]
    assert p6["level"] == "inc" and p6["parent"] == "0005"   # vdb continues from 0005's bitmap
    assert p6["disks"]["vda"]["copied_full"] and "inconsistent" in p6["disks"]["vda"]["full_reason"]
    assert data_bytes(image(bdir, p6, "vdb")) == 64 * KiB
    want["0006"] = d.expected()

    for pid, exp in want.items():
        assert_point_restores(bdir, pid, exp, tmp_path / f"r{pid}")
    assert cli("verify", bdir, "--deep").rc == 0

    # 6. every disk unusable: inc refuses (nothing changed), auto starts a new chain and says why
    remove_bitmap(d.dom, "vda", p6["checkpoint"])
    remove_bitmap(d.dom, "vdb", p6["checkpoint"])
    files = snapshot_dir(bdir)
    r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 2 and "missing on disk vda" in r.err and "missing on disk vdb" in r.err, r
    assert snapshot_dir(bdir) == files
    r7 = take_backup(d.name, bdir, "auto")
    p7 = r7["point"]
    assert p7["level"] == "full" and "new chain" in p7["reason"] and "vdb" in p7["reason"]
    # the old chain's checkpoints are retired although some of their bitmaps were gone
    prefix = p7["checkpoint"][:-4]
    assert not r7["warnings"], r7
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [p7["checkpoint"]]
    assert our_bitmaps(d.dom, prefix) == {"vda": [p7["checkpoint"]], "vdb": [p7["checkpoint"]]}
    assert_point_restores(bdir, "0007", d.expected(), tmp_path / "r0007")

    # 7. prune handles whole-copy disks (standalone images stay as they are)
    r = cli("prune", bdir, "--keep", "4")
    assert r.rc == 0, r
    for pid in ("0004", "0005", "0006", "0007"):
        exp = want.get(pid) or d.expected()
        assert_point_restores(bdir, pid, exp, tmp_path / f"p{pid}")


def test_offline_lost_and_inconsistent_bitmaps_copy_only_that_disk(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    want: Dict[str, Dict[str, bytes]] = {}
    scratch.write_offline(d, "vda", 0x31, 0, 4 * MiB)
    scratch.write_offline(d, "vdb", 0x41, 0, 2 * MiB)
    p1 = take_backup(d.name, bdir, "full")["point"]
    want["0001"] = d.expected()

    # vdb's bitmap removed offline (as another tool would): vdb whole, vda incremental
    subprocess.run(["qemu-img", "bitmap", "--remove", str(d.disk_path("vdb")), p1["checkpoint"]], check=True)
    scratch.write_offline(d, "vda", 0x32, 1 * MiB, 256 * KiB)
    scratch.write_offline(d, "vdb", 0x42, 3 * MiB, 256 * KiB)
    p2 = take_backup(d.name, bdir, "inc")["point"]
    assert p2["level"] == "inc" and p2["disks"]["vdb"]["copied_full"] and not p2["disks"]["vda"]["copied_full"]
    assert "missing on disk vdb" in p2["disks"]["vdb"]["full_reason"]
    assert data_bytes(image(bdir, p2, "vda")) == 256 * KiB
    assert data_bytes(image(bdir, p2, "vdb")) == 2 * MiB + 256 * KiB
    want["0002"] = d.expected()

    scratch.write_offline(d, "vdb", 0x43, 6 * MiB, 128 * KiB)
    p3 = take_backup(d.name, bdir, "auto")["point"]
    assert p3["level"] == "inc" and data_bytes(image(bdir, p3, "vdb")) == 128 * KiB
    want["0003"] = d.expected()

    scratch.write_offline(d, "vda", 0x33, 8 * MiB, 64 * KiB)
    p4 = take_backup(d.name, bdir, "diff")["point"]
    assert p4["parent"] == "0001" and p4["disks"]["vdb"]["copied_full"]
    assert data_bytes(image(bdir, p4, "vda")) == 256 * KiB + 64 * KiB
    want["0004"] = d.expected()

    # vda's bitmaps left in-use by a killed QEMU: vda whole, vdb incremental
    with image_held(d.disk_path("vda"), kill=True):
        pass
    scratch.write_offline(d, "vdb", 0x44, 7 * MiB, 64 * KiB)
    p5 = take_backup(d.name, bdir, "inc")["point"]
    assert p5["disks"]["vda"]["copied_full"] and "inconsistent" in p5["disks"]["vda"]["full_reason"]
    assert data_bytes(image(bdir, p5, "vdb")) == 64 * KiB
    want["0005"] = d.expected()
    assert not d.dom.isActive()

    for pid, exp in want.items():
        assert_point_restores(bdir, pid, exp, tmp_path / f"r{pid}")
