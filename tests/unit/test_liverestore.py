"""The live-restore record kept in a domain's <metadata> (pure XML logic; a stub stands in for
the domain object, which only hands back the XML libvirt stored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackup import liverestore
from virtbackup.errors import OperationFailed

SECRET = "0b6e3a52-7c1e-4d2a-9a8e-2f1c0d9e8b7a"


class StubDomain:
    def __init__(self, xml: str):
        self.xml = xml

    def metadata(self, _type: int, _uri: str, _flags: int) -> str:
        return self.xml

    def name(self) -> str:
        return "stub"


def test_record_round_trip():
    images = {"vdb": Path("/out/vdb.qcow2"), "vda": Path("/out/vda.qcow2")}
    xml = liverestore._record_xml("/backups/web", "0007", images)
    assert liverestore._read_record(StubDomain(xml)) == ("/backups/web", "0007", images, None)
    # an encrypted backup's: the UUID of the secret its domain XML names
    xml = liverestore._record_xml("/backups/web", "0007", images, secret=SECRET)
    rec = liverestore._read_record(StubDomain(xml))
    assert rec is not None and rec.secret == SECRET and rec.images == images


def test_resume_hint_names_the_key_for_an_encrypted_backup():
    assert liverestore.resume_hint("web") == "virtbackup restore --resume-live web"
    assert liverestore.resume_hint("web", True) == "virtbackup restore --resume-live web --key-file FILE"


@pytest.mark.parametrize("xml", ["<live backup-dir='/b' point='0001'/>",                        # no disks
                                 "<live backup-dir='/b' point='0001'><disk target='vda' overlay='rel.qcow2'/></live>",
                                 "<live><disk",
                                 "<live backup-dir='/b' point='0001' secret='x\"/../y'>"       # not a UUID
                                 "<disk target='vda' overlay='/o/vda.qcow2'/></live>"])
def test_damaged_record_is_refused(xml):
    with pytest.raises(OperationFailed, match="damaged live-restore record"):
        liverestore._read_record(StubDomain(xml))


def _encrypted_chain(tmp_path: Path, key: bytes) -> None:
    from tests.unit.test_crypto import sample
    from virtbackup.qemu import keys
    from virtbackup.store import crypto
    from virtbackup.store.chain import BackupDir
    chain = sample()
    chain.encryption = crypto.ChainEncryption.new(keys.Key(key, "t"), 10)
    for p in chain.points:
        p.encryption = "luks"
    BackupDir(tmp_path).save(chain)


def test_resume_of_an_encrypted_live_restore_needs_its_key(tmp_path):
    """Exit 2 before anything: no key, a wrong key, or a key for a plain backup's live restore."""
    from virtbackup.errors import UsageError
    from virtbackup.qemu import keys
    _encrypted_chain(tmp_path, b"right\n")
    images = {"vda": Path("/o/vda.qcow2")}
    enc = liverestore.LiveRecord(str(tmp_path), "0001", images, SECRET)
    plain = liverestore.LiveRecord(str(tmp_path), "0001", images)
    with pytest.raises(UsageError, match=r"encrypted backup; give its key: .*--resume-live web --key-file FILE"):
        liverestore._check_resume_key("web", enc, None)
    with pytest.raises(UsageError, match="key check failed"):
        liverestore._check_resume_key("web", enc, keys.Key(b"wrong\n", "k"))
    liverestore._check_resume_key("web", enc, keys.Key(b"right\n", "k"))
    liverestore._check_resume_key("web", plain, None)
    with pytest.raises(UsageError, match="not encrypted"):
        liverestore._check_resume_key("web", plain, keys.Key(b"right\n", "k"))


SAVED = """<domain type='kvm'><name>orig</name><memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/vm/orig-vda.qcow2'/><backingStore type='file'><format type='qcow2'/>
      <source file='/vm/base.qcow2'/><backingStore/></backingStore><target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""


def test_an_encrypted_live_restore_names_every_backing_layer_with_its_secret():
    """libvirt probes a backing chain it is not given, and a probed chain has no key: the XML
    spells out each overlay's chain (top first, ending in <backingStore/>), every layer with the
    secret; valid against libvirt's domain.rng; the record names the secret."""
    from lxml import etree

    from tests.unit.test_xml import rng, valid
    from virtbackup.virt.restoredom import LIVE_NS, restored_domain_xml
    chains = {"vda": [Path("/b/points/0002/vda.qcow2"), Path("/b/points/0001/vda.qcow2")],
              "vdb": [Path("/b/points/0001/vdb.qcow2")]}
    xml, notes = restored_domain_xml(SAVED, "copy", {"vda": Path("/r/vda.qcow2"), "vdb": Path("/r/vdb.qcow2")},
                                     live=("/b", "0002"), backing=chains, secret=SECRET)
    valid(rng("domain.rng"), xml)
    root = etree.fromstring(xml.encode())
    for disk in root.findall("devices/disk"):
        dev = disk.find("target").get("dev")
        assert [s.get("file") for s in disk.findall("source")] == [f"/r/{dev}.qcow2"]
        layers, node = [], disk
        while True:
            stores = node.findall("backingStore")
            assert len(stores) == 1, dev
            node = stores[0]
            if node.find("source") is None:
                assert len(node) == 0             # <backingStore/>: the chain ends here
                break
            assert node.get("type") == "file" and node.find("format").get("type") == "qcow2"
            enc = node.find("source/encryption")
            assert enc.get("format") == "luks"
            assert [(s.get("type"), s.get("uuid")) for s in enc.findall("secret")] == [("passphrase", SECRET)]
            layers.append(Path(node.find("source").get("file")))
        assert layers == chains[dev], dev         # the original's /vm/base.qcow2 is gone
    assert "/vm/" not in xml
    rec = root.find(f"metadata/{{{LIVE_NS}}}live")
    assert rec is not None and rec.get("secret") == SECRET
    # a plain live restore: no chain, no secret, no <encryption> anywhere
    xml, _ = restored_domain_xml(SAVED, "copy", {"vda": Path("/r/vda.qcow2")}, live=("/b", "0002"))
    assert "<encryption" not in xml and "secret" not in xml and "<backingStore" not in xml
    with pytest.raises(ValueError):
        restored_domain_xml(SAVED, "copy", {"vda": Path("/r/vda.qcow2")}, backing=chains, secret=SECRET)
    with pytest.raises(ValueError):
        restored_domain_xml(SAVED, "copy", {"vda": Path("/r/vda.qcow2")}, live=("/b", "0002"), backing=chains)
