"""The XML of a domain defined from a restore point: new identity, restored disks only."""

from __future__ import annotations

from pathlib import Path

import pytest
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


# A saved XML as someone with write access to the backup dir could leave it (hostile pass D9):
# every construct of libvirt's domaincommon.rng that names a host file, device, directory,
# socket or program, each pointing into /tmp/evil. Valid against domain.rng itself.
HOSTILE = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>orig</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='KiB'>65536</memory>
  <blkiotune><device><path>/tmp/evil/blk</path><weight>500</weight></device></blkiotune>
  <resource><partition>/tmp/evil/cgroup</partition></resource>
  <sysinfo type='fwcfg'><entry name='opt/com.example/x' file='/tmp/evil/fwcfg'/></sysinfo>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/tmp/evil/vmlinuz</kernel><initrd>/tmp/evil/initrd</initrd><dtb>/tmp/evil/dtb</dtb>
    <cmdline>console=ttyS0</cmdline>
    <acpi><table type='slic'>/tmp/evil/slic.dat</table></acpi>
  </os>
  <devices>
    <emulator>/tmp/evil/emulator.sh</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/tmp/evil/vda.qcow2'/><target dev='vda' bus='virtio'/>
      <mirror type='file' file='/tmp/evil/mirror.qcow2' format='qcow2' job='copy'/></disk>
    <disk type='network' device='cdrom'><driver name='qemu' type='raw'/>
      <source protocol='nbd' name='x'><host transport='unix' socket='/tmp/evil/nbd.sock'/></source>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='vhostuser'><mac address='52:54:00:12:34:57'/>
      <source type='unix' path='/tmp/evil/vhost.sock' mode='client'/><model type='virtio'/></interface>
    <interface type='ethernet'><target dev='evil0' managed='no'/><model type='virtio'/>
      <script path='/tmp/evil/ifup'/><downscript path='/tmp/evil/ifdown'/>
      <backend tap='/tmp/evil/tap' vhost='/tmp/evil/vhost-net'/><rom file='/tmp/evil/rom.bin'/></interface>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <input type='evdev'><source dev='/tmp/evil/event0'/></input>
    <input type='passthrough' bus='virtio'><source evdev='/tmp/evil/event1'/></input>
    <input type='tablet' bus='usb'/>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/tmp/evil/tpm0'/></backend></tpm>
    <tpm model='tpm-crb'><backend type='external'>
      <source type='unix' mode='connect' path='/tmp/evil/swtpm.sock'/></backend></tpm>
    <shmem name='evil'><model type='ivshmem-doorbell'/><server path='/tmp/evil/shmem.sock'/></shmem>
    <memory model='nvdimm'><source><path>/tmp/evil/nvdimm</path></source>
      <target><size unit='KiB'>524288</size><node>0</node></target></memory>
    <rng model='virtio'><backend model='random'>/tmp/evil/random</backend></rng>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <serial type='unix'><source mode='bind' path='/tmp/evil/serial.sock'/><target port='0'/></serial>
    <console type='pty'><log file='/tmp/evil/console.log'/><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/tmp/evil/agent.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' socket='/tmp/evil/vnc.sock'/>
    <graphics type='spice'><listen type='socket' socket='/tmp/evil/spice.sock'/>
      <gl enable='yes' rendernode='/tmp/evil/render'/></graphics>
    <video><model type='virtio'><acceleration accel3d='yes' rendernode='/tmp/evil/render2'/></model></video>
    <audio id='1' type='file' path='/tmp/evil/audio.wav'/>
    <sound model='ich9'><audio id='1'/></sound>
    <lease><lockspace>evil</lockspace><key>k</key><target path='/tmp/evil/lease'/></lease>
    <filesystem type='mount'><binary path='/tmp/evil/virtiofsd'/><source dir='/tmp/evil/share'/>
      <target dir='share'/></filesystem>
    <hostdev mode='capabilities' type='storage'><source><block>/tmp/evil/sdz</block></source></hostdev>
    <smartcard mode='host-certificates'><certificate>a</certificate><certificate>b</certificate>
      <certificate>c</certificate><database>/tmp/evil/nssdb</database></smartcard>
  </devices>
  <seclabel type='static' model='dac' relabel='yes'><label>+0:+0</label></seclabel>
  <launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>
  <qemu:commandline><qemu:arg value='-device'/><qemu:arg value='loader,file=/tmp/evil/blob'/>
    <qemu:env name='EVIL' value='/tmp/evil/env'/></qemu:commandline>
</domain>"""


def test_hostile_saved_xml_is_valid_libvirt_xml():
    from tests.unit.test_xml import rng, valid
    valid(rng("domain.rng"), HOSTILE)           # the test input is XML libvirt would accept


def test_restored_domain_takes_no_host_path_from_the_backup():
    """D9: the restored domain's XML keeps nothing of /tmp/evil (emulator, kernel, sockets, scripts,
    qemu:commandline ...), is still valid, and says what it dropped."""
    from tests.unit.test_xml import rng, valid
    xml, notes = restored_domain_xml(HOSTILE, "copy", {"vda": Path("/r/vda.qcow2")})
    valid(rng("domain.rng"), xml)
    assert "/tmp/evil" not in xml and "evil" not in xml, xml
    root = etree.fromstring(xml.encode())
    assert root.find("devices/emulator") is None            # libvirt picks this host's
    assert root.find("os/kernel") is None and root.find("os/cmdline") is None
    assert root.find("seclabel") is None and root.find("launchSecurity") is None
    assert not [el for el in root.iter() if isinstance(el.tag, str) and el.tag.startswith("{")]
    kept = {el.tag for el in root.find("devices")}
    for tag in ("tpm", "shmem", "memory", "lease", "filesystem", "hostdev", "smartcard", "serial", "audio"):
        assert tag not in kept, tag
    assert [i.get("type") for i in root.findall("devices/interface")] == ["ethernet", "network"]
    assert [i.get("type") for i in root.findall("devices/input")] == ["tablet"]
    assert [r.findtext("backend") for r in root.findall("devices/rng")] == ["/dev/urandom"]
    assert root.find("devices/sound/audio") is None
    assert [d.find("source").get("file") for d in root.findall("devices/disk") if d.find("source") is not None] \
        == ["/r/vda.qcow2"]
    assert any("emulator /tmp/evil/emulator.sh" in n for n in notes)
    assert any("direct kernel boot removed" in n for n in notes)
    assert any("commandline" in n for n in notes)


def test_drill_domain_takes_no_host_path_from_the_backup(tmp_path):
    from tests.unit.test_xml import rng, valid
    from virtbackup.drill import drill_domain_xml
    xml = drill_domain_xml(HOSTILE, "virtbackup-drill-x", {"vda": tmp_path / "vda.qcow2"}, tmp_path / "console.log")
    valid(rng("domain.rng"), xml)
    assert "evil" not in xml, xml


@pytest.mark.parametrize("os_xml", [
    "<loader readonly='yes' type='pflash'>/tmp/evil/OVMF_CODE.fd</loader>",
    "<loader readonly='yes' type='pflash'>/usr/share/OVMF/../../../tmp/evil/OVMF_CODE.fd</loader>",
    "<loader readonly='yes' type='pflash'>/usr/share/OVMF/no-such-firmware.fd</loader>",
    "<nvram template='/tmp/evil/VARS.fd'/>",
])
def test_firmware_outside_the_hosts_firmware_dirs_is_refused(os_xml):
    saved = SAVED.replace("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>", "") \
        .replace("<nvram>/var/lib/libvirt/qemu/nvram/orig_VARS.fd</nvram>", os_xml)
    with pytest.raises(ValueError, match="not a firmware file of this host"):
        restored_domain_xml(saved, "copy", {"vda": Path("/r/vda.qcow2")})


def test_firmware_of_the_host_and_kernels_of_named_boot_dirs_are_kept(tmp_path, monkeypatch):
    firmware = next((p for p in sorted(Path("/usr/share/OVMF").glob("OVMF_CODE*.fd")) if p.is_file()), None)
    if firmware is None:
        pytest.skip("no OVMF firmware on this host")
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    monkeypatch.setenv("VIRTBACKUP_BOOT_DIRS", str(tmp_path))
    saved = SAVED.replace("/usr/share/OVMF/OVMF_CODE.fd", str(firmware)).replace(
        "</os>", f"<kernel>{tmp_path}/vmlinuz</kernel><initrd>{tmp_path}/initrd</initrd><cmdline>quiet</cmdline></os>")
    xml, notes = restored_domain_xml(saved, "copy", {"vda": Path("/r/vda.qcow2")})
    root = etree.fromstring(xml.encode())
    assert root.findtext("os/loader") == str(firmware)
    assert root.findtext("os/kernel") == f"{tmp_path}/vmlinuz" and root.findtext("os/cmdline") == "quiet"
    assert not any("kernel" in n for n in notes)


def test_raw_block_and_network_disks_become_restored_qcow2_files():
    """D16: the disks now in every point (raw file, raw LVM/loop device, NBD/RBD network disk)
    are defined on their restored qcow2 files: no host device, network host or secret left."""
    saved = """<domain type='kvm'><name>orig</name><memory unit='KiB'>65536</memory>
      <os><type arch='x86_64' machine='q35'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
        <source file='/vm/sys.raw'/><target dev='vda' bus='virtio'/></disk>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/>
        <source dev='/dev/vg0/data'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <auth username='admin'><secret type='ceph' uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/></auth>
        <source protocol='rbd' name='pool/img'><host name='10.0.0.1' port='6789'/></source>
        <target dev='vdc' bus='virtio'/></disk>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='nbd'><host transport='unix' socket='/run/nbd.sock'/></source>
        <target dev='vdd' bus='virtio'/></disk>
      </devices></domain>"""
    images = {t: Path(f"/r/{t}.qcow2") for t in ("vda", "vdb", "vdc", "vdd")}
    xml, _ = restored_domain_xml(saved, "copy", images)
    root = etree.fromstring(xml.encode())
    for d in root.findall("devices/disk"):
        dev = d.find("target").get("dev")
        assert d.get("type") == "file" and d.find("driver").get("type") == "qcow2", dev
        assert [s.attrib for s in d.findall("source")] == [{"file": f"/r/{dev}.qcow2"}], dev
    assert "10.0.0.1" not in xml and "/dev/vg0" not in xml and "nbd.sock" not in xml and "/vm/" not in xml
    assert root.find("devices/disk/auth") is None, "a Ceph secret of the original has no use on a file"


def test_a_live_restore_domain_is_defined_with_its_record_and_never_inherits_one():
    """D8: the record is in the XML that is defined (a kill after the define can't lose it); a
    point of a domain that was itself being live-restored does not carry the original's record."""
    from virtbackup.virt.restoredom import LIVE_NS
    inherited = SAVED.replace("<memory unit='KiB'>65536</memory>", f"""<memory unit='KiB'>65536</memory>
      <metadata><l:live xmlns:l='{LIVE_NS}' backup-dir='/other' point='0009'>
        <l:disk target='vda' overlay='/elsewhere/vda.qcow2'/></l:live>
        <app:x xmlns:app='https://example.org/app'>kept</app:x></metadata>""")
    xml, notes = restored_domain_xml(inherited, "copy", {"vda": Path("/r/vda.qcow2")})
    assert "/elsewhere" not in xml and "kept" in xml and any("live-restore record" in n for n in notes)
    xml, _ = restored_domain_xml(inherited, "copy", {"vda": Path("/r/vda.qcow2")}, live=("/b/dir", "0003"))
    root = etree.fromstring(xml.encode())
    recs = root.findall(f"metadata/{{{LIVE_NS}}}live")
    assert len(recs) == 1 and recs[0].get("backup-dir") == "/b/dir" and recs[0].get("point") == "0003"
    assert [(d.get("target"), d.get("overlay")) for d in recs[0]] == [("vda", "/r/vda.qcow2")]
    assert "/elsewhere" not in xml and "kept" in xml
