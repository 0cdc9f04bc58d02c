"""Generated XML validates against libvirt's own RelaxNG schemas and matches the golden files."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtbackup.virt import xmlbuild

SCHEMAS = Path("/usr/share/libvirt/schemas")
GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def rng(name: str) -> etree.RelaxNG:
    if not (SCHEMAS / name).exists():
        pytest.fail(f"libvirt schema {SCHEMAS / name} missing: run scripts/setup-host.sh")
    return etree.RelaxNG(etree.parse(str(SCHEMAS / name)))


def valid(schema: etree.RelaxNG, xml: str) -> None:
    doc = etree.fromstring(xml.encode())
    assert schema.validate(doc), schema.error_log


def test_full_backup_xml():
    xml = xmlbuild.backup_xml([xmlbuild.BackupDisk("vda", Path("/b/points/0001.partial/vda.qcow2")),
                               xmlbuild.BackupDisk("vdb", Path("/b/points/0001.partial/vdb.qcow2"))], None)
    valid(rng("domainbackup.rng"), xml)
    assert xml == (GOLDEN / "backup-full.xml").read_text()


def test_incremental_backup_xml_with_a_disk_copied_whole_and_one_left_out():
    xml = xmlbuild.backup_xml([xmlbuild.BackupDisk("vda", Path("/b/p/vda.qcow2")),
                               xmlbuild.BackupDisk("vdb", Path("/b/p/vdb.qcow2"), full=True),
                               xmlbuild.BackupDisk("sdc", None)], "virtbackup-0a1b2c3d-0001")
    valid(rng("domainbackup.rng"), xml)
    assert xml == (GOLDEN / "backup-inc.xml").read_text()
    root = etree.fromstring(xml.encode())
    assert root.findtext("incremental") == "virtbackup-0a1b2c3d-0001"
    assert root.find("disks/disk[@name='vdb']").get("backupmode") == "full"
    assert root.find("disks/disk[@name='vda']").get("backupmode") is None


def test_paths_with_spaces_and_quotes_are_escaped_not_broken():
    xml = xmlbuild.backup_xml([xmlbuild.BackupDisk("vda", Path("/b/my \"dir\" & <x>/vda.qcow2"))], None)
    valid(rng("domainbackup.rng"), xml)
    assert etree.fromstring(xml.encode()).find("disks/disk/target").get("file") == "/b/my \"dir\" & <x>/vda.qcow2"


def test_checkpoint_xml():
    xml = xmlbuild.checkpoint_xml("virtbackup-0a1b2c3d-0002", "virtbackup inc backup 0002 into /b",
                                  {"vda": True, "vdb": False})
    valid(rng("domaincheckpoint.rng"), xml)
    assert xml == (GOLDEN / "checkpoint.xml").read_text()


def test_redefine_xml_replaces_parent():
    saved = ("<domaincheckpoint><name>c2</name><parent><name>gone</name></parent>"
             "<creationTime>1</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='c2'/></disks>"
             "</domaincheckpoint>")
    out = etree.fromstring(xmlbuild.redefine_xml(saved, "c1").encode())
    assert [p.findtext("name") for p in out.findall("parent")] == ["c1"]
    valid(rng("domaincheckpoint.rng"), xmlbuild.redefine_xml(saved, "c1"))
    assert etree.fromstring(xmlbuild.redefine_xml(saved, None).encode()).find("parent") is None


def test_pull_full_over_unix_socket():
    xml = xmlbuild.pull_backup_xml(
        [xmlbuild.PullDisk("vda", "/var/tmp/s/virtbackup-0a1b2c3d-0001-vda.scratch"),
         xmlbuild.PullDisk("vdb", "/var/tmp/s/virtbackup-0a1b2c3d-0001-vdb.scratch")],
        None, xmlbuild.NbdServer(socket="/run/virtbackup/nbd-x.sock"))
    valid(rng("domainbackup.rng"), xml)
    assert xml == (GOLDEN / "backup-pull-full.xml").read_text()


def test_pull_incremental_over_tcp_with_tls_and_a_disk_copied_whole():
    xml = xmlbuild.pull_backup_xml([xmlbuild.PullDisk("vda", "/i/c-vda.scratch"),
                                    xmlbuild.PullDisk("vdb", "/i/c-vdb.scratch", full=True)],
                                   "virtbackup-0a1b2c3d-0001",
                                   xmlbuild.NbdServer(host="hv1.example.org", port=10809, tls=True))
    valid(rng("domainbackup.rng"), xml)
    assert xml == (GOLDEN / "backup-pull-inc.xml").read_text()
    root = etree.fromstring(xml.encode())
    assert root.find("server").attrib == {"transport": "tcp", "name": "hv1.example.org", "port": "10809",
                                          "tls": "yes"}
    vda, vdb = root.findall("disks/disk")
    assert vda.get("exportbitmap") == "backup-vda" and vda.get("exportname") == "vda"
    assert vdb.get("backupmode") == "full" and vdb.get("exportbitmap") is None


def test_scratch_paths_are_escaped():
    xml = xmlbuild.pull_backup_xml([xmlbuild.PullDisk("vda", "/s/a \"b\" & <c>.scratch")], None,
                                   xmlbuild.NbdServer(socket="/run/x.sock"))
    valid(rng("domainbackup.rng"), xml)
    assert etree.fromstring(xml.encode()).find("disks/disk/scratch").get("file") == "/s/a \"b\" & <c>.scratch"
