"""virt/domxml.py: the one typed view of domain XML (reading and the edits restore and drills make)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtbackup.errors import OperationFailed
from virtbackup.virt.domxml import DomainXML
from virtbackup.virt.host import domain_disks

LIVE = """<domain type='kvm' id='3'>
  <name>web1</name><uuid>0b7c7d2e-8c1e-4a51-9d55-2b0b3c8f0e11</uuid><genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='raw'/><source file='/images/base.raw'/></backingStore>
      <target dev='vda' bus='virtio'/><alias name='virtio-disk0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/><source dev='/dev/vg0/data' index='1'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/><source protocol='rbd' name='pool/img'/><target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/x.qcow2'/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
    <channel type='unix'><source mode='bind' path='/run/x.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <hostdev mode='subsystem' type='pci'/>
    <serial type='file'><source path='/var/log/web1.log'/><target port='0'/></serial>
  </devices>
</domain>"""


def test_reads_disks_of_every_kind():
    d = DomainXML.parse(LIVE)
    by = {x.target: x for x in d.disks}
    assert by["vda"].source == "/var/lib/libvirt/images/web1.qcow2" and by["vda"].format == "qcow2"
    assert by["vda"].source_index == 2 and by["vda"].alias == "virtio-disk0"
    assert by["vda"].backing_source == "/images/base.raw"
    assert (by["vdb"].type, by["vdb"].source, by["vdb"].format, by["vdb"].backing_source) == \
        ("block", "/dev/vg0/data", "raw", None)
    assert (by["vdc"].type, by["vdc"].source) == ("network", "pool/img")
    assert (by["sda"].device, by["sda"].source) == ("cdrom", None)
    assert None in by                     # a disk without target is seen here; domain_disks skips it
    assert [x.target for x in domain_disks(LIVE)] == ["vda", "vdb", "vdc", "sda"]
    assert d.emulator == "/usr/bin/qemu-system-x86_64" and d.machine == "pc-q35-7.2"
    assert d.has_agent_channel and d.disk("vdb") is not None and d.disk("vdz") is None


def test_edits_restore_and_drills_make(tmp_path: Path):
    d = DomainXML.parse(LIVE)
    d.set_identity("copy", "11111111-2222-3333-4444-555555555555")
    assert d.drop_nvram() and not d.drop_nvram()
    d.drop_macs()
    d.drop_channel_paths()
    assert len(d.remove_devices("hostdev")) == 1
    assert [e.get("type") for e in d.remove_devices("serial", lambda e: e.get("type") == "file")] == ["file"]
    vda = d.disk("vda")
    assert vda is not None
    vda.set_file_source(tmp_path / "vda.qcow2")
    cd = d.disk("sda")
    assert cd is not None
    cd.eject()
    d.add_file_disk("vdd", "virtio", tmp_path / "vdd.qcow2")
    root = etree.fromstring(d.to_string().encode())
    assert root.findtext("name") == "copy" and root.findtext("uuid").startswith("1111")
    assert root.find("genid").text is None and root.find("os/nvram") is None
    assert root.find("devices/interface/mac") is None and "path" not in root.find("devices/channel/source").attrib
    vda_el = [x for x in root.findall("devices/disk") if x.find("target") is not None
              and x.find("target").get("dev") == "vda"][0]
    assert vda_el.find("backingStore") is None and vda_el.find("source").get("file") == str(tmp_path / "vda.qcow2")
    assert [c.tag for c in vda_el][:2] == ["driver", "source"]
    assert DomainXML.parse(d.to_string()).disk("vdd").source == str(tmp_path / "vdd.qcow2")  # type: ignore


def test_bad_xml_is_lxmls_error_and_no_devices_ours():
    with pytest.raises(etree.XMLSyntaxError):
        DomainXML.parse("<domain><devices>")
    with pytest.raises(OperationFailed, match="no <devices>"):
        DomainXML.parse("<domain><name>x</name></domain>").drop_macs()
