"""Backup dirs written by earlier releases restore bit-exact with this code, and the first write
of this code upgrades their metadata without losing an old point.

The dirs (tests/fixtures/old-backup-dir/, its README says how they were made) were written by
the previous release (b4380a3: schema 1 with BLAKE3 records, schema 2 encrypted) and by the last
release before BLAKE3 (e6578f9: schema 1 with SHA-256 records): one 4 MiB disk, a full and an
incremental. Reading (list, verify, restore) changes nothing in them; a prune or a backup writes
the current layout (schema 3, 4 encrypted: `"digest": {"algorithm", "value"}` per image). Every
restored disk is compared with `qemu-img compare` against an image the test writes itself with
the qemu-io binary from the patterns the guest wrote.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from lxml import etree

from tests.support import scratch
from tests.support.helpers import ROOT, cli, hmp_write
from tests.support.schemas import validate
from virtbackup.qemu import qemu_img

FIXTURE = ROOT / "tests" / "fixtures" / "old-backup-dir"
PATTERNS = json.loads((FIXTURE / "patterns.json").read_text())
DISK = int(PATTERNS["disk_size"])
WRITES: Dict[str, List[List[int]]] = PATTERNS["writes"]
MiB = 1 << 20
NEW_WRITE = [0x33, 1 * MiB, 64 * 1024]         # what the guest writes before the new code's backup
# variant -> (schema it was written with, algorithm of its image records, encrypted)
VARIANTS = {"plain": (1, "blake3", False), "sha256": (1, "sha256", False), "encrypted": (2, "blake3", True)}


def unpack(variant: str, tmp_path: Path) -> Path:
    """A copy of the fixture's backup dir (and its key) in tmp_path."""
    with tarfile.open(FIXTURE / f"{variant}.tar.xz") as tar:
        members = tar.getmembers()
        # our own fixture, but no link or path out of tmp_path either way (no extraction filters
        # in this Python 3.11)
        assert all((m.isfile() or m.isdir()) and m.name.split("/")[0] == variant and ".." not in m.name
                   for m in members)
        tar.extractall(tmp_path, members=members)
    key = tmp_path / "test.key"
    if not key.exists():
        key.write_bytes((FIXTURE / "test.key").read_bytes())
        os.chmod(key, 0o600)
    return tmp_path / variant


def key_args(variant: str, tmp_path: Path) -> List[object]:
    return ["--key-file", tmp_path / "test.key"] if VARIANTS[variant][2] else []


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


def expected_image(tmp_path: Path, point: str, extra: Optional[List[List[int]]] = None) -> Path:
    """What the guest saw at `point` of the fixture (then `extra` writes), built here with qemu-io."""
    path = tmp_path / f"expected-{point}-{secrets.token_hex(2)}.qcow2"
    qemu_img.create(path, DISK)
    writes = [w for p in sorted(WRITES) if p <= point for w in WRITES[p]] + (extra or [])
    for pattern, offset, length in writes:
        qemu_io(path, f"write -P {pattern:#04x} {offset} {length}")
    return path


def assert_restores(bdir: Path, point: str, want: Path, tmp_path: Path, *args: object,
                    last: Optional[List[List[int]]] = None) -> None:
    """`restore --point` gives one standalone disk with exactly the content of `want`; the writes
    before the point (`last`, default: the fixture's) are read back with qemu-io, a second look."""
    out = tmp_path / f"out-{bdir.name}-{point}-{secrets.token_hex(2)}"
    r = cli("restore", bdir, out, "--point", point, *args)
    assert r.rc == 0, r
    img = out / "vda.qcow2"
    assert scratch.backing_chain(img) == [str(img)], "restored image must be standalone"
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(want), str(img)],
                          capture_output=True, text=True)
    assert same.returncode == 0, f"point {point} of {bdir.name}: {same.stdout.strip()} {same.stderr.strip()}"
    for pattern, offset, length in WRITES[point] if last is None else last:
        qemu_io(img, f"read -P {pattern:#04x} {offset} {length}")


def metadata(bdir: Path) -> dict:
    data: dict = json.loads((bdir / "virtbackup.json").read_text())
    return data


def records(data: dict) -> Dict[str, dict]:
    return {d["image"]: d for p in data["points"] for d in p["disks"].values()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_old_dir_lists_verifies_and_restores_bit_exact(variant, tmp_path):
    schema, alg, encrypted = VARIANTS[variant]
    bdir = unpack(variant, tmp_path)
    key = key_args(variant, tmp_path)
    old = (bdir / "virtbackup.json").read_bytes()
    assert json.loads(old)["schema"] == schema

    lst = cli("list", bdir, "--json")
    assert lst.rc == 0, lst
    out = validate("list", lst.json())
    assert [p["id"] for p in out["points"]] == ["0001", "0002"]
    assert (out["encryption"] is not None) == encrypted
    legacy = records(json.loads(old))
    for p in out["points"]:
        rec = p["disks"]["vda"]
        assert "sha256" not in rec and "blake3" not in rec
        assert rec["digest"] == {"algorithm": alg, "value": legacy[rec["image"]][alg]}

    v = cli("verify", bdir, "--deep", "--json", *key)
    assert v.rc == 0, v
    assert validate("verify", v.json())["ok"] and v.json()["images_checked"] == 2 and v.json()["chains_read"] == 2

    for point in ("0001", "0002"):
        assert_restores(bdir, point, expected_image(tmp_path, point), tmp_path, *key)
    # reading is not a write: the directory keeps the layout its release wrote
    assert (bdir / "virtbackup.json").read_bytes() == old


@pytest.mark.parametrize("variant", ["plain", "encrypted"])
def test_first_prune_writes_the_new_schema(variant, tmp_path):
    schema, _, encrypted = VARIANTS[variant]
    bdir = unpack(variant, tmp_path)
    key = key_args(variant, tmp_path)
    r = cli("prune", bdir, "--keep", "1", "--json", *key)
    assert r.rc == 0, r
    assert r.json()["dropped"] == ["0001"] and r.json()["kept"] == ["0002"]
    data = metadata(bdir)
    assert data["schema"] == (4 if encrypted else 3)
    (rec,) = records(data).values()
    assert set(rec) & {"sha256", "blake3"} == set() and rec["digest"]["algorithm"] == "blake3"
    assert rec["backing"] is None                       # 0002 now holds the whole disk
    v = cli("verify", bdir, "--json", *key)
    assert v.rc == 0 and v.json()["ok"], v
    assert_restores(bdir, "0002", expected_image(tmp_path, "0002"), tmp_path, *key)


def test_first_backup_into_old_dir_keeps_old_points(conn, tmp_path):
    """A backup of the same domain (same UUID) into a pre-BLAKE3 dir: the old points keep their
    images and their SHA-256 digests (now in the new layout), and they still verify and restore."""
    bdir = unpack("sha256", tmp_path)
    old = metadata(bdir)
    name = f"vbold-{secrets.token_hex(3)}"
    disk = tmp_path / f"{name}-vda.qcow2"
    qemu_img.create(disk, DISK)
    root = etree.fromstring(scratch.domain_xml(name, {"vda": disk}))
    root.find("uuid").text = old["domain_uuid"]             # the domain the dir holds backups of
    try:
        dom = conn.defineXML(etree.tostring(root, encoding="unicode"))
        dom.create()
        hmp_write(dom, "vda", *NEW_WRITE)
        r = cli("backup", name, bdir, "--level", "full", "--json")
        assert r.rc == 0, r
        assert validate("backup", r.json())["point"]["id"] == "0003"
    finally:
        scratch.remove_domain(conn, name)

    data = metadata(bdir)
    assert data["schema"] == 3
    now = records(data)
    for image, rec in records(old).items():           # the old points: untouched, digests carried over
        assert now[image]["digest"] == {"algorithm": "sha256", "value": rec["sha256"]}
        assert set(now[image]) & {"sha256", "blake3"} == set()
    assert now["points/0003/vda.qcow2"]["digest"]["algorithm"] == "blake3"
    v = cli("verify", bdir, "--json")
    assert v.rc == 0 and v.json()["images_checked"] == 3, v
    for point in ("0001", "0002"):
        assert_restores(bdir, point, expected_image(tmp_path, point), tmp_path)
    fresh = tmp_path / "expected-0003.qcow2"
    qemu_img.create(fresh, DISK)
    qemu_io(fresh, "write -P {:#04x} {} {}".format(*NEW_WRITE))
    assert_restores(bdir, "0003", fresh, tmp_path, last=[NEW_WRITE])
