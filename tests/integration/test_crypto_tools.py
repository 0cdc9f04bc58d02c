"""The encryption building blocks against real qemu-img, qemu-io and libvirtd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support import helpers
from tests.support.helpers import ROOT
from virtbackup.errors import HostError
from virtbackup.qemu import keys, qemu_img
from virtbackup.virt import keysecret

MiB = 1 << 20
KEY = keys.Key(b"test passphrase 1\n", "test")
WRONG = keys.Key(b"test passphrase 2\n", "test")
ITER = 10      # ms of LUKS key derivation per open: tests would otherwise spend their time in PBKDF2


def our_secrets(conn) -> set:
    return set(helpers.our_secrets(conn))


@pytest.fixture
def no_leaked_secrets(conn):
    before = our_secrets(conn)
    yield
    assert our_secrets(conn) - before == set(), "a virtbackup libvirt secret was left behind"


def qemu_io(path: Path, key: keys.Key, *cmds: str) -> str:
    args = ["--image-opts", keys.image_opts(path.absolute(), qemu_img.layers(path))]
    for c in cmds:
        args += ["-c", c]
    return qemu_img.run_program(["qemu-io"], args, f"qemu-io {path}", key).stdout


def test_encrypted_chain_create_read_rebase_convert(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.qcow2", "b.qcow2", "c.qcow2"))
    qemu_img.create(a, 8 * MiB, key=KEY, iter_time=ITER)
    qemu_io(a, KEY, "write -P 0x5a 0 1M", "write -P 0x5b 4M 64k")
    qemu_img.create(b, 8 * MiB, backing="a.qcow2", key=KEY, iter_time=ITER)
    qemu_io(b, KEY, "write -P 0x6a 512k 1M")
    qemu_img.create(c, 8 * MiB, backing="b.qcow2", key=KEY, iter_time=ITER)
    qemu_io(c, KEY, "write -P 0x7a 4M 4k")
    for p in (a, b, c):
        info = qemu_img.info(p)
        assert info["encrypted"] is True
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        for pattern in (b"\x5a" * 64, b"\x6a" * 64, b"\x7a" * 64):
            assert pattern not in p.read_bytes(), f"plaintext in {p}"
    assert qemu_img.layers(c) == [True, True, True]
    out = qemu_io(c, KEY, "read -P 0x5a 0 512k", "read -P 0x6a 512k 1M", "read -P 0 1536k 512k",
                  "read -P 0x7a 4M 4k", "read -P 0x5b 4100k 60k")
    assert "Pattern verification failed" not in out, out
    # without the key, or with the wrong one, nothing opens
    with pytest.raises(HostError, match="key-secret"):
        qemu_img.convert(c, tmp_path / "x.qcow2")
    with pytest.raises(HostError, match="Invalid password"):
        qemu_img.convert(c, tmp_path / "x.qcow2", key=WRONG)
    qemu_img.check(c, key=KEY)
    with pytest.raises(HostError, match="Invalid password"):
        qemu_img.check(c, key=WRONG)
    qemu_img.read_all(c, 8 * MiB, key=KEY)

    # plain standalone copy; encrypted standalone copy (same key) reads the same
    plain, enc = tmp_path / "plain.qcow2", tmp_path / "enc.qcow2"
    qemu_img.convert(c, plain, key=KEY)
    qemu_img.convert(c, enc, key=KEY, encrypt_iter_time=ITER)
    assert qemu_img.info(plain).get("encrypted") in (None, False)
    assert qemu_img.info(enc)["encrypted"] is True and qemu_img.info(enc).get("backing-filename") is None
    assert qemu_img.compare(enc, c, key=KEY)

    # safe rebase dropping the middle link: content unchanged, relative link recorded
    c1 = tmp_path / "c1.qcow2"
    c1.write_bytes(c.read_bytes())
    qemu_img.rebase(c1, "a.qcow2", key=KEY)
    assert qemu_img.info(c1)["backing-filename"] == "a.qcow2"
    assert qemu_img.compare(c1, c, key=KEY)
    # header-only rebase (the new backing reads the same)
    c2 = tmp_path / "c2.qcow2"
    c2.write_bytes(c1.read_bytes())
    qemu_img.rebase(c2, "enc.qcow2", safe=False, key=KEY)
    assert qemu_img.info(c2)["backing-filename"] == "enc.qcow2"
    # flatten
    qemu_img.rebase(c2, None, key=KEY)
    assert qemu_img.info(c2).get("backing-filename") is None and qemu_img.info(c2)["encrypted"] is True


def test_key_never_on_a_command_line(tmp_path):
    """/proc/*/cmdline of every process, sampled while a slow encrypted create runs."""
    secret = keys.Key(b"cmdline-canary-7f3e91\n", "test")
    done = []
    seen_qemu_img = False
    import threading

    def create() -> None:
        try:
            qemu_img.create(tmp_path / "slow.qcow2", 8 * MiB, key=secret, iter_time=400)
        finally:
            done.append(True)

    t = threading.Thread(target=create)
    t.start()
    try:
        while not done:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                assert b"cmdline-canary" not in argv, argv
                if b"slow.qcow2" in argv:
                    seen_qemu_img = True
                    assert b"secret,id=vbkey0,file=/dev/fd/" in argv
            time.sleep(0.05)
    finally:
        t.join()
    assert seen_qemu_img, "qemu-img was never seen running"


def test_ephemeral_secret_removed_on_success_error_and_sigterm(conn, no_leaked_secrets, tmp_path):
    import libvirt
    with keysecret.libvirt_secret(conn, KEY, "test") as uuid:
        sec = conn.secretLookupByUUIDString(uuid)
        xml = sec.XMLDesc(0)
        assert "ephemeral='yes'" in xml and "private='yes'" in xml
        with pytest.raises(libvirt.libvirtError):
            sec.value()                                      # private: not readable back
    with pytest.raises(libvirt.libvirtError):
        conn.secretLookupByUUIDString(uuid)
    with pytest.raises(RuntimeError):
        with keysecret.libvirt_secret(conn, KEY, "test") as uuid:
            raise RuntimeError("boom")
    with pytest.raises(libvirt.libvirtError):
        conn.secretLookupByUUIDString(uuid)

    # a real process holding the secret gets SIGTERM, then SIGINT: the secret goes either way
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from virtbackup.qemu import keys
        from virtbackup.virt import host, keysecret
        conn = host.connect()
        with keysecret.libvirt_secret(conn, keys.Key(b"k", "t"), "signal test") as u:
            print(u, flush=True)
            time.sleep(60)
    """)
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            uuid = proc.stdout.readline().strip()
            assert uuid, proc.stderr.read()
            conn.secretLookupByUUIDString(uuid)              # exists while the process runs
            proc.send_signal(sig)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        with pytest.raises(libvirt.libvirtError):
            conn.secretLookupByUUIDString(uuid)
        assert proc.returncode != 0


def test_secret_of_a_killed_run_is_removed_by_the_next(conn, no_leaked_secrets):
    import libvirt
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from virtbackup.qemu import keys
        from virtbackup.virt import host, keysecret
        conn = host.connect()
        with keysecret.libvirt_secret(conn, keys.Key(b"k", "t"), "kill test") as u:
            print(u, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    uuid = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    conn.secretLookupByUUIDString(uuid)                      # SIGKILL: left behind
    with keysecret.libvirt_secret(conn, KEY, "next run") as mine:
        with pytest.raises(libvirt.libvirtError):
            conn.secretLookupByUUIDString(uuid)
        conn.secretLookupByUUIDString(mine)
