"""Pure logic of issue 11: `--quiesce` alone, the drill domain's XML, the consistency field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from tests.unit.test_restore_xml import SAVED
from tests.unit.test_xml import rng, valid
from virtbackup.cli import optional_quiesce_value
from virtbackup.drill import drill_domain_xml
from virtbackup.store.chain import Chain
from virtbackup.virt.quiesce import has_agent_channel


@pytest.mark.parametrize("argv, want", [
    (["backup", "d", "/b", "--quiesce"], ["backup", "d", "/b", "--quiesce=require"]),
    (["backup", "--quiesce", "d", "/b"], ["backup", "--quiesce=require", "d", "/b"]),
    (["backup", "d", "/b", "--quiesce", "off"], ["backup", "d", "/b", "--quiesce", "off"]),
    (["backup", "d", "/b", "--quiesce", "auto", "--json"], ["backup", "d", "/b", "--quiesce", "auto", "--json"]),
    (["backup", "d", "/b", "--quiesce=off"], ["backup", "d", "/b", "--quiesce=off"]),
    (["-c", "qemu:///system", "backup", "d", "/b", "--quiesce", "--json"],
     ["-c", "qemu:///system", "backup", "d", "/b", "--quiesce=require", "--json"]),
    (["backup", "d", "/b", "--", "--quiesce"], ["backup", "d", "/b", "--", "--quiesce"]),
    (["list", "/b"], ["list", "/b"]),
])
def test_bare_quiesce_means_require(argv, want):
    assert optional_quiesce_value(argv) == want


DRILL_SAVED = SAVED.replace("<domain type='kvm'>", "<domain type='qemu'>").replace("</devices>", """
    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
    <graphics type='vnc' port='5901'/>
    <serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.example.other'/></channel>
  </devices>""")


def test_drill_domain_has_nothing_of_the_host_and_keeps_type_and_agent():
    xml = drill_domain_xml(DRILL_SAVED, "virtbackup-drill-x", {"vda": Path("/tmp/d/vda.qcow2")},
                           Path("/tmp/d/console.log"))
    valid(rng("domain.rng"), xml)
    root = etree.fromstring(xml.encode())
    assert root.get("type") == "qemu"                       # TCG guests stay TCG
    assert root.findtext("name") == "virtbackup-drill-x"
    assert root.findtext("uuid") != "11111111-2222-3333-4444-555555555555"
    dev = root.find("devices")
    for tag in ("interface", "hostdev", "filesystem", "graphics"):
        assert dev.find(tag) is None, tag
    assert [d.find("source").get("file") for d in dev.findall("disk") if d.get("device") == "disk"] == \
        ["/tmp/d/vda.qcow2"]
    chans = dev.findall("channel")
    assert [c.find("target").get("name") for c in chans] == ["org.qemu.guest_agent.0"]
    assert chans[0].find("source") is None or chans[0].find("source").get("path") is None
    serials = dev.findall("serial")
    assert len(serials) == 1 and serials[0].get("type") == "file"
    assert serials[0].find("source").get("path") == "/tmp/d/console.log"
    assert has_agent_channel(xml)
    assert not has_agent_channel(SAVED.replace("org.qemu.guest_agent.0", "org.example.x"))


def _chain_json(**point_extra) -> dict:
    point = {"id": "0001", "level": "full", "created": "2026-11-30T09:00:00+00:00", "checkpoint": "c1",
             "base_checkpoint": None, "parent": None, "chain": "0001",
             "disks": {"vda": {"image": "points/0001/vda.qcow2", "backing": None, "virtual_size": 1,
                               "size": 1, "sha256": "0" * 64}},
             "domain_xml": "points/0001/domain.xml", "checkpoint_xml": "points/0001/checkpoint.xml",
             **point_extra}
    return {"domain_name": "d", "domain_uuid": "u", "dir_id": "ab", "points": [point], "next_seq": 2, "schema": 1}


def test_metadata_without_consistency_still_loads():
    chain = Chain.from_json(json.loads(json.dumps(_chain_json())))
    p = chain.points[0]
    assert (p.consistency, p.consistency_reason, p.frozen_seconds) == (None, None, None)


def test_consistency_is_kept_and_checked():
    chain = Chain.from_json(_chain_json(consistency="application", consistency_reason="froze 1",
                                        frozen_seconds=0.1))
    assert Chain.from_json(json.loads(json.dumps(chain.to_json()))).points[0].consistency == "application"
    with pytest.raises(ValueError, match="unknown consistency"):
        Chain.from_json(_chain_json(consistency="sort-of"))


def test_drill_and_quiesce_usage_errors_change_nothing(tmp_path):
    from tests.support.helpers import cli
    for args, text in ((["verify", tmp_path, "--check", "true"], "--check needs --boot"),
                       (["verify", tmp_path, "--boot", "--deep"], "--boot and --deep"),
                       (["verify", tmp_path, "--boot", "--timeout", "0"], "--timeout must be a positive"),
                       (["backup", "d", tmp_path / "b", "--quiesce", "sometimes"], "unexpected extra argument"),
                       (["backup", "d", tmp_path / "b", "--quiesce=sometimes"], "unknown quiesce mode")):
        r = cli(*args)
        assert r.rc == 2, (args, r)
        assert text in r.err, (args, r)
    assert sorted(tmp_path.iterdir()) == []


class _FakeDom:
    def isActive(self) -> int:  # noqa: N802 - libvirt's names
        return 1

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802
        return ("<domain><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
                "</channel></devices></domain>")

    def name(self) -> str:
        return "vm1"

    def UUIDString(self) -> str:  # noqa: N802
        return "11111111-2222-3333-4444-555555555555"


def test_the_guest_is_thawed_even_when_saying_so_fails(tmp_path, monkeypatch):
    """Hostile pass D4: with stderr on a full device (2>/dev/full) the 'froze' message raised
    outside the block that thaws, and the guest stayed frozen. Saying things never raises now,
    and the message is inside the block."""
    from virtbackup.virt import quiesce

    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(tmp_path))
    sent = []
    monkeypatch.setattr(quiesce, "agent_command", lambda dom, cmd, arguments=None, timeout=5: sent.append(cmd) or 1)

    def full(_msg: str) -> None:
        raise OSError(28, "No space left on device")

    q = quiesce.Quiescer(_FakeDom(), "require", full)   # type: ignore[arg-type]
    q.check()
    with q.frozen():
        assert sent == ["guest-fsfreeze-freeze"]
    assert sent == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert q.result.consistency == "application"
    assert not list(tmp_path.glob("frozen-*"))           # the marker went with the thaw


def test_say_survives_a_broken_stderr(monkeypatch):
    """A `run` child whose parent was killed writes into a closed pipe; a full device likewise."""
    import io

    from virtbackup.cli import _common

    class Broken(io.StringIO):
        def write(self, _s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(_common.sys, "stderr", Broken())
    _common.say("warning: this goes nowhere, and that is no reason to stop")
