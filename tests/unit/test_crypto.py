"""Pure logic of encryption: key file rules, the key check value, argument and XML builders."""

from __future__ import annotations

import io
import json
import os
import pty
from pathlib import Path

import pytest
from lxml import etree

from virtbackup.errors import UsageError
from virtbackup.qemu import keys
from virtbackup.store import crypto
from virtbackup.virt import keysecret, xmlbuild

SCHEMAS = Path("/usr/share/libvirt/schemas")
KEY = b"correct horse battery staple\n"


def keyfile(tmp_path: Path, data: bytes = KEY, mode: int = 0o600) -> Path:
    p = tmp_path / "key"
    p.write_bytes(data)
    os.chmod(p, mode)
    return p


def test_key_is_the_files_exact_bytes_and_never_shows_itself(tmp_path):
    k = crypto.read_key(str(keyfile(tmp_path)))
    assert k.data == KEY                       # trailing newline kept: qemu-img file= reads it too
    assert b"horse" not in repr(k).encode() and "horse" not in str(k) and "horse" not in f"{k}"


@pytest.mark.parametrize("setup, message", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_bytes(b""), os.chmod(p, 0o600)), "is empty"),
    (lambda p: (p.write_bytes(b"\xff\xfe\x00bin"), os.chmod(p, 0o600)), "is not text"),
    (lambda p: (p.write_bytes(b"a\0b"), os.chmod(p, 0o600)), "is not text"),
    (lambda p: (p.write_bytes(b"x" * 5000), os.chmod(p, 0o600)), "more than 4096 bytes"),
    (lambda p: (p.write_bytes(KEY), os.chmod(p, 0o644)), "accessible by other users (mode 0644)"),
    (lambda p: p.mkdir(), "not a regular file"),
])
def test_hostile_key_files_are_refused_with_exit_2(tmp_path, setup, message):
    p = tmp_path / "key"
    setup(p)
    with pytest.raises(UsageError) as e:
        crypto.read_key(str(p))
    assert message in str(e.value) and e.value.exit_code == 2


def test_symlinked_key_file_is_refused(tmp_path):
    real = keyfile(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="is a symbolic link"):
        crypto.read_key(str(link))


def test_unreadable_key_file_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file regardless of its mode")
    p = keyfile(tmp_path, mode=0o000)
    with pytest.raises(UsageError, match="cannot read key file"):
        crypto.read_key(str(p))


def test_key_from_stdin_but_never_from_a_terminal():
    assert crypto.read_key("-", io.BytesIO(b"piped\n")).data == b"piped\n"
    master, slave = pty.openpty()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as tty:
            with pytest.raises(UsageError, match="refusing to read the key from a terminal"):
                crypto.read_key("-", tty)
    finally:
        os.close(master)
        os.close(slave)
    with pytest.raises(UsageError, match="is empty"):
        crypto.read_key("-", io.BytesIO(b""))


def test_key_check_value_accepts_the_key_only_and_is_not_the_key():
    k = keys.Key(KEY, "t")
    enc = crypto.ChainEncryption.new(k, 10)
    assert enc.matches(k)
    assert not enc.matches(keys.Key(KEY.rstrip(b"\n"), "t"))    # one byte off is another key
    assert not enc.matches(keys.Key(b"wrong", "t"))
    stored = json.dumps(enc.to_json())
    assert KEY.decode().strip() not in stored and KEY.hex() not in stored
    assert enc.key_check_iterations >= crypto.KEY_CHECK_MIN_ITERATIONS
    assert (enc.format, enc.cipher, enc.hash) == ("luks", "aes-256-xts-plain64", "sha256")
    again = crypto.ChainEncryption.from_json(json.loads(stored))
    assert again == enc and again.matches(k)
    other = crypto.ChainEncryption.new(k, 10)
    assert other.key_check_salt != enc.key_check_salt and other.key_check != enc.key_check


@pytest.mark.parametrize("field, value", [("format", "aes"), ("key_check", "00"), ("key_check_salt", "zz"),
                                          ("key_check_iterations", 0), ("key_check_kdf", "md5")])
def test_tampered_encryption_metadata_is_rejected(field, value):
    data = crypto.ChainEncryption.new(keys.Key(KEY, "t"), 10).to_json()
    data[field] = value
    with pytest.raises(ValueError):
        crypto.ChainEncryption.from_json(data)


def test_check_key_messages():
    k = keys.Key(KEY, "/k")
    enc = crypto.ChainEncryption.new(k, 10)
    crypto.check_key(enc, k, "/b")
    crypto.check_key(None, None, "/b")
    with pytest.raises(UsageError, match="is encrypted; give its key with --key-file"):
        crypto.check_key(enc, None, "/b")
    with pytest.raises(UsageError, match="not the key of /b") as e:
        crypto.check_key(enc, keys.Key(b"nope", "/w"), "/b")
    assert "nope" not in str(e.value)
    with pytest.raises(UsageError, match="is not encrypted"):
        crypto.check_key(None, k, "/b")


def test_image_opts_give_the_key_to_each_encrypted_layer():
    opts = keys.image_opts(Path("/b/points/0003/vda.qcow2"), [True, True, False])
    assert opts == ("driver=qcow2,file.filename=/b/points/0003/vda.qcow2,encrypt.key-secret=vbkey0,"
                    "backing.encrypt.key-secret=vbkey0")
    assert "file.filename=/a,,b/x.qcow2," in keys.image_opts(Path("/a,b/x.qcow2"), [True])
    with pytest.raises(ValueError):
        keys.image_opts(Path("rel.qcow2"), [True])
    spec = json.loads(keys.json_image(Path("/b/x.qcow2"), [True, False, True])[len("json:"):])
    assert spec["encrypt"] == {"key-secret": "vbkey0"} and "encrypt" not in spec["backing"]
    assert spec["backing"]["backing"] == {"encrypt": {"key-secret": "vbkey0"}}
    assert keys.secret_object("s", "/dev/fd/5") == "secret,id=s,file=/dev/fd/5,format=raw"
    assert "encrypt.iter-time=250" in keys.create_options(250)


def test_key_pipe_carries_the_key_not_the_argv():
    k = keys.Key(KEY, "t")
    with keys.key_pipe(k) as (args, fd):
        assert args == ["--object", f"secret,id=vbkey0,file=/dev/fd/{fd},format=raw"]
        assert os.read(fd, 100) == KEY
    with pytest.raises(OSError):
        os.fstat(fd)                                  # closed on exit


def test_key_file_is_private_and_removed(tmp_path):
    with keys.key_file(keys.Key(KEY, "t")) as p:
        assert p.read_bytes() == KEY
        assert p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o777 == 0o700
    assert not p.exists() and not p.parent.exists()


def test_iter_time_from_environment(monkeypatch):
    monkeypatch.delenv(crypto.ITER_TIME_ENV, raising=False)
    assert crypto.iter_time_ms() == keys.DEFAULT_ITER_TIME_MS == 1000
    monkeypatch.setenv(crypto.ITER_TIME_ENV, "10")
    assert crypto.iter_time_ms() == 10
    for bad in ("0", "-5", "fast", "999999"):
        monkeypatch.setenv(crypto.ITER_TIME_ENV, bad)
        with pytest.raises(UsageError):
            crypto.iter_time_ms()


def test_secret_description_names_a_live_process_only():
    desc = keysecret.secret_description("backup of x")
    assert keysecret.is_ours(desc) and keysecret.owner_alive(desc)
    dead = desc.replace(f"pid={os.getpid()} ", "pid=999999999 ")
    assert keysecret.is_ours(dead) and not keysecret.owner_alive(dead)
    recycled = desc.replace(" start=", " start=1")          # same pid, another process
    assert not keysecret.owner_alive(recycled)
    assert not keysecret.is_ours("my own secret") and not keysecret.is_ours(None)


def rng(name: str) -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMAS / name)))


def test_secret_xml_is_ephemeral_private_and_valid():
    xml = keysecret.secret_xml("6f1c3a52-3b8e-4a55-9a0e-2d5a1f0b9c11", keysecret.secret_description("t"))
    root = etree.fromstring(xml.encode())
    assert rng("secret.rng").validate(root), rng("secret.rng").error_log
    assert root.get("ephemeral") == "yes" and root.get("private") == "yes"


def test_backup_xml_with_encrypted_targets_validates():
    enc = xmlbuild.Encryption("luks", "6f1c3a52-3b8e-4a55-9a0e-2d5a1f0b9c11", 10)
    xml = xmlbuild.backup_xml([xmlbuild.BackupDisk("vda", Path("/b/p/vda.qcow2"), encryption=enc),
                               xmlbuild.BackupDisk("vdb", Path("/b/p/vdb.qcow2"))], "cp1")
    root = etree.fromstring(xml.encode())
    assert rng("domainbackup.rng").validate(root), rng("domainbackup.rng").error_log
    enc = root.find("disks/disk[@name='vda']/target/encryption")
    assert enc is not None and enc.get("format") == "luks"
    assert enc.find("secret").attrib == {"type": "passphrase", "uuid": "6f1c3a52-3b8e-4a55-9a0e-2d5a1f0b9c11"}
    assert root.find("disks/disk[@name='vdb']/target/encryption") is None


def sample():
    """A two-point chain (full, inc) on one disk."""
    from virtbackup.store.chain import Chain, DiskImage, Point
    from virtbackup.store.digest import Digest
    c = Chain(domain_name="d", domain_uuid="u", dir_id="x", next_seq=3)
    for pid, parent in (("0001", None), ("0002", "0001")):
        back = f"points/{parent}/vda.qcow2" if parent else None
        c.points.append(Point(
            id=pid, level="inc" if parent else "full", created="2026-01-01T00:00:00+00:00",
            checkpoint=f"virtbackup-x-{pid}", base_checkpoint=f"virtbackup-x-{parent}" if parent else None,
            parent=parent, chain="0001",
            disks={"vda": DiskImage(image=f"points/{pid}/vda.qcow2", backing=back, virtual_size=1 << 20, size=1,
                                    digest=Digest("blake3", "0" * 64), copied_full=back is None)},
            domain_xml=f"points/{pid}/domain.xml", checkpoint_xml=f"points/{pid}/checkpoint.xml"))
    return c


def test_encrypted_chain_metadata_is_schema_4_and_consistent():
    from virtbackup.store.chain import Chain
    plain = sample()
    assert plain.to_json()["schema"] == 3 and "encryption" not in plain.to_json()
    enc = sample()
    enc.encryption = crypto.ChainEncryption.new(keys.Key(KEY, "t"), 10)
    for p in enc.points:
        p.encryption = "luks"
    data = json.loads(json.dumps(enc.to_json()))
    assert data["schema"] == 4 and data["encryption"]["format"] == "luks"
    again = Chain.from_json(data)
    assert again.encryption == enc.encryption and again.encryption.matches(keys.Key(KEY, "t"))
    # a plaintext point smuggled into an encrypted chain, or schema/encryption out of step
    bad = json.loads(json.dumps(data))
    bad["points"][1]["encryption"] = None
    with pytest.raises(ValueError, match="encryption None, the chain's is 'luks'"):
        Chain.from_json(bad)
    bad = json.loads(json.dumps(data))
    bad["schema"] = 3
    with pytest.raises(ValueError, match="do not match"):
        Chain.from_json(bad)
    bad = json.loads(json.dumps(data))
    del bad["encryption"]
    with pytest.raises(ValueError, match="do not match"):
        Chain.from_json(bad)


def test_encrypted_points_keep_their_transport():
    from virtbackup.store.chain import Chain
    enc = sample()
    enc.encryption = crypto.ChainEncryption.new(keys.Key(KEY, "t"), 10)
    for p in enc.points:
        p.encryption, p.transport = "luks", "offline"
    again = Chain.from_json(json.loads(json.dumps(enc.to_json())))
    assert [(p.encryption, p.transport) for p in again.points] == [("luks", "offline")] * len(enc.points)


def test_an_encrypted_chain_restores_live_but_not_instant(tmp_path):
    """Issue 23 part 4: `restore --live` of an encrypted chain is allowed (its key is a libvirt
    secret only while the command runs); plain `--instant` and `--define --encrypt` are still
    refused (the domain would need the key in libvirt for good), a wrong key first of all."""
    from virtbackup.restore import _check_encrypted_restore
    from virtbackup.store.chain import BackupDir
    bdir = BackupDir(tmp_path)
    enc = sample()
    enc.encryption = crypto.ChainEncryption.new(keys.Key(KEY, "t"), 10)
    key, wrong = keys.Key(KEY, "t"), keys.Key(b"wrong\n", "w")
    _check_encrypted_restore(bdir, enc, key, False, True, "copy", live=True)
    with pytest.raises(UsageError, match="key check failed"):
        _check_encrypted_restore(bdir, enc, wrong, False, True, "copy", live=True)
    with pytest.raises(UsageError, match="give its key"):
        _check_encrypted_restore(bdir, enc, None, False, True, "copy", live=True)
    with pytest.raises(UsageError, match="instant restore of an encrypted backup"):
        _check_encrypted_restore(bdir, enc, key, False, True, "copy")
    with pytest.raises(UsageError, match="instant restore of an encrypted backup"):
        _check_encrypted_restore(bdir, enc, key, True, True, "copy", live=True)      # live disks are plain
    with pytest.raises(UsageError, match="--define with --encrypt"):
        _check_encrypted_restore(bdir, enc, key, True, False, "copy")


def test_every_key_read_removes_key_dirs_of_killed_runs(tmp_path):
    """D7 follow-up (found by the soak): a killed run's key dir holds the passphrase; it used to
    go only with a later run that made a key file itself (offline, pull), not with a push
    backup, a prune or a restore. Every read of a key removes dead runs' key dirs now, never a
    live process's or a look-alike."""
    import subprocess

    from virtbackup.qemu import keys as keymod
    base = keymod.key_base() or "/tmp"
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = Path(base) / f"{keymod.KEY_DIR_PREFIX}{dead.pid}-1-test{os.getpid()}"
    alive = Path(base) / f"{keymod.KEY_DIR_PREFIX}{os.getpid()}-{env_start()}-test{os.getpid()}"
    other = Path(base) / f"{keymod.KEY_DIR_PREFIX}not-ours-test{os.getpid()}"
    try:
        for d in (gone, alive, other):
            d.mkdir(mode=0o700)
            (d / "key").write_bytes(b"secret")
        kf = tmp_path / "k"
        kf.write_bytes(b"a passphrase\n")
        os.chmod(kf, 0o600)
        crypto.read_key(str(kf))
        assert not gone.exists() and alive.exists() and other.exists()
    finally:
        import shutil
        for d in (gone, alive, other):
            shutil.rmtree(d, ignore_errors=True)


def env_start() -> int:
    from virtbackup import env
    return env.process_start(os.getpid())
