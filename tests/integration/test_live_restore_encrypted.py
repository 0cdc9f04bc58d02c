"""Live restore of an encrypted chain (issue 23 part 4) against real libvirtd and QEMU: the
domain runs at once on plain overlays whose backing chain is the LUKS point images, opened with
an ephemeral libvirt secret that lives only while virtbackup works on the domain; the restored
disks end up plain and bit-exact; a wrong key is refused before anything is defined; a killed
run's secret goes with the resume, which needs the key.

Every CLI run here gets VIRTBACKUP_ENCRYPT_ITER_TIME=10 (see test_encryption.py).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import libvirt
import pytest
from lxml import etree

from tests.support import scratch
from tests.support.helpers import (
    ROOT,
    cli,
    cli_bg,
    header_backing,
    hmp_write,
    lookup_domain,
    one_error_line,
    patched,
    pulling,
    snapshot_dir,
    wait_for,
)
from virtbackup import liverestore
from virtbackup.qemu import qemu_img
from virtbackup.store import crypto
from virtbackup.virt import host, keysecret

MiB = 1 << 20
KiB = 1 << 10
CANARY = b"canary-5e0b77 live passphrase\n"


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch):
    monkeypatch.setenv(crypto.ITER_TIME_ENV, "10")


@pytest.fixture
def live(restored_domains: List[str]) -> Iterator[List[str]]:
    """Domains a test defines by restoring (removed by restored_domains), and their key's
    secrets: removed afterwards, also when the test failed (fresh connection)."""
    yield restored_domains
    conn = host.connect()
    try:
        for n in restored_domains:
            dom = lookup_domain(conn, n)
            if dom is not None and dom.isActive():
                dom.destroy()           # its secrets go only once nothing uses them
            for uuid in secrets_for(conn, n):
                try:
                    conn.secretLookupByUUIDString(uuid).undefine()
                except libvirt.libvirtError:
                    pass
    finally:
        conn.close()


def secrets_for(conn: libvirt.virConnect, name: str) -> List[str]:
    """virtbackup's secrets made for the live restore of domain `name` (other tests' are theirs)."""
    out = []
    for s in conn.listAllSecrets(0):
        try:
            desc = etree.fromstring(s.XMLDesc(0).encode()).findtext("description") or ""
        except libvirt.libvirtError:
            continue
        if keysecret.is_ours(desc) and desc.endswith(f": live restore of domain {name}"):
            out.append(s.UUIDString())
    return out


def secret_exists(conn: libvirt.virConnect, uuid: str) -> bool:
    try:
        conn.secretLookupByUUIDString(uuid)
        return True
    except libvirt.libvirtError:
        return False


def keyfile(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def backup(name: str, bdir: Path, key: Path, level: str, *extra: object) -> None:
    r = cli("backup", name, bdir, "--level", level, "--key-file", key, *extra)
    assert r.rc == 0, r


def running(conn: libvirt.virConnect, name: str) -> Optional[libvirt.virDomain]:
    dom = lookup_domain(conn, name)
    return dom if dom is not None and dom.isActive() else None


def record_secret(dom: libvirt.virDomain) -> str:
    rec = liverestore._read_record(dom)
    assert rec is not None and rec.secret is not None, "no live-restore record naming a secret"
    return rec.secret


def config_is_plain(dom: libvirt.virDomain) -> None:
    """The persistent XML names no key and no backup image: the next start needs neither."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    root = etree.fromstring(xml.encode())
    assert "<encryption" not in xml, xml
    assert root.findall("devices/disk/backingStore/source") == [], xml


def all_cmdlines() -> List[bytes]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out.append((p / "cmdline").read_bytes())
            except OSError:
                pass
    return out


def stop(dom: libvirt.virDomain) -> None:
    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)


def assert_reads(image: Path, want: bytes) -> None:
    assert not qemu_img.info(image).get("encrypted"), f"{image} is encrypted"
    assert scratch.backing_chain(image) == [str(image)], f"{image} is not standalone"
    diff = scratch.first_difference(scratch.read_raw(image), want)
    assert diff is None, f"{image}: first difference at byte {diff}"


def encrypted_chain(make_domain, tmp_path: Path, sizes: Dict[str, int]):
    """A domain with an encrypted full + inc in tmp_path/bk; (domain, bdir, key file, what the
    guest saw at the inc)."""
    d = make_domain(sizes)
    key = keyfile(tmp_path / "key", CANARY)
    bdir = tmp_path / "bk"
    d.write("vda", 0x3c, 0, 4 * MiB)
    if "vdb" in sizes:
        d.write("vdb", 0x5d, 1 * MiB, 2 * MiB)
    backup(d.name, bdir, key, "full", "--encrypt")
    d.write("vda", 0x6e, sizes["vda"] - 6 * MiB, 2 * MiB)
    if "vdb" in sizes:
        d.write("vdb", 0x7f, 0, 256 * KiB)
    backup(d.name, bdir, key, "inc")
    return d, bdir, key, d.expected()


def test_encrypted_chain_live_restored_bit_exact_with_a_secret_only_while_it_runs(make_domain, conn, live,
                                                                                  procs, tmp_path):
    d, bdir, key, want = encrypted_chain(make_domain, tmp_path, {"vda": 32 * MiB, "vdb": 8 * MiB})
    wrong = keyfile(tmp_path / "wrong", b"not the passphrase\n")
    before = snapshot_dir(bdir)
    name = f"vbliveenc-{secrets.token_hex(3)}"
    live.append(name)
    out = tmp_path / "live"

    # no key, a wrong key, --encrypt: exit 2, nothing defined, no overlay, no secret
    for extra, msg in (((), "is encrypted; give its key with --key-file FILE"),
                       (("--key-file", wrong), "key check failed"),
                       (("--key-file", key, "--encrypt"), "--encrypt doesn't apply to --live")):
        r = cli("restore", bdir, out, "--live", "--define", name, *extra)
        assert r.rc == 2 and msg in one_error_line(r), (extra, r)
        assert lookup_domain(conn, name) is None and not out.exists() and secrets_for(conn, name) == [], extra

    t0 = time.monotonic()
    p = cli_bg(procs, "restore", bdir, out, "--live", "--define", name, "--key-file", key,
               "--max-speed", 2 * MiB)
    dom = wait_for("the restored domain to run", lambda: running(conn, name), every=0.01)
    print(f"\nencrypted live restore: domain running {time.monotonic() - t0:.2f}s after the command started")
    wait_for("the pull to copy something", lambda: pulling(dom, "vda"))
    # QEMU reads the LUKS point images with the key of one ephemeral, private secret that the
    # domain XML names on every layer; the key is on no command line
    sec = record_secret(dom)
    assert secrets_for(conn, name) == [sec]
    sxml = etree.fromstring(conn.secretLookupByUUIDString(sec).XMLDesc(0).encode())
    assert sxml.get("ephemeral") == "yes" and sxml.get("private") == "yes"
    for disk in etree.fromstring(dom.XMLDesc(0).encode()).findall("devices/disk"):
        keyed = disk.findall(".//backingStore/source/encryption/secret")     # the inc and the full
        assert [s.get("uuid") for s in keyed] == [sec, sec], etree.tostring(disk)
    assert not any(b"canary-5e0b77" in c for c in all_cmdlines()), "the key is on a command line"
    # a guest write during the copy, where the pull has not been yet
    hmp_write(dom, "vda", 0x5a, 28 * MiB, 512 * KiB)
    want["vda"] = patched(want["vda"], 0x5a, 28 * MiB, 512 * KiB)
    assert pulling(dom, "vda"), "the copy ended before the checks ran; they proved nothing"

    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, (stdout, stderr)
    assert "independent of" in stdout and "canary" not in stdout + stderr, (stdout, stderr)
    assert not secret_exists(conn, sec), "the secret outlived the live restore"
    assert secrets_for(conn, name) == []
    assert dom.isActive()
    config_is_plain(dom)
    assert snapshot_dir(bdir) == before
    assert cli("verify", bdir, "--key-file", key).rc == 0
    for disk in ("vda", "vdb"):
        assert header_backing(out / f"{disk}.qcow2") is None
    stop(dom)
    for disk in ("vda", "vdb"):
        assert_reads(out / f"{disk}.qcow2", want[disk])
    # it starts again without the backup dir and without any key
    bdir.rename(tmp_path / "bk-moved")
    dom.create()
    assert dom.isActive()


def test_encrypted_live_restore_killed_mid_copy_resumes_with_its_key_and_leaves_no_secret(
        make_domain, conn, live, procs, tmp_path):
    """SIGKILL while the pull runs: the domain runs on, its pull inside QEMU too, and the killed
    run's secret stays in libvirtd. The resume refuses to start without the key or with another
    (exit 2, nothing changed); with it, it removes the dead run's secret, finishes while the
    domain runs, and leaves no secret, a plain configuration and an intact chain."""
    d, bdir, key, want = encrypted_chain(make_domain, tmp_path, {"vda": 24 * MiB})
    wrong = keyfile(tmp_path / "wrong", b"not the passphrase\n")
    before = snapshot_dir(bdir)
    name = f"vbliveenc-{secrets.token_hex(3)}"
    live.append(name)
    out = tmp_path / "live"
    img = out / "vda.qcow2"

    p = cli_bg(procs, "restore", bdir, out, "--live", "--define", name, "--key-file", key, "--max-speed", 1 * MiB)
    dom = wait_for("the restored domain to run", lambda: running(conn, name))
    wait_for("the pull to copy something", lambda: pulling(dom, "vda"))
    sec = record_secret(dom)
    p.kill()
    p.wait(timeout=30)
    assert dom.isActive() and secret_exists(conn, sec), "the SIGKILL should have left the secret"
    hmp_write(dom, "vda", 0x4a, 2 * MiB, 1 * MiB)
    want["vda"] = patched(want["vda"], 0x4a, 2 * MiB, 1 * MiB)

    for extra, msg in (((), f"--resume-live {name} --key-file FILE"), (("--key-file", wrong), "key check failed")):
        r = cli("restore", "--resume-live", name, *extra)
        assert r.rc == 2 and msg in one_error_line(r), (extra, r)
    assert liverestore._read_record(dom) is not None, "a refused resume removed the record"

    r = cli("restore", "--resume-live", name, "--key-file", key, "--json")
    assert r.rc == 0, r
    assert r.json()["resumed"] and not r.json()["offline"]
    assert not secret_exists(conn, sec) and secrets_for(conn, name) == []
    assert liverestore._read_record(dom) is None
    assert header_backing(img) is None
    config_is_plain(dom)
    assert snapshot_dir(bdir) == before
    assert cli("verify", bdir, "--key-file", key).rc == 0
    stop(dom)
    bdir.rename(tmp_path / "bk-moved")
    assert_reads(img, want["vda"])
    dom.create()
    assert dom.isActive()


def test_encrypted_live_restore_killed_right_after_define_finishes_offline(make_domain, conn, live, tmp_path):
    """The fault point `define`: SIGKILL right after libvirt defined the domain, before the
    secret and the start. The domain is shut off on overlays over the LUKS images, prune keeps
    them, and the resume (with the key) flattens offline with qemu-img, removes the encrypted
    chain from the configuration (else the next start would look for the gone secret) and
    leaves no secret."""
    d, bdir, key, want = encrypted_chain(make_domain, tmp_path, {"vda": 16 * MiB})
    name = f"vbliveenc-{secrets.token_hex(3)}"
    live.append(name)
    out = tmp_path / "live"
    img = out / "vda.qcow2"
    p = subprocess.run([sys.executable, "-m", "tests.support.faultpoint", "kill", "define", "restore", str(bdir),
                        str(out), "--live", "--define", name, "--key-file", str(key)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == -signal.SIGKILL, p
    dom = lookup_domain(conn, name)
    assert dom is not None and not dom.isActive()
    sec = record_secret(dom)
    assert not secret_exists(conn, sec) and secrets_for(conn, name) == []
    assert header_backing(img) == str((bdir / "points/0002/vda.qcow2").resolve())
    assert f"uuid='{sec}'" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "1", "--key-file", key)
    assert r.rc == 1 and f"is the backing of domain '{name}' (disk vda)" in r.err, r
    assert snapshot_dir(bdir) == before

    r = cli("restore", "--resume-live", name)
    assert r.rc == 2 and "--key-file FILE" in one_error_line(r), r
    r = cli("restore", "--resume-live", name, "--key-file", key, "--json")
    assert r.rc == 0, r
    assert r.json()["resumed"] and r.json()["offline"]
    assert secrets_for(conn, name) == []
    assert liverestore._read_record(dom) is None
    config_is_plain(dom)
    assert snapshot_dir(bdir) == before
    bdir.rename(tmp_path / "bk-moved")
    assert_reads(img, want["vda"])
    dom.create()                       # no backup dir, no secret: it starts on its own disk
    assert dom.isActive()
