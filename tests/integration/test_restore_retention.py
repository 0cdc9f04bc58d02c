"""Restore as a new domain, instant restore, point selection by time, prune (also killed midway),
deep verify. Real libvirtd and QEMU; every restored point compared byte for byte."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from tests.support import scratch
from tests.support.helpers import (
    ROOT,
    assert_point_restores,
    checkpoint_names,
    cli,
    forget_xml_digests,
    hmp_write,
    patched,
    snapshot_dir,
)
from virtbackup.qemu import qemu_img
from virtbackup.store.digest import file_digest
from virtbackup.virt import host

MiB = 1 << 20
KiB = 1 << 10


def backup(dom_name: str, bdir: Path, level: str) -> dict:
    r = cli("backup", dom_name, bdir, "--level", level, "--json")
    assert r.rc == 0, r
    return r.json()["point"]


def assert_reads(image: Path, want: bytes) -> None:
    diff = scratch.first_difference(scratch.read_raw(image), want)
    assert diff is None, f"{image}: first difference at byte {diff}"


def two_points(make_domain, bdir: Path, disks: Dict[str, int]):
    d = make_domain(disks)
    d.write("vda", 0x11, 0, 1 * MiB)
    if "vdb" in disks:
        d.write("vdb", 0x21, 2 * MiB, 512 * KiB)
    backup(d.name, bdir, "full")
    e1 = d.expected()
    d.write("vda", 0x31, 512 * KiB, 1 * MiB)
    d.write("vda", 0x32, 10 * MiB, 64 * KiB)
    backup(d.name, bdir, "inc")
    return d, e1, d.expected()


def test_restore_define_start_and_refusals(make_domain, conn, restored_domains, tmp_path):
    bdir = tmp_path / "bk"
    d, e1, e2 = two_points(make_domain, bdir, {"vda": 32 * MiB, "vdb": 16 * MiB})
    name = f"vbrestored-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "r1"
    r = cli("restore", bdir, out, "--point", "0001", "--define", name, "--start", "--json")
    assert r.rc == 0, r
    info = r.json()
    assert info["point"] == "0001" and info["domain"]["name"] == name and info["domain"]["started"]
    dom = conn.lookupByName(name)
    assert dom.isActive() and dom.UUIDString() == info["domain"]["uuid"] != d.dom.UUIDString()
    srcs = {x.target: x.source for x in host.domain_disks(dom.XMLDesc(0))}
    assert srcs == {"vda": str((out / "vda.qcow2").resolve()), "vdb": str((out / "vdb.qcow2").resolve())}
    assert dom.listAllCheckpoints(0) == [] and dom.snapshotNum(0) == 0
    for disk in ("vda", "vdb"):
        img = out / f"{disk}.qcow2"
        meta = qemu_img.info(img, force_share=True)
        assert meta.get("backing-filename") is None
        assert not ((meta.get("format-specific") or {}).get("data") or {}).get("bitmaps")
        assert_reads(img, e1[disk])                 # the new domain starts on point 0001's data

    # the new domain really runs on the restored images: its writes land there
    hmp_write(dom, "vda", 0x77, 3 * MiB, 64 * KiB)
    dom.destroy()
    assert_reads(out / "vda.qcow2", patched(e1["vda"], 0x77, 3 * MiB, 64 * KiB))
    assert cli("verify", bdir).rc == 0

    # refusals (exit 2) before anything is written
    r = cli("restore", bdir, tmp_path / "r2", "--define", name)
    assert r.rc == 2 and f"domain '{name}' exists" in r.err, r
    assert not (tmp_path / "r2").exists()
    other = f"{name}-x"
    restored_domains.append(other)
    r = cli("restore", bdir, out, "--define", other)
    assert r.rc == 2 and "exists" in r.err, r
    assert other not in [x.name() for x in conn.listAllDomains(0)]
    r = cli("restore", bdir, tmp_path / "r3", "--start")
    assert r.rc == 2 and "--start needs --define" in r.err, r
    # the newest point, defined but not started
    r = cli("restore", bdir, tmp_path / "r4", "--define", other)
    assert r.rc == 0, r
    assert not conn.lookupByName(other).isActive()
    assert_reads(tmp_path / "r4" / "vda.qcow2", e2["vda"])


def test_instant_restore_leaves_backup_untouched_and_flattens(make_domain, conn, restored_domains, tmp_path):
    bdir = tmp_path / "bk"
    d, _e1, e2 = two_points(make_domain, bdir, {"vda": 32 * MiB, "vdb": 16 * MiB})
    before = snapshot_dir(bdir)
    hashes = {p: file_digest(bdir / p, "sha256") for p in before if p.endswith(".qcow2")}
    name = f"vbinstant-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "inst"
    r = cli("restore", bdir, out, "--instant", "--define", name, "--start", "--json")
    assert r.rc == 0, r
    assert r.json()["instant"] and r.json()["point"] == "0002"
    for disk in ("vda", "vdb"):
        meta = qemu_img.info(out / f"{disk}.qcow2", force_share=True)
        assert meta["backing-filename"] == str((bdir / f"points/0002/{disk}.qcow2").resolve())
        assert (out / f"{disk}.qcow2").stat().st_size < 1 * MiB      # an overlay, not a copy
    dom = conn.lookupByName(name)
    assert dom.isActive()
    hmp_write(dom, "vda", 0x5c, 2 * MiB, 1 * MiB)
    hmp_write(dom, "vdb", 0x5d, 0, 256 * KiB)

    # the backup dir stays valid and unchanged while the domain runs on it
    v = cli("verify", bdir, "--deep", "--json")
    assert v.rc == 0 and v.json()["ok"] and v.json()["chains_read"] == 4, v
    r = cli("prune", bdir, "--keep", "1")
    # refused: a defined domain is layered on its images (D8; running, its QEMU has them open too)
    assert r.rc == 1 and f"is the backing of domain '{name}'" in r.err, r
    dom.destroy()
    assert snapshot_dir(bdir) == before
    assert {p: file_digest(bdir / p, "sha256") for p in hashes} == hashes

    want_vda = patched(e2["vda"], 0x5c, 2 * MiB, 1 * MiB)
    assert_reads(out / "vda.qcow2", want_vda)
    r = cli("flatten", out / "vda.qcow2")
    assert r.rc == 0, r
    assert scratch.backing_chain(out / "vda.qcow2") == [str(out / "vda.qcow2")]
    assert_reads(out / "vda.qcow2", want_vda)
    assert_reads(out / "vdb.qcow2", patched(e2["vdb"], 0x5d, 0, 256 * KiB))
    assert snapshot_dir(bdir) == before
    assert cli("flatten", tmp_path / "nope.qcow2").rc == 2


def test_point_selection_by_time(make_domain, tmp_path):
    bdir = tmp_path / "bk"
    d, e1, e2 = two_points(make_domain, bdir, {"vda": 16 * MiB})
    meta = json.loads((bdir / "virtbackup.json").read_text())
    meta["points"][0]["created"] = "2026-11-29T10:00:00+00:00"
    meta["points"][1]["created"] = "2026-11-29T12:00:00+00:00"
    (bdir / "virtbackup.json").write_text(json.dumps(meta))
    assert_point_restores(bdir, "2026-11-29T11:59:59Z", e1, tmp_path / "a")
    assert_point_restores(bdir, "2026-11-29T14:00:00+02:00", e2, tmp_path / "b")   # 12:00 UTC: at or before
    assert_point_restores(bdir, "2026-11-29T10:30:00", e1, tmp_path / "c")         # naive = UTC
    v = cli("verify", bdir, "--point", "2026-11-29T10:30:00Z", "--json")
    assert v.rc == 0 and v.json()["points"] == ["0001"], v
    r = cli("restore", bdir, tmp_path / "d", "--point", "2026-11-29T09:00:00Z")
    assert r.rc == 2 and "no restore point at or before" in r.err, r


LEVELS = ["full", "inc", "inc", "diff", "inc", "inc", "inc", "inc", "diff", "inc"]
KILL_STEPS = ["image:1", "image:4", "commit", "cleanup:3"]


def killed_at(step: str, *args: object) -> subprocess.CompletedProcess:
    """The CLI SIGKILLed at a named moment (tests/support/killpoint.py)."""
    return subprocess.run([sys.executable, "-m", "tests.support.killpoint", step, *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def files(path: Path) -> List[str]:
    """Files and dirs of a backup dir, without the lock and the run logs (logs/)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.name != ".virtbackup.lock" and p.relative_to(path).parts[0] != "logs")


def test_prune_ten_points_keep_three_then_backups_continue(make_domain, monkeypatch, tmp_path):
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    expected = {}
    for i, level in enumerate(LEVELS):
        d.write("vda", 0x20 + i, (i * 3 % 30) * MiB + i * 4 * KiB, 300 * KiB)
        if i % 2 == 0:
            d.write("vdb", 0x40 + i, (15 - i) * MiB, 64 * KiB)
        if i == 6:
            d.write("vda", 0, 0, 64 * KiB)                # zeroes over the full's data
        p = backup(d.name, bdir, level)
        assert p["level"] == level
        expected[p["id"]] = d.expected()
    cps = {p["id"]: p for p in cli("list", bdir, "--json").json()["points"]}
    assert cps["0009"]["parent"] == "0001" and cps["0010"]["parent"] == "0009"

    # --dry-run says what would happen and changes nothing
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "3", "--dry-run", "--json")
    assert r.rc == 0, r
    plan = r.json()
    assert plan["dry_run"] and plan["kept"] == ["0008", "0009", "0010"]
    assert plan["dropped"] == [f"{i:04d}" for i in range(1, 8)]
    assert all(p["reasons"] for p in plan["points"])
    text = cli("prune", bdir, "--keep", "3", "--dry-run")
    assert text.rc == 0 and "drop 0001:" in text.out and "keep 0010: one of the newest 3" in text.out
    assert snapshot_dir(bdir) == before

    # a prune killed at several steps: verify accepts what it left, the next prune finishes
    resumed: Dict[str, Path] = {}
    for step in KILL_STEPS:
        copy = tmp_path / f"killed-{step.replace(':', '-')}"
        shutil.copytree(bdir, copy)
        r = killed_at(step, "prune", copy, "--keep", "3")
        assert r.returncode == -9, (step, r)
        v = cli("verify", copy)
        assert v.rc == 0, (step, v)
        assert_point_restores(copy, "0010", expected["0010"], tmp_path / f"r-{step.replace(':', '-')}")
        r = cli("prune", copy, "--keep", "3", "--json")
        assert r.rc == 0, (step, r)
        resumed[step] = copy

    r = cli("prune", bdir, "--keep", "3", "--json")
    assert r.rc == 0, r
    out = r.json()
    assert out["kept"] == ["0008", "0009", "0010"] and not out["dry_run"]
    assert any("takes over checkpoint" in c for c in out["changes"])
    v = cli("verify", bdir, "--deep", "--json")
    assert v.rc == 0 and v.json()["chains_read"] == 6, v
    pts = {p["id"]: p for p in cli("list", bdir, "--json").json()["points"]}
    assert list(pts) == ["0008", "0009", "0010"]
    assert pts["0008"]["level"] == "full" and pts["0008"]["parent"] is None
    assert pts["0008"]["checkpoint"] == cps["0001"]["checkpoint"]
    assert pts["0009"]["parent"] == "0008" and pts["0010"]["parent"] == "0009"
    assert not any((bdir / "points" / f"{i:04d}").exists() for i in range(1, 8))
    recorded = {"virtbackup.json"} | {x for p in pts.values()
                                      for x in [p["domain_xml"], p["checkpoint_xml"],
                                                *(img["image"] for img in p["disks"].values())]}
    assert {f for f in files(bdir) if (bdir / f).is_file()} == recorded
    assert qemu_img.info(bdir / pts["0008"]["disks"]["vda"]["image"]).get("backing-filename") is None
    for pid in ("0008", "0009", "0010"):
        assert_point_restores(bdir, pid, expected[pid], tmp_path / f"after-{pid}")

    # the interrupted prunes ended exactly where the clean one did
    for step, copy in resumed.items():
        assert files(copy) == files(bdir), step
        assert cli("verify", copy).rc == 0
    assert_point_restores(resumed["image:4"], "0009", expected["0009"], tmp_path / "resumed-0009")

    # the live chain continues: an incremental from the newest point, a differential from the new base
    d.write("vda", 0x91, 5 * MiB, 128 * KiB)
    p = backup(d.name, bdir, "inc")
    assert p["parent"] == "0010"
    expected[p["id"]] = d.expected()
    d.write("vdb", 0x92, 1 * MiB, 128 * KiB)
    p = backup(d.name, bdir, "diff")
    assert p["parent"] == "0008" and p["base_checkpoint"] == cps["0001"]["checkpoint"]
    expected[p["id"]] = d.expected()
    for pid in ("0011", "0012", "0008"):
        assert_point_restores(bdir, pid, expected[pid], tmp_path / f"cont-{pid}")
    prefix = cps["0001"]["checkpoint"][:-4]
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0001", prefix + "0012"]
    assert cli("verify", bdir).rc == 0

    # and a second prune (of the already merged chain) keeps working
    r = cli("prune", bdir, "--keep", "2", "--json")
    assert r.rc == 0, r
    for pid in ("0011", "0012"):
        assert_point_restores(bdir, pid, expected[pid], tmp_path / f"second-{pid}")
    p = backup(d.name, bdir, "diff")
    assert p["parent"] == "0011" and p["base_checkpoint"] == cps["0001"]["checkpoint"]
    assert_point_restores(bdir, p["id"], d.expected(), tmp_path / "last")


def _corrupt_compressed_cluster(image: Path) -> None:
    """Rewrite `image` with compressed clusters and garble the first one's data (qcow2 layout).

    `qemu-img check` and the file hash (updated by the caller) can't see this; reading can.
    """
    tmp = image.with_suffix(".tmp")
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(image), str(tmp)], check=True)
    with open(tmp, "r+b") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        l1_offset = struct.unpack(">Q", hdr[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry & (1 << 62), "first cluster is not compressed"
        host_off = entry & ((1 << (62 - (cluster_bits - 8))) - 1)
        f.seek(host_off + 16)
        f.write(b"\xff" * 256)
    tmp.rename(image)


def test_deep_verify_finds_unreadable_data(make_domain, tmp_path):
    bdir = tmp_path / "bk"
    two_points(make_domain, bdir, {"vda": 16 * MiB})
    v = cli("verify", bdir, "--deep", "--json")
    assert v.rc == 0 and v.json()["chains_read"] == 2, v
    img = bdir / "points/0001/vda.qcow2"
    _corrupt_compressed_cluster(img)
    meta = json.loads((bdir / "virtbackup.json").read_text())
    meta["points"][0]["disks"]["vda"].update(digest={"algorithm": "blake3", "value": file_digest(img, "blake3")},
                                             size=img.stat().st_size)
    (bdir / "virtbackup.json").write_text(json.dumps(meta))
    assert cli("verify", bdir).rc == 0                  # recorded, hashed, consistent metadata...
    v = cli("verify", bdir, "--deep", "--json")         # ...but it can't be read back
    assert v.rc == 1, v
    data = v.json()
    assert data["damaged_points"] == ["0001", "0002"]
    assert "reading the chain failed" in data["damage"][0]["problem"]


def test_prune_that_fails_changes_nothing_and_bad_input_exits_2(make_domain, tmp_path):
    bdir = tmp_path / "bk"
    d, _e1, e2 = two_points(make_domain, bdir, {"vda": 16 * MiB})
    assert cli("prune", bdir).rc == 2                              # no rule given
    assert cli("prune", tmp_path / "nope", "--keep", "1").rc == 2
    r = cli("prune", bdir, "--keep", "5", "--json")                # nothing to drop
    assert r.rc == 0 and r.json()["dropped"] == [], r
    # the image the kept point must be merged with is unreadable: prune fails, nothing changes
    (bdir / "points/0001/vda.qcow2").write_bytes(b"not a qcow2 image")
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 1 and "nothing was changed" in r.err, r
    assert snapshot_dir(bdir) == before


def test_define_refused_by_libvirt_or_damaged_xml_leaves_nothing(make_domain, tmp_path, restored_domains):
    """restore --define: libvirt refusing the XML takes the written images back (exit 1);
    a saved domain XML that isn't XML is refused before any image is written."""
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    assert cli("backup", d.name, bdir).rc == 0
    xml_path = bdir / "points/0001/domain.xml"
    good = xml_path.read_text()
    name = f"{d.name}-copy"
    restored_domains.append(name)
    forget_xml_digests(bdir)     # else the edited XML is refused as damaged before libvirt sees it

    xml_path.write_text(good.replace(">1</vcpu>", ">0</vcpu>", 1))   # well-formed; libvirt refuses it
    assert ">0</vcpu>" in xml_path.read_text()
    out = tmp_path / "out1"
    r = cli("restore", bdir, out, "--define", name)
    assert r.rc == 1, r
    assert "unusable" not in r.err, r        # refused by libvirt's define, after the images were written
    assert r.err.count("virtbackup: error:") == 1
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".qcow2"]
    assert subprocess.run(["virsh", "dominfo", name], capture_output=True).returncode != 0

    xml_path.write_text("<domain><name>broken")
    out = tmp_path / "out2"
    r = cli("restore", bdir, out, "--define", name)
    assert r.rc == 1 and "domain XML" in r.err and "unusable" in r.err, r
    assert not out.exists() or not list(out.iterdir())
    xml_path.write_text(good)
