"""Disks that cannot carry a dirty bitmap are backed up whole, never left out (hostile pass D16).

A real host's system disk is often a raw file, an LVM volume or a Ceph RBD image, with qcow2 data
disks beside it. 0.2 skipped every such disk with one line on stderr and exit 0: a restore gave a
machine without its system disk. Here one domain has a raw file (vda), a raw block device (vdb, a
loop device), a raw NBD network disk (vdc, a qemu-nbd the test serves on a unix socket) and a
qcow2 disk (vdd). Every point - the full and the incrementals after writes, push and pull - must
restore every disk bit-exact; the qcow2 disk stays incremental, the others are recorded as copied
whole with their reason. A shut-off domain's raw file disk goes through the private QEMU's raw
driver; its network disk is refused with what to do.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import libvirt
import pytest
from lxml import etree

from tests.support import scratch
from tests.support.helpers import assert_point_restores, cli
from virtbackup.virt import host

MiB = 1 << 20
SIZES = {"vda": 24 * MiB, "vdb": 16 * MiB, "vdc": 16 * MiB, "vdd": 16 * MiB}


class MixedDomain(scratch.ScratchDomain):
    """A scratch domain whose disks are of every kind (XML by hand; files made by the test)."""

    def __init__(self, conn: libvirt.virConnect, name: str, workdir: Path, sources: Dict[str, etree._Element]):
        super().__init__(conn, name, workdir, {t: SIZES[t] for t in sources})
        self.sources = sources

    def create(self, start: bool = True) -> "MixedDomain":
        root = etree.fromstring(scratch.domain_xml(self.name, {}).encode())
        devices = root.find("devices")
        assert devices is not None
        for el in self.sources.values():
            devices.insert(1, el)
        self.dom = self.conn.defineXML(etree.tostring(root, encoding="unicode"))
        if start:
            self.dom.create()
        return self


def disk_el(target: str, kind: str, fmt: str, **source: str) -> etree._Element:
    d = etree.Element("disk", type=kind, device="disk")
    etree.SubElement(d, "driver", name="qemu", type=fmt)
    if kind == "network":
        src = etree.SubElement(d, "source", protocol="nbd")
        etree.SubElement(src, "host", transport="unix", socket=source["socket"])
    else:
        etree.SubElement(d, "source", **source)
    etree.SubElement(d, "target", dev=target, bus="virtio")
    return d


@pytest.fixture
def mixed(conn, tmp_path) -> Iterator[MixedDomain]:
    work = tmp_path / "disks"
    work.mkdir()
    raw = work / "vda.raw"
    loop_file = work / "vdb.loopfile"
    nbd_file = work / "vdc.raw"
    qcow = work / "vdd.qcow2"
    sock = work / "vdc.sock"
    for f, t in ((raw, "vda"), (loop_file, "vdb"), (nbd_file, "vdc")):
        with open(f, "wb") as fh:
            fh.truncate(SIZES[t])                   # sparse: the raw disks start as holes
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(SIZES["vdd"])], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(loop_file)], check=True, capture_output=True,
                          text=True).stdout.strip()
    nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "--persistent", "--shared=4", "-k", str(sock), str(nbd_file)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sd = None
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert nbd.poll() is None, nbd.stderr.read() if nbd.stderr else "qemu-nbd died"
            assert time.monotonic() < deadline, "qemu-nbd did not create its socket"
            time.sleep(0.05)
        sources = {"vda": disk_el("vda", "file", "raw", file=str(raw)),
                   "vdb": disk_el("vdb", "block", "raw", dev=loop),
                   "vdc": disk_el("vdc", "network", "raw", socket=str(sock)),
                   "vdd": disk_el("vdd", "file", "qcow2", file=str(qcow))}
        sd = MixedDomain(conn, f"vbkinds-{os.getpid()}-{time.monotonic_ns() % 10**6}", work, sources)
        sd.raw_file = raw                 # type: ignore[attr-defined]
        yield sd.create()
    finally:
        if sd is not None:
            scratch.remove_domain(host.connect(), sd.name)
        nbd.terminate()
        try:
            nbd.wait(10)
        except subprocess.TimeoutExpired:
            nbd.kill()
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def backup(sd: MixedDomain, bdir: Path, *extra: object) -> dict:
    r = cli("backup", sd.name, bdir, "--json", *extra)
    assert r.rc == 0, r
    assert "skipping disk" not in r.err, r.err
    return r.json()


def disks_of(res: dict) -> Dict[str, dict]:
    return res["point"]["disks"]


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_raw_block_and_network_disks_are_in_every_point_and_restore_bit_exact(mixed, tmp_path, mode):
    sd, bdir = mixed, tmp_path / "bk"
    want: Dict[str, Dict[str, bytes]] = {}
    for t, pat in (("vda", 0x11), ("vdb", 0x21), ("vdc", 0x31), ("vdd", 0x41)):
        sd.write(t, pat, 1 * MiB, 2 * MiB)
    full = backup(sd, bdir, "--mode", mode)
    assert full["skipped"] == {} and sorted(disks_of(full)) == ["vda", "vdb", "vdc", "vdd"]
    assert full["transport_reason"] == f"--mode {mode} was asked for"
    want[full["point"]["id"]] = sd.expected()

    ids: List[str] = []
    for round_, pat in enumerate((0x52, 0x63)):
        for t in SIZES:
            sd.write(t, pat + round_, (4 + 3 * round_) * MiB, 1 * MiB)
        sd.write("vda", 0, 1 * MiB, 64 * 1024)        # zeroes written over data, too
        res = backup(sd, bdir, "--mode", mode)
        p = res["point"]
        assert p["level"] == "inc", p
        d = disks_of(res)
        for t in ("vda", "vdb", "vdc"):
            assert d[t]["copied_full"] is True and d[t]["backing"] is None, d[t]
            assert "cannot hold a dirty bitmap" in d[t]["full_reason"], d[t]
        assert d["vdd"]["copied_full"] is False and d["vdd"]["backing"] is not None, d["vdd"]
        want[p["id"]] = sd.expected()
        ids.append(p["id"])

    # the checkpoints track only the qcow2 disk: libvirt was told checkpoint='no' for the others
    cp = sd.dom.checkpointLookupByName(f"{res['point']['checkpoint']}")
    root = etree.fromstring(cp.getXMLDesc(0).encode())
    kinds = {d.get("name"): d.get("checkpoint") for d in root.findall("disks/disk")}
    assert kinds["vdd"] == "bitmap" and all(kinds.get(t) in (None, "no") for t in ("vda", "vdb", "vdc")), kinds

    # the raw file disk is stored sparse-aware: its point holds about the data, not 24 MiB
    p_first = bdir / disks_of(full)["vda"]["image"]
    assert os.stat(p_first).st_blocks * 512 < 8 * MiB

    for pid, expected in want.items():
        assert_point_restores(bdir, pid, expected, tmp_path / f"restore-{pid}")
    r = cli("verify", bdir, "--json")
    assert r.rc == 0, r


def test_offline_raw_file_disk_is_read_by_the_private_qemu_and_a_network_disk_is_refused(conn, mixed, tmp_path):
    sd, bdir = mixed, tmp_path / "bk"
    sd.write("vda", 0x17, 2 * MiB, 3 * MiB)
    sd.write("vdd", 0x27, 0, 1 * MiB)
    scratch.stop_cleanly(sd)
    r = cli("backup", sd.name, bdir, "--json")
    assert r.rc != 0 and "disk vdc is a 'network' disk" in r.err and "--disk" in r.err, r
    assert not list((bdir / "points").glob("*")) if (bdir / "points").exists() else True

    res = backup(sd, bdir, "--disk", "vda", "--disk", "vdb", "--disk", "vdd")
    assert res["point"]["transport"] == "offline" and "shut off" in res["transport_reason"]
    d = disks_of(res)
    assert sorted(d) == ["vda", "vdb", "vdd"] and d["vda"]["copied_full"] is True
    # bytes written to the raw file directly (the domain is off): a later offline point holds them
    with open(sd.raw_file, "r+b") as f:          # type: ignore[attr-defined]
        f.seek(10 * MiB)
        f.write(b"\x5a" * MiB)
    sd.models["vda"].write(0x5A, 10 * MiB, MiB)
    res2 = backup(sd, bdir, "--disk", "vda", "--disk", "vdb", "--disk", "vdd")
    assert res2["point"]["level"] == "inc" and disks_of(res2)["vda"]["copied_full"] is True
    assert disks_of(res2)["vdd"]["copied_full"] is False
    exp = sd.expected()
    assert_point_restores(bdir, res2["point"]["id"], {t: exp[t] for t in ("vda", "vdb", "vdd")}, tmp_path / "r2")


def test_the_readme_recipe_a_qcow2_in_front_of_a_raw_volume_gives_small_incrementals(conn, tmp_path):
    """README/guide: `qemu-img create -f qcow2 -o data_file=RAW,data_file_raw=on` in front of a raw
    volume: the disk is qcow2 to libvirt (bitmaps, incrementals), the guest's bytes stay in the raw
    volume (still readable raw), and every point restores bit-exact."""
    work = tmp_path / "disks"
    work.mkdir()
    raw, front = work / "sys.raw", work / "sys.qcow2"
    with open(raw, "wb") as fh:
        fh.truncate(32 * MiB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={raw},data_file_raw=on",
                    str(front), str(32 * MiB)], check=True)
    sd = MixedDomain(conn, f"vbfront-{os.getpid()}", work, {"vda": disk_el("vda", "file", "qcow2", file=str(front))})
    sd.disk_sizes = {"vda": 32 * MiB}
    sd.models = {"vda": scratch.DiskModel(32 * MiB)}
    try:
        sd.create()
        bdir = tmp_path / "bk"
        sd.write("vda", 0x33, 0, 8 * MiB)
        full = backup(sd, bdir)
        assert full["point"]["transport"] == "pull" and "--mode auto pulls" in full["transport_reason"], full
        want = {full["point"]["id"]: sd.expected()}
        sd.write("vda", 0x44, 16 * MiB, 1 * MiB)
        inc = backup(sd, bdir)
        assert inc["point"]["level"] == "inc" and disks_of(inc)["vda"]["copied_full"] is False
        assert os.path.getsize(bdir / disks_of(inc)["vda"]["image"]) < 4 * MiB      # ~1 MiB of changes
        want[inc["point"]["id"]] = sd.expected()
        with open(raw, "rb") as fh:                 # the raw volume holds the guest's bytes
            fh.seek(16 * MiB)
            assert fh.read(MiB) == b"\x44" * MiB
        for pid, expected in want.items():
            assert_point_restores(bdir, pid, expected, tmp_path / f"restore-{pid}")
    finally:
        scratch.remove_domain(host.connect(), sd.name)
