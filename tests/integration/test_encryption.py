"""Encrypted backup chains (issue 16) on real domains: LUKS qcow2 all the way, keyed by a file.

Every CLI run here gets VIRTBACKUP_ENCRYPT_ITER_TIME=10: LUKS key derivation would otherwise
cost a second per image open (the production default, see crypto.py) and dominate the tests.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import libvirt
import pytest

from tests.support import helpers, scratch
from tests.support.helpers import ROOT, CLIResult, cli, finish, pause_job, snapshot_dir, start_cli
from tests.support.qemu import slow_reads
from virtbackup.qemu import qemu_img
from virtbackup.store import crypto

MiB = 1 << 20
KiB = 1 << 10
# Guest data patterns; each is a byte value written in runs of at least 64 KiB. A run of 4 KiB
# of it anywhere in a backup file would be plaintext guest data.
PATTERNS = (0x3c, 0x5d, 0x6e, 0x7f, 0xa1, 0xb2)


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch):
    monkeypatch.setenv(crypto.ITER_TIME_ENV, "10")


@pytest.fixture(autouse=True)
def no_leaked_secrets(conn):
    before = set(helpers.our_secrets(conn))
    yield
    left = set(helpers.our_secrets(conn)) - before
    for uuid in left:                       # clean up, then fail: the next test starts clean
        try:
            conn.secretLookupByUUIDString(uuid).undefine()
        except libvirt.libvirtError:
            pass
    assert not left, f"virtbackup libvirt secrets left behind: {left}"


def keyfile(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def one_error(r: CLIResult) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.startswith("virtbackup: error:")]
    assert len(lines) == 1, r
    return lines[0]


def plaintext_in(root: Path) -> List[str]:
    """Files under root that hold a 4 KiB run of any guest pattern."""
    runs = [bytes([p]) * 4096 for p in PATTERNS]
    return [str(f) for f in root.rglob("*") if f.is_file() and any(r in f.read_bytes() for r in runs)]


def backup(name: str, bdir: Path, key: Path, level: str, *extra: object) -> dict:
    r = cli("backup", name, bdir, "--level", level, "--key-file", key, "--json", *extra)
    assert r.rc == 0, r
    return r.json()["point"]


def assert_restores(bdir: Path, point: str, expected: Dict[str, bytes], out: Path, key: Path,
                    *extra: object) -> None:
    r = cli("restore", bdir, out, "--point", point, "--key-file", key, *extra)
    assert r.rc == 0, r
    for disk, want in expected.items():
        img = out / f"{disk}.qcow2"
        assert qemu_img.info(img).get("backing-filename") is None
        if "--encrypt" in extra:
            assert qemu_img.info(img)["encrypted"] is True
            raw = out / f"{disk}.raw"
            qemu_img.run(["convert", "-O", "raw", *qemu_img._source(img, crypto.read_key(str(key))), str(raw)],
                        "decrypt", crypto.read_key(str(key)))
            got = raw.read_bytes()
            raw.unlink()
        else:
            assert not qemu_img.info(img).get("encrypted")
            got = scratch.read_raw(img)
        diff = scratch.first_difference(got, want)
        assert diff is None, f"point {point} disk {disk}: first difference at byte {diff}"


def test_encrypted_chain_two_disks_full_inc_inc_diff_restore_verify_prune(make_domain, tmp_path, conn):
    d = make_domain({"vda": 24 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    key = keyfile(tmp_path / "key", b"the right passphrase\n")
    wrong = keyfile(tmp_path / "wrong", b"the wrong passphrase\n")
    expected = {}

    # no key / wrong key / key without --encrypt for a new dir: exit 2, nothing created
    r = cli("backup", d.name, bdir, "--encrypt")
    assert r.rc == 2 and "--encrypt needs the key" in one_error(r), r
    assert not bdir.exists()

    d.write("vda", 0x3c, 0, 1 * MiB)
    d.write("vdb", 0x5d, 2 * MiB, 512 * KiB)
    p = backup(d.name, bdir, key, "full", "--encrypt")
    assert p["id"] == "0001" and p["encryption"] == "luks"
    expected["0001"] = d.expected()

    d.write("vda", 0x6e, 512 * KiB, 1 * MiB)
    d.write("vdb", 0, 2 * MiB, 64 * KiB)
    p = backup(d.name, bdir, key, "inc")
    assert p["level"] == "inc" and p["encryption"] == "luks"
    expected["0002"] = d.expected()

    d.write("vdb", 0x7f, 15 * MiB, 1 * MiB)
    p = backup(d.name, bdir, key, "auto")
    assert p["level"] == "inc"
    expected["0003"] = d.expected()

    d.write("vda", 0xa1, 20 * MiB, 128 * KiB)
    p = backup(d.name, bdir, key, "diff")
    assert p["level"] == "diff" and p["parent"] == "0001"
    expected["0004"] = d.expected()

    # every image encrypted; no guest pattern anywhere in the backup dir; the metadata records
    # format and cipher and a key check, never the key
    images = sorted(bdir.glob("points/*/*.qcow2"))
    assert len(images) == 8
    for img in images:
        info = qemu_img.info(img)
        assert info["encrypted"] is True, img
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert plaintext_in(bdir) == []
    # nor the key: not in the metadata, not in the run logs, nowhere in the directory
    assert [f for f in bdir.rglob("*") if f.is_file() and b"right passphrase" in f.read_bytes()] == []
    assert list(bdir.glob("logs/backup-*.log")), "the runs left no logs to check"
    meta = (bdir / "virtbackup.json").read_text()
    assert "the right passphrase" not in meta and b"the right passphrase".hex() not in meta
    lst = cli("list", bdir, "--json")
    assert lst.rc == 0 and lst.json()["encryption"]["format"] == "luks"
    assert lst.json()["encryption"]["cipher"] == "aes-256-xts-plain64"
    assert json.loads(meta)["schema"] == 4

    # wrong key, no key, a symlinked key: exit 2 for every command, nothing changed
    before = snapshot_dir(bdir)
    cps = sorted(c.getName() for c in d.dom.listAllCheckpoints(0))
    link = tmp_path / "keylink"
    link.symlink_to(key)
    out = tmp_path / "never"
    for args, msg in [((), "is encrypted; give its key with --key-file"),
                      (("--key-file", wrong), "is not the key of"),
                      (("--key-file", link), "is a symbolic link")]:
        cmds = [["backup", d.name, bdir, "--level", "inc"], ["restore", bdir, out], ["verify", bdir],
                ["prune", bdir, "--keep", "1"]]
        for cmd in (cmds if "symbolic" not in msg else cmds[:1]):
            r = cli(*cmd, *args)
            assert r.rc == 2 and msg in one_error(r), (cmd, args, r)
            assert "right passphrase" not in r.err + r.out and "wrong passphrase" not in r.err + r.out
    assert snapshot_dir(bdir) == before
    assert sorted(c.getName() for c in d.dom.listAllCheckpoints(0)) == cps
    assert not out.exists()

    # every point restores bit-exact with the key, decrypted; the restored images do hold the
    # guest patterns (the plaintext check above can find them)
    for pid, exp in expected.items():
        assert_restores(bdir, pid, exp, tmp_path / f"r{pid}", key)
    assert plaintext_in(tmp_path / "r0001")
    # by hand, as the README shows: qemu-img alone, the key file as QEMU's secret file
    by_hand = tmp_path / "by-hand.raw"
    top = (bdir / "points/0003/vda.qcow2").absolute()
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--object", f"secret,id=k,file={key}", "--image-opts",
                    f"driver=qcow2,file.filename={top},encrypt.key-secret=k,backing.encrypt.key-secret=k,"
                    "backing.backing.encrypt.key-secret=k", str(by_hand)], check=True, capture_output=True)
    assert by_hand.read_bytes() == expected["0003"]["vda"]
    by_hand.unlink()
    # restore --encrypt: standalone, LUKS with the same key, same content
    assert_restores(bdir, "0003", expected["0003"], tmp_path / "renc", key, "--encrypt")
    assert plaintext_in(tmp_path / "renc") == []

    # instant restore of an encrypted chain, and --define --encrypt: refused, saying how instead
    r = cli("restore", bdir, tmp_path / "inst", "--instant", "--key-file", key)
    assert r.rc == 2 and "restore decrypted copies instead" in one_error(r), r
    r = cli("restore", bdir, tmp_path / "inst", "--define", "vbtest-never", "--encrypt", "--key-file", key)
    assert r.rc == 2 and "--define NAME" in one_error(r), r
    assert not (tmp_path / "inst").exists()
    # --define without --encrypt: a domain on decrypted images, no secret needed
    name = f"vbtest-encdef-{os.urandom(3).hex()}"
    try:
        r = cli("restore", bdir, tmp_path / "def", "--point", "0004", "--define", name, "--key-file", key)
        assert r.rc == 0, r
        xml = conn.lookupByName(name).XMLDesc(0)
        assert "<encryption" not in xml and str(tmp_path / "def" / "vda.qcow2") in xml
        assert not qemu_img.info(tmp_path / "def" / "vda.qcow2").get("encrypted")
    finally:
        scratch.remove_domain(conn, name)

    # verify with the key passes (also deep); a flipped byte in an image is found
    r = cli("verify", bdir, "--key-file", key, "--deep")
    assert r.rc == 0 and "8 image(s) verified" in r.out, r
    victim = bdir / "points/0002/vda.qcow2"
    data = bytearray(victim.read_bytes())
    off = len(data) - 4096               # inside the last data cluster, not the header
    data[off] ^= 0xFF
    os.chmod(victim, 0o600)
    victim.write_bytes(bytes(data))
    r = cli("verify", bdir, "--key-file", key)
    assert r.rc == 1 and "points/0002/vda.qcow2" in one_error(r) and "content hash (blake3) differs" in r.err, r
    data[off] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cli("verify", bdir, "--key-file", key).rc == 0

    # prune: keep 0003 (inc on 0002 on the full) and 0004 (diff on the full). 0003 becomes the
    # new base (converted standalone), 0004 is rebased onto it: both stay encrypted and restore
    # exactly as before
    r = cli("prune", bdir, "--keep", "2", "--key-file", key, "--json")
    assert r.rc == 0, r
    assert r.json()["kept"] == ["0003", "0004"]
    images = sorted(bdir.glob("points/*/*.qcow2"))
    assert {i.parent.name for i in images} == {"0003", "0004"}
    for img in images:
        assert qemu_img.info(img)["encrypted"] is True, img
    assert plaintext_in(bdir) == []
    assert cli("verify", bdir, "--key-file", key, "--deep").rc == 0
    for pid in ("0003", "0004"):
        assert_restores(bdir, pid, expected[pid], tmp_path / f"p{pid}", key)

    # the chain goes on after the prune, with the same key
    d.write("vda", 0xb2, 8 * MiB, 256 * KiB)
    p = backup(d.name, bdir, key, "inc")
    assert p["parent"] == "0004" and p["encryption"] == "luks"
    assert_restores(bdir, p["id"], d.expected(), tmp_path / "last", key)
    assert plaintext_in(bdir) == []


def test_offline_encrypted_backup_and_key_from_stdin(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    key = b"piped passphrase\n"
    scratch.write_offline(d, "vda", 0x3c, 1 * MiB, 1 * MiB)
    cmd = [sys.executable, "-m", "virtbackup.cli", "backup", d.name, str(bdir), "--encrypt", "--key-file", "-",
           "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, input=key, capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout)["point"]["encryption"] == "luks"
    assert not d.dom.isActive()
    scratch.write_offline(d, "vda", 0x5d, 8 * MiB, 64 * KiB)
    proc = subprocess.run(cmd[:-3] + ["--key-file", "-", "--level", "inc"], input=key, capture_output=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc
    for img in bdir.glob("points/*/*.qcow2"):
        assert qemu_img.info(img)["encrypted"] is True
    assert plaintext_in(bdir) == []
    kf = keyfile(tmp_path / "key", key)
    assert_restores(bdir, "latest", d.expected(), tmp_path / "r", kf)

    # `--key-file -` with a terminal on stdin: refused before anything
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(cmd[:-3] + ["--key-file", "-"], stdin=slave, capture_output=True, env=env,
                              timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 2 and b"refusing to read the key from a terminal" in proc.stderr, proc


def test_plain_and_encrypted_chains_do_not_mix(make_domain, tmp_path):
    d = make_domain({"vda": 8 * MiB})
    key = keyfile(tmp_path / "key", b"k1\n")
    plain = tmp_path / "plain"
    assert cli("backup", d.name, plain).rc == 0
    before = snapshot_dir(plain)
    r = cli("backup", d.name, plain, "--encrypt", "--key-file", key)
    assert r.rc == 2 and "holds unencrypted backups" in one_error(r), r
    r = cli("backup", d.name, plain, "--key-file", key)
    assert r.rc == 2 and "is not encrypted" in one_error(r), r
    r = cli("restore", plain, tmp_path / "o", "--key-file", key)
    assert r.rc == 2 and "is not encrypted" in one_error(r), r
    assert snapshot_dir(plain) == before


def all_cmdlines() -> List[bytes]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                pass
    return out


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_interrupted_encrypted_backup_removes_its_secret(make_domain, tmp_path, conn, signum):
    """Ctrl-C / SIGTERM while the job (holding the libvirt secret) runs: rolled back, secret gone."""
    import signal as sig
    d = make_domain({"vda": 128 * MiB})
    bdir = tmp_path / "bk"
    key = keyfile(tmp_path / "key", b"canary-d41c9e passphrase\n")
    d.write("vda", 0x3c, 0, 1 * MiB)
    backup(d.name, bdir, key, "full", "--encrypt")
    before = snapshot_dir(bdir)
    # more than the 64 MiB block-copy reads at once, at 8 MiB/s from the first byte: the job is caught
    d.write("vda", 0x5d, 2 * MiB, 96 * MiB)
    with slow_reads(d.dom, "vda", iops=8):
        p = start_cli("backup", d.name, bdir, "--level", "inc", "--key-file", key, "--mode", "push")
        caught = pause_job(d.dom, p)
    assert caught, f"the job ended before it was paused: {finish(p)}"
    ours = helpers.our_secrets(conn)
    assert ours, "no libvirt secret while the encrypted job runs"
    assert not any(b"canary-d41c9e" in c for c in all_cmdlines()), "the key is on a command line"
    p.send_signal(getattr(sig, signum))
    r = finish(p)
    assert r.rc == 1 and f"interrupted by {signum}" in one_error(r), r
    assert "canary" not in r.err
    assert helpers.our_secrets(conn) == [], "the secret outlived the interrupted run"
    assert snapshot_dir(bdir) == before


def test_encrypted_chain_in_pull_mode_and_live_restore_needs_the_key(make_domain, tmp_path, conn):
    """Issue 23: pull mode writes encrypted chains (its qemu-nbd target opens the LUKS images with
    the key from a 0600 file that is gone once the server answered; never in an argv or a log):
    a pull full --encrypt, a pull incremental and a push incremental mixed in one chain, every
    point restored bit-exact, no plaintext in the directory, no key bytes in any output or run
    log, no key file left. A live restore without the key is refused with exit 2 before anything
    is touched (with it, see test_live_restore_encrypted.py)."""
    keys_before = set(Path("/dev/shm").glob("virtbackup-key-*"))
    d = make_domain({"vda": 8 * MiB, "vdb": 4 * MiB})
    secret = b"pull and live\n"
    key = keyfile(tmp_path / "key", secret)
    bdir = tmp_path / "bk"
    want = {}
    d.write("vda", PATTERNS[0], 0, 2 * MiB)
    d.write("vdb", PATTERNS[1], MiB, MiB)
    outs = []
    for level, mode in (("full", "pull"), ("inc", "pull"), ("inc", "push")):
        r = cli("-v", "backup", d.name, bdir, "--level", level, "--key-file", key, "--json", "--mode", mode,
                *(["--encrypt"] if level == "full" else []))
        assert r.rc == 0, r
        outs += [r.out, r.err]
        p = r.json()["point"]
        assert p["encryption"] == "luks" and p["level"] == level
        want[p["id"]] = d.expected()
        d.write("vda", PATTERNS[2], (2 + len(want)) * MiB, 256 * KiB)
    for pid, exp in want.items():
        assert_restores(bdir, pid, exp, tmp_path / f"r{pid}", key)
    assert cli("verify", bdir, "--key-file", key).rc == 0
    assert plaintext_in(bdir) == []
    logs = "".join(f.read_text(errors="replace") for f in (bdir / "logs").glob("*.log"))
    assert secret.strip().decode() not in "".join(outs) + logs
    # key dirs are named virtbackup-key-<pid>-...: none of a process that has ended may be left
    # (other processes' live ones, e.g. a concurrent soak's, are theirs)
    dead = [p for p in Path("/dev/shm").glob("virtbackup-key-*")
            if p.name.split("-")[2].isdigit() and not Path(f"/proc/{p.name.split('-')[2]}").exists()
            and p not in keys_before]
    assert not dead, f"a key file outlived the run: {dead}"
    before = snapshot_dir(bdir)

    # restore --live without the key: refused, no overlays, no domain
    name = f"vbtest-enclive-{os.urandom(3).hex()}"
    out = tmp_path / "live"
    try:
        r = cli("restore", bdir, out, "--live", "--define", name)
        assert r.rc == 2 and "is encrypted; give its key with --key-file FILE" in one_error(r), r
        assert not out.exists()
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
    finally:
        scratch.remove_domain(conn, name)
    assert snapshot_dir(bdir) == before


def test_no_key_byte_in_any_output_or_log_under_debug(make_domain, tmp_path):
    """Hostile pass D6: `virtbackup -v backup ... --key-file K` printed the passphrase in the
    virSecret.setValue debug line. Every encrypted command, run with -v: neither its stdout, its
    stderr nor the run logs hold the key or a line of it."""
    canary = b"canary-7f3e91 passphrase, not for any output\n"
    key = keyfile(tmp_path / "key", canary)
    d = make_domain({"vda": 8 * MiB})
    bdir = tmp_path / "bk"
    runs = [cli("-v", "backup", d.name, bdir, "--encrypt", "--key-file", key, "--level", "full"),
            # pull (the default) above, push here (its libvirt secret), offline below
            cli("-v", "backup", d.name, bdir, "--key-file", key, "--level", "inc", "--mode", "push"),
            cli("-v", "list", bdir, "--json"),
            cli("-v", "verify", bdir, "--deep", "--key-file", key),
            cli("-v", "restore", bdir, tmp_path / "out", "--key-file", key),
            cli("-v", "prune", bdir, "--keep", "1", "--key-file", key)]
    d.dom.destroy()                                   # shut off: the offline runner's key file path
    runs.append(cli("-v", "backup", d.name, bdir, "--key-file", key, "--level", "inc"))
    for r in runs:
        assert r.rc == 0, r
        assert "debug:" in r.err, r                   # -v really was on
    secret = canary.decode().strip()
    outputs = [r.out + r.err for r in runs] + [p.read_text(errors="replace") for p in (bdir / "logs").iterdir()]
    assert not [o for o in outputs if secret in o or "canary-7f3e91" in o]
    assert "not shown>" in "".join(r.err for r in runs)   # the setValue line was logged, without the value
