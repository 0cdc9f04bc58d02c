"""The XML of a domain defined from a restore point: new identity, restored disks only."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from virtbackup.virt.restoredom import restored_domain_xml

SAVED = """<domain type='kvm'>
  <name>orig</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <genid>aaaaaaaa-2222-3333-4444-555555555555</genid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/orig_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/vm/orig-vda.qcow2'/><backingStore/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='qcow2'/>
      <source dev='/dev/vg/orig-vdb'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/vm/orig-scratch.raw'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/orig.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


def test_new_identity_and_only_restored_disks():
    xml, notes = restored_domain_xml(SAVED, "copy", {"vda": Path("/r/vda.qcow2"), "vdb": Path("/r/vdb.qcow2")},
                                     uuid="99999999-2222-3333-4444-555555555555")
    root = etree.fromstring(xml.encode())
    assert root.findtext("name") == "copy"
    assert root.findtext("uuid") == "99999999-2222-3333-4444-555555555555"
    assert not root.findtext("genid")
    assert root.find("os/nvram") is None and root.find("os/loader") is not None
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"
    assert "path" not in root.find("devices/channel/source").attrib
    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}
    assert sorted(disks) == ["sda", "vda", "vdb"]                 # vdc (not restored) is gone
    for dev in ("vda", "vdb"):
        d = disks[dev]
        assert d.get("type") == "file" and d.find("driver").get("type") == "qcow2"
        assert [s.attrib for s in d.findall("source")] == [{"file": f"/r/{dev}.qcow2"}]
        assert d.find("backingStore") is None
    assert disks["sda"].find("source") is None                    # cdrom kept, ejected
    assert "/vm/" not in xml and "/dev/vg" not in xml
    assert any("vdc" in n for n in notes) and any("NVRAM" in n for n in notes)


def test_generated_uuid_differs():
    a, _ = restored_domain_xml(SAVED, "a", {"vda": Path("/r/vda.qcow2")})
    b, _ = restored_domain_xml(SAVED, "b", {"vda": Path("/r/vda.qcow2")})
    ua = etree.fromstring(a.encode()).findtext("uuid")
    assert ua != etree.fromstring(b.encode()).findtext("uuid") and ua != "11111111-2222-3333-4444-555555555555"


def test_host_resources_of_the_original_are_dropped():
    saved = SAVED.replace("</devices>", """
    <filesystem type='mount' accessmode='passthrough'><source dir='/srv/share'/><target dir='share'/></filesystem>
    <serial type='file'><source path='/var/log/orig-serial.log'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0x5678'/></source></hostdev>
    <redirdev bus='usb' type='spicevmc'/>
  </devices>""")
    xml, notes = restored_domain_xml(saved, "copy", {"vda": Path("/r/vda.qcow2")})
    root = etree.fromstring(xml.encode())
    for tag in ("filesystem", "serial", "hostdev", "redirdev"):
        assert root.find(f"devices/{tag}") is None, tag
    assert root.find("devices/console").get("type") == "pty"       # harmless: kept
    assert "/srv/share" not in xml and "orig-serial.log" not in xml
    assert any("filesystem" in n for n in notes)


def test_hot_plugged_disk_is_attached_with_a_note():
    xml, notes = restored_domain_xml(SAVED, "new", {"vda": Path("/r/vda.qcow2"), "vdd": Path("/r/vdd.qcow2"),
                                                    "qqa": Path("/r/qqa.qcow2")})
    root = etree.fromstring(xml.encode())
    disks = {d.find("target").get("dev"): d for d in root.iter("disk")}
    assert disks["vdd"].find("source").get("file") == "/r/vdd.qcow2"
    assert disks["vdd"].find("target").get("bus") == "virtio"
    assert disks["vdd"].find("driver").get("type") == "qcow2"
    assert "qqa" not in disks
    assert any("vdd" in n and "hot-plugged" in n for n in notes)
    assert any("qqa" in n and "not attached" in n for n in notes)
