"""Hostile pass D9 (issue 22): the XML files beside the images are integrity-checked like the
images, and a restored or drilled domain takes no host path from the backup directory.

A hand-edited points/0001/domain.xml whose <emulator> is a script (one that would leave a marker
file when run) is refused by verify, restore --define and verify --boot before anything is
defined or started; a hand-edited checkpoint.xml is refused by verify, restore and a prune that
would copy it. Where the metadata has no XML digests (older points, or an edited virtbackup.json),
the restored domain still never runs the backup's emulator: libvirt takes this host's. Scratch
domains (no guest OS); nothing is booted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import libvirt
import pytest
from lxml import etree

from tests.support.helpers import cli, one_error_line, snapshot_dir

MiB = 1 << 20


@pytest.fixture
def evil() -> Iterator[Path]:
    """A world-reachable dir with `emulator.sh`: it touches `ran` and then runs the real QEMU
    (libvirt probes an emulator as root or as its QEMU user: either can write here)."""
    d = Path(tempfile.mkdtemp(prefix="vb-d9-"))
    d.chmod(0o1777)
    qemu = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    script = d / "emulator.sh"
    script.write_text(f"#!/bin/sh\ntouch {d}/ran\nexec {qemu} \"$@\"\n")
    script.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def with_emulator(xml: str, emulator: Path) -> str:
    root = etree.fromstring(xml.encode())
    root.find("devices/emulator").text = str(emulator)
    return etree.tostring(root, encoding="unicode")


def defined(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def drill_domains(conn: libvirt.virConnect) -> list:
    return [d.name() for d in conn.listAllDomains() if d.name().startswith("virtbackup-drill-")]


def test_hand_edited_point_xml_is_refused_and_its_emulator_never_runs(make_domain, conn, tmp_path, evil,
                                                                      restored_domains):  # noqa: F811
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x31, 0, 1 * MiB)
    bdir = tmp_path / "bk"
    for level in ("full", "inc"):
        r = cli("backup", d.name, bdir, "--level", level, "--json")
        assert r.rc == 0, r
    meta = json.loads((bdir / "virtbackup.json").read_text())
    for p in meta["points"]:                    # recorded at the commit, like the images' digests
        for k in ("domain_xml_digest", "checkpoint_xml_digest"):
            assert p[k]["algorithm"] == "blake3" and len(p[k]["value"]) == 64, p
    dom_xml = bdir / "points/0001/domain.xml"
    cp_xml = bdir / "points/0001/checkpoint.xml"
    pristine_dom, pristine_cp = dom_xml.read_bytes(), cp_xml.read_bytes()
    assert cli("verify", bdir).rc == 0

    dom_xml.write_text(with_emulator(pristine_dom.decode(), evil / "emulator.sh"))
    for args in (("verify", bdir), ("verify", bdir, "--deep"), ("verify", bdir, "--point", "0001")):
        r = cli(*args)
        assert r.rc == 1 and "points/0001/domain.xml (point 0001)" in one_error_line(r), r
    r = cli("verify", bdir, "--json")
    assert r.rc == 1 and r.json()["damaged_points"] == ["0001"], r
    assert {"point": "0001", "disk": "", "image": "points/0001/domain.xml",
            "problem": "content hash (blake3) differs from the one recorded at backup time"} in r.json()["damage"]

    name = f"{d.name}-r"
    restored_domains.append(name)
    before = snapshot_dir(bdir)
    out = tmp_path / "out"
    r = cli("restore", bdir, out, "--point", "0001", "--define", name)
    line = one_error_line(r)
    assert r.rc == 1 and "points/0001/domain.xml" in line and "nothing was restored" in line, r
    assert not defined(conn, name) and not out.exists()
    r = cli("restore", bdir, out, "--point", "0001", "--instant", "--define", name)
    assert r.rc == 1 and not defined(conn, name) and not out.exists(), r

    # verify --boot refuses before it defines or starts anything (the XML check comes first)
    r = cli("verify", bdir, "--point", "0001", "--boot", "--timeout", "5")
    assert r.rc == 1 and "points/0001/domain.xml" in one_error_line(r) and "nothing was started" in r.err, r
    assert drill_domains(conn) == []
    assert snapshot_dir(bdir) == before
    # another point's XML is intact: it restores
    r = cli("restore", bdir, tmp_path / "out2", "--point", "0002")
    assert r.rc == 0, r

    # a hand-edited checkpoint XML: refused like the domain XML, also by a prune that copies it
    dom_xml.write_bytes(pristine_dom)
    assert cli("verify", bdir).rc == 0
    cp_xml.write_bytes(pristine_cp.replace(b"</domaincheckpoint>", b"<!-- edited --></domaincheckpoint>"))
    r = cli("verify", bdir)
    assert r.rc == 1 and "points/0001/checkpoint.xml (point 0001)" in one_error_line(r), r
    r = cli("restore", bdir, out, "--point", "0001", "--define", name)
    assert r.rc == 1 and "points/0001/checkpoint.xml" in one_error_line(r) and not defined(conn, name), r
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "1")       # 0002 would take over 0001's checkpoint XML
    line = one_error_line(r)
    assert r.rc == 1 and "points/0001/checkpoint.xml" in line and "nothing was changed" in line, r
    assert snapshot_dir(bdir) == before
    cp_xml.write_bytes(pristine_cp)

    assert not (evil / "ran").exists(), "the backup's emulator script was run"


def test_without_xml_digests_the_restored_domain_still_takes_this_hosts_emulator(make_domain, conn, tmp_path,
                                                                                evil, restored_domains):  # noqa: F811
    """Older metadata (no XML digests; here removed by hand, as whoever edits domain.xml can):
    the edited XML is accepted as before, but the restored domain gets libvirt's emulator for
    this host (libvirt 9.0 fills <emulator> in on define), not the script."""
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    assert cli("backup", d.name, bdir, "--json").rc == 0
    meta_path = bdir / "virtbackup.json"
    meta = json.loads(meta_path.read_text())
    for p in meta["points"]:
        del p["domain_xml_digest"], p["checkpoint_xml_digest"]
    meta_path.write_text(json.dumps(meta))
    dom_xml = bdir / "points/0001/domain.xml"
    host_emulator = etree.fromstring(dom_xml.read_bytes()).findtext("devices/emulator")
    dom_xml.write_text(with_emulator(dom_xml.read_text(), evil / "emulator.sh"))
    assert cli("verify", bdir).rc == 0                  # nothing recorded to compare with
    name = f"{d.name}-r"
    restored_domains.append(name)
    r = cli("restore", bdir, tmp_path / "out", "--define", name)
    assert r.rc == 0 and f"emulator {evil}/emulator.sh not taken from the backup" in r.err, r
    got = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode()).findtext("devices/emulator")
    assert got == host_emulator and "vb-d9-" not in got
    assert not (evil / "ran").exists(), "the backup's emulator script was run"
