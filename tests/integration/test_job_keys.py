"""Key files and compression in job files (issue 23 part 4, issue 24 part 1) on the real libvirtd:
a job backs up two domains into encrypted chains (one key for the job, one domain's own key),
continues them with incrementals, every point restores bit-exact, and the key is in no output,
metrics file or run log; a key file others can read stops the job before anything is written.

Every CLI run gets VIRTBACKUP_ENCRYPT_ITER_TIME=10 (see test_encryption.py). Every job selects only
this test's own domains by a unique glob (other test runs share libvirtd).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from typing import Dict, Iterator, Set

import libvirt
import pytest

from tests.integration.test_encryption import assert_restores, keyfile, plaintext_in
from tests.integration.test_jobs import by_domain, run
from tests.support import helpers, scratch
from tests.support.helpers import checkpoint_names, cli, one_error_line
from tests.support.schemas import validate_output
from virtbackup.qemu import qemu_img
from virtbackup.store import crypto

MiB = 1 << 20
CANARY = "canary-Qx7vZk job key"


@pytest.fixture(autouse=True)
def fast_kdf(monkeypatch):
    monkeypatch.setenv(crypto.ITER_TIME_ENV, "10")


def _dead_owner_secrets(conn: libvirt.virConnect) -> Set[str]:
    """virtbackup secrets whose process is gone: left behind. Secrets of running virtbackups
    (other tests share libvirtd) are not counted, nor ever touched."""
    from lxml import etree

    from virtbackup.virt import keysecret
    out = set()
    for uuid in helpers.our_secrets(conn):
        try:
            desc = etree.fromstring(conn.secretLookupByUUIDString(uuid).XMLDesc(0).encode()).findtext("description")
        except libvirt.libvirtError:
            continue                        # undefined meanwhile by its own run
        if not keysecret.owner_alive(desc or ""):
            out.add(uuid)
    return out


@pytest.fixture(autouse=True)
def no_leaked_secrets(conn) -> Iterator[None]:
    before = _dead_owner_secrets(conn)
    yield
    left = _dead_owner_secrets(conn) - before
    for uuid in left:                       # clean up, then fail: the next test starts clean
        try:
            conn.secretLookupByUUIDString(uuid).undefine()
        except libvirt.libvirtError:
            pass
    assert not left, f"virtbackup libvirt secrets left behind: {left}"


def key_free(*texts: str) -> bool:
    return not [t for t in texts if CANARY in t or "Qx7vZk" in t]


def test_job_backs_up_two_domains_into_encrypted_chains_and_continues_them(make_domain, tmp_path):
    prefix = f"vbjk-{secrets.token_hex(3)}"
    a = make_domain({"vda": 16 * MiB}, name=f"{prefix}-a")                # running: pull (auto)
    b = make_domain({"vda": 16 * MiB}, start=False, name=f"{prefix}-b")   # shut off: private QEMU
    ka = keyfile(tmp_path / "job.key", f"{CANARY} for the job\n".encode())
    kb = keyfile(tmp_path / "b.key", f"{CANARY} of b alone\n".encode())
    root = tmp_path / "root"
    root.mkdir()
    prom = tmp_path / "virtbackup.prom"
    job = tmp_path / "nightly.toml"
    job.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nparallel = 2\nkey_file = "{ka}"\n'
                   f'encrypt = true\nmetrics_file = "{prom}"\n[retention]\nkeep = 5\n'
                   f'[domain."{b.name}"]\nkey_file = "{kb}"\n')
    expected: Dict[str, Dict[str, Dict[str, bytes]]] = {a.name: {}, b.name: {}}
    outputs = []

    def write(n: int) -> None:
        a.write("vda", 0x30 + n, n * MiB, 2 * MiB)
        scratch.write_offline(b, "vda", 0x40 + n, (n + 4) * MiB, MiB)

    write(1)
    r = cli("run", job, "--dry-run")
    assert r.rc == 0 and f"{a.name}: would back up into {root / a.name}, level auto: full" in r.out, r
    assert f"encrypted with key file {ka})" in r.out and f"encrypted with key file {kb})" in r.out, r
    assert list(root.iterdir()) == []
    outputs += [r.out, r.err]

    # run 1: two encrypted fulls, each with its own key
    r = cli("run", job, "--json")
    assert r.rc == 0, r
    outputs += [r.out, r.err]
    res = by_domain(validate_output("run", r.out, r.rc))
    for d in (a, b):
        assert (res[d.name]["status"], res[d.name]["level"], res[d.name]["point"]) == ("ok", "full", "0001"), res
        expected[d.name]["0001"] = d.expected()

    # run 2: incrementals with the same keys (the chains go on; the prune needs the key too)
    write(2)
    out = run(job, expect_rc=0)
    res = by_domain(out)
    for d in (a, b):
        assert (res[d.name]["status"], res[d.name]["level"], res[d.name]["point"]) == ("ok", "inc", "0002"), res
        assert res[d.name]["pruned"] == [] and res[d.name]["chain_length"] == 2
        expected[d.name]["0002"] = d.expected()
    r = cli("run", job)                     # the human table, for the key check below
    assert r.rc == 0, r
    outputs += [r.out, r.err]
    expected[a.name]["0003"], expected[b.name]["0003"] = a.expected(), b.expected()

    for d, key in ((a, ka), (b, kb)):
        bdir = root / d.name
        lst = cli("list", bdir, "--json")
        assert lst.rc == 0, lst
        outputs.append(lst.out)
        points = lst.json()["points"]
        assert [(p["id"], p["level"], p["encryption"]) for p in points] == [
            ("0001", "full", "luks"), ("0002", "inc", "luks"), ("0003", "inc", "luks")]
        images = sorted(bdir.glob("points/*/*.qcow2"))
        assert len(images) == 3 and all(qemu_img.info(img)["encrypted"] is True for img in images)
        assert plaintext_in(bdir) == []
        for pid, want in expected[d.name].items():
            assert_restores(bdir, pid, want, tmp_path / f"restore-{d.name}-{pid}", key)
            subprocess.run(["rm", "-rf", str(tmp_path / f"restore-{d.name}-{pid}")], check=False)
        logs = list((bdir / "logs").iterdir())
        assert logs, "the runs left no logs to check"
        outputs += [p.read_text(errors="replace") for p in logs]
    # each domain has its own key: the job's key does not open b's chain
    r = cli("restore", root / b.name, tmp_path / "wrong", "--key-file", ka)
    assert r.rc == 2 and "key check failed" in one_error_line(r), r
    assert 'virtbackup_job_success{job="nightly"} 1' in prom.read_text()
    outputs.append(prom.read_text())
    assert key_free(*outputs)

    # a job that names no key for an encrypted directory: said in the dry run, refused in the run,
    # the chain untouched
    nokey = tmp_path / "nokey.toml"
    nokey.write_text(f'backup_root = "{root}"\ndomains = ["{a.name}"]\n')
    r = cli("run", nokey, "--dry-run")
    assert r.rc == 0 and f"{a.name}: would FAIL: {root / a.name} is encrypted; job file {nokey} gives" in r.out, r
    before = helpers.snapshot_dir(root / a.name)
    out = run(nokey, expect_rc=1)
    assert "is encrypted" in by_domain(out)[a.name]["error"]
    assert helpers.snapshot_dir(root / a.name) == before


def test_a_key_file_others_can_read_stops_the_job_before_anything(make_domain, tmp_path):
    prefix = f"vbjk-{secrets.token_hex(3)}"
    d = make_domain({"vda": 8 * MiB}, name=f"{prefix}-a")
    key = keyfile(tmp_path / "job.key", f"{CANARY}\n".encode())
    os.chmod(key, 0o644)
    root = tmp_path / "root"
    root.mkdir()
    prom = tmp_path / "virtbackup.prom"
    job = tmp_path / "nightly.toml"
    job.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nencrypt = true\nkey_file = "{key}"\n'
                   f'metrics_file = "{prom}"\n')
    for extra in ((), ("--dry-run",), ("--json",)):
        r = cli("run", job, *extra)
        assert r.rc == 2, r
        assert one_error_line(r) == (f"virtbackup: error: job file {job}:4: key 'key_file' is refused: key file "
                                     f"{key} is accessible by other users (mode 0644); chmod 600 it first")
        assert key_free(r.out, r.err)
    assert list(root.iterdir()) == [] and not prom.exists()
    assert checkpoint_names(d.dom) == []


def test_job_compress_is_recorded_in_each_point(make_domain, tmp_path):
    """compress = "zstd" for the job, "zlib" for one domain's table (zstd alone could be backup's
    default: the zlib domain shows the job's setting really reaches the child)."""
    prefix = f"vbjk-{secrets.token_hex(3)}"
    a = make_domain({"vda": 16 * MiB}, name=f"{prefix}-a")
    b = make_domain({"vda": 16 * MiB}, name=f"{prefix}-b")
    for d in (a, b):
        d.write("vda", 0x5a, MiB, 4 * MiB)
    root = tmp_path / "root"
    root.mkdir()
    job = tmp_path / "nightly.toml"
    job.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nparallel = 2\ncompress = "zstd"\n'
                   f'[domain."{b.name}"]\ncompress = "zlib"\n')
    out = run(job, expect_rc=0)
    for d, want in ((a, "zstd"), (b, "zlib")):
        assert by_domain(out)[d.name]["status"] == "ok"
        lst = cli("list", root / d.name, "--json")
        assert lst.rc == 0, lst
        assert [p.get("compression") for p in lst.json()["points"]] == [want]
        helpers.assert_point_restores(root / d.name, "0001", d.expected(), tmp_path / f"restored-{d.name}")
