"""Compressed chains (issue 24) on real domains: qcow2 compressed clusters written by every
transport, read back by every reader, byte for byte the same as an uncompressed chain.

The disks hold a mix a real disk has: random (incompressible) data, text, zeroes, and the
guest's pattern writes on top; writes of 4 KiB at unaligned offsets make incrementals whose
bitmap runs are narrower than a cluster. Every reader of a chain is run on a compressed one
here (the default is uncompressed: see options.DEFAULT_COMPRESSION).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.support import scratch
from tests.support.helpers import checkpoint_names, cli, one_error_line, patched, snapshot_dir, tmpfs
from virtbackup.qemu import qemu_img

MiB = 1 << 20
KiB = 1 << 10
DISK = 48 * MiB


def prefill(sd: scratch.ScratchDomain, tmp: Path) -> bytearray:
    """Random data, then text, into the shut-off domain's vda (host qemu-io); its content."""
    rnd = tmp / "random.bin"
    rnd.write_bytes(os.urandom(4 * MiB))
    text = tmp / "text.bin"
    line = b"Dec  6 12:00:01 host systemd[1]: Started virtbackup.service - nightly backup of vm%05d.\n"
    text.write_bytes(b"".join(line % i for i in range(60000))[:6 * MiB])
    img = sd.disk_path("vda")
    for f, off, n in ((rnd, 0, 4 * MiB), (text, 8 * MiB, 6 * MiB)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {f} {off} {n}", str(img)],
                       check=True, capture_output=True)
    return bytearray(scratch.read_raw(img))


def write(sd: scratch.ScratchDomain, data: bytearray, pattern: int, offset: int, length: int,
          online: bool) -> None:
    if online:
        sd.write("vda", pattern, offset, length)
    else:
        scratch.write_offline(sd, "vda", pattern, offset, length)
    data[:] = patched(bytes(data), pattern, offset, length)


def changes(sd: scratch.ScratchDomain, data: bytearray, step: int, online: bool) -> None:
    """One round of guest writes: a pattern run, 4 KiB at an unaligned offset, zeroes over data."""
    write(sd, data, 0x50 + step, (16 + 4 * step) * MiB, 3 * MiB, online)
    write(sd, data, 0x60 + step, 9 * MiB + 12 * KiB + step * 68 * KiB, 4 * KiB, online)
    write(sd, data, 0, (1 + step) * MiB, 64 * KiB * (step + 1), online)     # zeroes over random data


def backup(name: str, bdir: Path, level: str, *extra: object) -> dict:
    r = cli("backup", name, bdir, "--level", level, "--json", *extra)
    assert r.rc == 0, r
    return r.json()["point"]


def clusters(image: Path) -> Dict[str, int]:
    out = json.loads(subprocess.run(["qemu-img", "check", "-U", "--output=json", str(image)],
                                    capture_output=True, text=True).stdout)
    return {"allocated": out.get("allocated-clusters", 0), "compressed": out.get("compressed-clusters", 0)}


def assert_restores(bdir: Path, point: str, want: bytes, out: Path, *extra: object) -> None:
    r = cli("restore", bdir, out, "--point", point, *extra)
    assert r.rc == 0, r
    got = scratch.read_raw(out / "vda.qcow2")
    diff = scratch.first_difference(got, want)
    assert diff is None, f"point {point}: differs at {diff}"
    assert clusters(out / "vda.qcow2")["compressed"] == 0, "a restore writes plain images"


@pytest.mark.parametrize("transport", ["push", "pull", "offline", "pull-4k"])
def test_every_transport_writes_compressed_points_that_restore_bit_exact(make_domain, tmp_path, transport):
    """pull-4k: a disk of 4 KiB clusters, so its bitmap marks 4 KiB runs and the copy into the
    target's 64 KiB compressed clusters must widen them (nbdcopy.align_runs): without that the
    compressing server refuses the writes."""
    sd = make_domain({"vda": DISK}, start=False)
    if transport == "pull-4k":
        sd.disk_path("vda").unlink()
        qemu_img.create(sd.disk_path("vda"), DISK, cluster_size=4096)
        transport = "pull"
    data = prefill(sd, tmp_path)
    online = transport != "offline"
    if online:
        sd.dom.create()
    extra = ["--mode", transport] if online else []
    zdir, plain = tmp_path / "z", tmp_path / "plain"
    seen: Dict[str, bytes] = {}
    p = backup(sd.name, zdir, "full", "--compress", "zstd", *extra)
    seen[p["id"]] = bytes(data)
    for step, level in enumerate(("inc", "inc", "diff")):
        changes(sd, data, step, online)
        p = backup(sd.name, zdir, level, *extra)      # follows the chain's setting
        seen[p["id"]] = bytes(data)
    # the same data, uncompressed, into a second directory (no write in between)
    backup(sd.name, plain, "full", "--compress", "none", *extra)

    points = json.loads(cli("list", zdir, "--json").out)["points"]
    assert [(q["level"], q["compression"], q["transport"]) for q in points] == \
        [(lvl, "zstd", transport) for lvl in ("full", "inc", "inc", "diff")]
    for q in points:
        img = zdir / q["disks"]["vda"]["image"]
        c = clusters(img)
        assert c["compressed"] > 0, f"point {q['id']}: no compressed cluster in {img} ({c})"
        assert q["disks"]["vda"]["data_size"] > q["disks"]["vda"]["size"] // 2
    # the random 4 MiB does not shrink: stored plain, as QEMU does (still read back right)
    assert clusters(zdir / points[0]["disks"]["vda"]["image"])["compressed"] < \
        clusters(zdir / points[0]["disks"]["vda"]["image"])["allocated"]
    for pid, want in seen.items():
        assert_restores(zdir, pid, want, tmp_path / f"out-{pid}")
    # qemu-img alone reads the same bytes from the compressed and the uncompressed point
    last_z = zdir / points[-1]["disks"]["vda"]["image"]
    last_plain = plain / json.loads(cli("list", plain, "--json").out)["points"][0]["disks"]["vda"]["image"]
    assert subprocess.run(["qemu-img", "compare", "-U", str(last_z), str(last_plain)]).returncode == 0
    zfull = (zdir / points[0]["disks"]["vda"]["image"]).stat().st_size
    assert zfull < last_plain.stat().st_size * 0.75, (zfull, last_plain.stat().st_size)
    r = cli("verify", zdir, "--deep")
    assert r.rc == 0, r
    # list: each point's stored size, the directory's compression ratio
    listed = json.loads(cli("list", zdir, "--json").out)
    assert listed["stored_bytes"] == sum(q["size"] for q in listed["points"])
    assert listed["compression_ratio"] > 2, listed["compression_ratio"]
    plain_ratio = json.loads(cli("list", plain, "--json").out)["compression_ratio"]
    assert plain_ratio < 1.01, plain_ratio
    assert "(zstd; compression ratio " in cli("list", zdir).out


def test_readers_of_a_compressed_chain(make_domain, tmp_path, restored_domains):
    """restore --define, --instant, prune consolidation (stays compressed), flatten, verify --deep."""
    sd = make_domain({"vda": DISK}, start=False)
    data = prefill(sd, tmp_path)
    sd.dom.create()
    bdir = tmp_path / "b"
    seen: Dict[str, bytes] = {}
    p = backup(sd.name, bdir, "full", "--compress", "zstd")
    assert p["compression"] == "zstd"
    seen[p["id"]] = bytes(data)
    for step in range(3):
        changes(sd, data, step, True)
        p = backup(sd.name, bdir, "inc")
        seen[p["id"]] = bytes(data)

    name = f"vbz-{secrets.token_hex(3)}"
    restored_domains.append(name)
    r = cli("restore", bdir, tmp_path / "def", "--point", "0002", "--define", name)
    assert r.rc == 0, r
    assert scratch.read_raw(tmp_path / "def" / "vda.qcow2") == seen["0002"]

    iname = f"vbzi-{secrets.token_hex(3)}"
    restored_domains.append(iname)
    r = cli("restore", bdir, tmp_path / "inst", "--instant", "--define", iname)
    assert r.rc == 0, r
    assert scratch.read_raw(tmp_path / "inst" / "vda.qcow2") == seen["0004"]
    scratch.remove_domain(sd.conn, iname)
    r = cli("flatten", tmp_path / "inst" / "vda.qcow2")
    assert r.rc == 0, r
    assert scratch.backing_chain(tmp_path / "inst" / "vda.qcow2") == [str(tmp_path / "inst" / "vda.qcow2")]
    assert scratch.read_raw(tmp_path / "inst" / "vda.qcow2") == seen["0004"]

    # a merge: the full is a day older, so --keep-daily 2 keeps it and the newest and drops the
    # incs between; the newest inc is rebased onto the full (a safe rebase writes plain
    # clusters: they are compressed again before the commit)
    meta = json.loads((bdir / "virtbackup.json").read_text())
    meta["points"][0]["created"] = "2026-11-29T10:00:00+00:00"
    (bdir / "virtbackup.json").write_text(json.dumps(meta))
    r = cli("prune", bdir, "--keep-daily", "2", "--json")
    assert r.rc == 0, r
    assert_compressed_chain(bdir, ["0001", "0004"])
    for pid in ("0001", "0004"):
        assert_restores(bdir, pid, seen[pid], tmp_path / f"merged-{pid}")
    # consolidation: the full dropped, the newest becomes the base (converted, compressed)
    r = cli("prune", bdir, "--keep", "1", "--json")
    assert r.rc == 0, r
    points = assert_compressed_chain(bdir, ["0004"])
    assert points[0]["level"] == "full"
    assert_restores(bdir, "0004", seen["0004"], tmp_path / "based-0004")
    r = cli("verify", bdir, "--deep")
    assert r.rc == 0, r


def assert_compressed_chain(bdir: Path, ids: List[str]) -> List[dict]:
    """The points are `ids`, and every image holds compressed clusters only, but for the random
    4 MiB of the prefill (64 clusters that don't shrink, stored plain)."""
    points = json.loads(cli("list", bdir, "--json").out)["points"]
    assert [q["id"] for q in points] == ids
    for q in points:
        c = clusters(bdir / q["disks"]["vda"]["image"])
        assert q["compression"] == "zstd" and c["compressed"] > 0, (q["id"], c)
        assert c["allocated"] - c["compressed"] <= 64, (q["id"], c)
        assert q["disks"]["vda"]["data_size"] is not None
    return points


def test_compression_settings_are_checked_and_a_change_starts_a_new_chain(make_domain, tmp_path, monkeypatch):
    sd = make_domain({"vda": 16 * MiB})
    sd.write("vda", 0x33, 0, 2 * MiB)
    bdir = tmp_path / "b"
    for bad in ("lz4", ""):
        r = cli("backup", sd.name, bdir, "--compress", bad)
        assert r.rc == 2 and "unknown compression" in one_error_line(r), r
        assert not bdir.exists()
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    os.chmod(key, 0o600)
    r = cli("backup", sd.name, bdir, "--encrypt", "--key-file", key, "--compress", "zstd")
    assert r.rc == 2 and "cannot go with encryption" in one_error_line(r), r
    assert not bdir.exists()

    assert backup(sd.name, bdir, "auto")["compression"] is None      # the default: none
    assert backup(sd.name, bdir, "auto", "--compress", "zstd")["compression"] == "zstd"
    assert backup(sd.name, bdir, "auto")["compression"] == "zstd"   # follows the chain
    before = snapshot_dir(bdir)
    r = cli("backup", sd.name, bdir, "--level", "inc", "--compress", "none")
    assert r.rc == 2 and "starts a new chain" in one_error_line(r), r
    assert snapshot_dir(bdir) == before
    p = backup(sd.name, bdir, "auto", "--compress", "none")
    assert (p["level"], p["compression"]) == ("full", None) and "compression changed" in p["reason"], p
    assert backup(sd.name, bdir, "auto")["compression"] is None     # follows the chain now
    assert backup(sd.name, bdir, "inc")["level"] == "inc"
    # an encrypted directory is never compressed by default
    edir = tmp_path / "e"
    monkeypatch.setenv("VIRTBACKUP_ENCRYPT_ITER_TIME", "10")
    r = cli("backup", sd.name, edir, "--encrypt", "--key-file", key, "--json")
    assert r.rc == 0 and r.json()["point"]["compression"] is None, r


def test_hand_edited_compression_is_refused(make_domain, tmp_path):
    sd = make_domain({"vda": 16 * MiB})
    sd.write("vda", 0x44, 0, MiB)
    bdir = tmp_path / "b"
    backup(sd.name, bdir, "full")
    meta = bdir / "virtbackup.json"
    good = meta.read_text()
    for value in ("lz4", 1, ["zstd"]):
        d = json.loads(good)
        d["points"][0]["compression"] = value
        meta.write_text(json.dumps(d))
        for cmd in (("list", bdir), ("restore", bdir, tmp_path / "o")):
            r = cli(*cmd)
            assert r.rc == 2 and "compression" in one_error_line(r), (value, r)
        assert not (tmp_path / "o").exists()
    d = json.loads(good)
    d["points"][0]["disks"]["vda"]["data_size"] = "big"
    meta.write_text(json.dumps(d))
    r = cli("list", bdir)
    assert r.rc == 2, r
    meta.write_text(good)
    assert cli("list", bdir).rc == 0


def test_the_default_transport_of_a_compressed_chain(make_domain, tmp_path):
    """A local running domain without --mode: pull, compressed too (--mode auto); --scratch-dir
    alone means pull; a chain may mix transports (a --mode push point in it), and keeps its
    compression across them."""
    sd = make_domain({"vda": 16 * MiB})
    sd.write("vda", 0x21, 0, 2 * MiB)
    r = cli("backup", sd.name, tmp_path / "z", "--compress", "zstd", "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert (p["transport"], p["compression"]) == ("pull", "zstd"), p
    assert r.json()["transport_reason"].startswith("--mode auto pulls (the default)"), r.json()
    sd.write("vda", 0x22, 4 * MiB, 1 * MiB)
    (tmp_path / "scratch").mkdir()
    r = cli("backup", sd.name, tmp_path / "z", "--scratch-dir", tmp_path / "scratch", "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert (p["transport"], p["level"], p["compression"]) == ("pull", "inc", "zstd"), p
    assert "--scratch-dir" in r.json()["transport_reason"]
    sd.write("vda", 0x23, 8 * MiB, 1 * MiB)
    r = cli("backup", sd.name, tmp_path / "z", "--mode", "push", "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert (p["transport"], p["level"], p["compression"]) == ("push", "inc", "zstd"), p
    assert r.json()["transport_reason"] == "--mode push was asked for"
    assert_restores(tmp_path / "z", "latest", sd.expected()["vda"], tmp_path / "out")


def test_enospc_while_compressing_a_push_changes_nothing(make_domain, tmp_path):
    """Random (incompressible) data: the push job's plain copy fits the backup filesystem, its
    compressed twin does not: exit 1 with one line, no point, no twin, no checkpoint left."""
    sd = make_domain({"vda": 32 * MiB}, start=False)
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(8 * MiB))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {rnd} 0 {8 * MiB}", str(sd.disk_path("vda"))],
                   check=True, capture_output=True)
    sd.dom.create()
    with tmpfs(tmp_path / "tiny", "13M") as mnt:
        bdir = mnt / "bk"
        r = cli("backup", sd.name, bdir, "--compress", "zstd", "--mode", "push")
        assert r.rc == 1, r
        line = one_error_line(r)
        assert "compressing the copy failed" in line and "No space left on device" in line, line
        assert json.loads(cli("list", bdir, "--json").out)["points"] == []
        assert [f.name for f in (bdir / "points").iterdir()] == [] if (bdir / "points").exists() else True
        assert checkpoint_names(sd.dom) == []
