"""A hostile review of compressed chains (issue 24): odd disk sizes, discard, raw disks, 2 MiB
clusters, every transport; kills during the push recompress and during a prune's recompress;
a file at the twin's name; hand-edited records; compression with encryption.

Each test asserts what must hold; a failure message starting "DEFECT:" names what broke.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from tests.support import scratch
from tests.support.helpers import ROOT, checkpoint_names, cli, one_error_line, snapshot_dir
from virtbackup.qemu import qemu_img

MiB = 1 << 20
KiB = 1 << 10


def backup(name: str, bdir: Path, level: str, *extra: object, env: Dict[str, str] | None = None,
           what: str = "") -> dict:
    r = cli("backup", name, bdir, "--level", level, "--json", *extra) if env is None else _cli_env(
        env, "backup", name, bdir, "--level", level, "--json", *extra)
    assert r.rc == 0, (f"DEFECT: {what}: " if what else "") + repr(r)
    return r.json()["point"]


def _cli_env(env: Dict[str, str], *args: object):
    from tests.support.helpers import CLIResult
    cmd = [sys.executable, "-m", "virtbackup.cli", *map(str, args)]
    return CLIResult(subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), **env}))


def restore_check(bdir: Path, point: str, want: Dict[str, bytes], out: Path) -> None:
    r = cli("restore", bdir, out, "--point", point)
    assert r.rc == 0, r
    for disk, data in want.items():
        got = scratch.read_raw(out / f"{disk}.qcow2")
        assert len(got) == len(data), f"DEFECT: point {point} {disk}: size {len(got)} != {len(data)}"
        diff = scratch.first_difference(got, data)
        assert diff is None, f"DEFECT: point {point} disk {disk}: restores different bytes from byte {diff}"


def leftovers(bdir: Path) -> List[str]:
    return sorted(str(p.relative_to(bdir)) for p in bdir.rglob("*")
                  if p.name.endswith(".z") or p.name.endswith(".partial"))


def discard(sd: scratch.ScratchDomain, target: str, offset: int, length: int) -> None:
    """A discard the guest's disk honours (the domain has discard='unmap', see _unmap)."""
    sd.qemu_io(target, f"discard {offset} {length}")
    sd.qemu_io(target, "flush")
    out = sd.qemu_io(target, f"read -P 0 {offset} {length}")
    assert "Pattern verification failed" not in out, f"the discard was not honoured: {out}"
    sd.models[target].write(0, offset, length)


def _unmap(sd: scratch.ScratchDomain) -> None:
    from lxml import etree
    x = etree.fromstring(sd.dom.XMLDesc(0).encode())
    for d in x.findall("devices/disk/driver"):
        d.set("discard", "unmap")
    sd.dom = sd.conn.defineXML(etree.tostring(x, encoding="unicode"))


# -- odd sizes, discard, every transport ---------------------------------------------------------
ODD = 40 * MiB + 12 * KiB + 512       # not a multiple of 64 KiB (nor of 4 KiB)


@pytest.mark.parametrize("transport", ["push", "pull", "pull-libnbd", "offline"])
def test_partial_last_cluster_and_discard_restore_bit_exact(make_domain, tmp_path, monkeypatch, transport):
    sd = make_domain({"vda": ODD}, start=False)
    online = transport != "offline"
    if transport == "pull-libnbd":
        monkeypatch.setenv("VIRTBACKUP_PULL_WHOLE_COPY", "libnbd")
    extra = ["--mode", "pull"] if transport.startswith("pull") else (["--mode", "push"] if online else [])

    def w(pattern: int, off: int, n: int) -> None:
        if online:
            sd.write("vda", pattern, off, n)
        else:
            scratch.write_offline(sd, "vda", pattern, off, n)

    if online:
        _unmap(sd)
        sd.dom.create()
    w(0x11, 0, 2 * MiB)
    w(0x22, ODD - 20 * KiB, 20 * KiB)          # over the partial last cluster
    w(0x23, ODD - 512, 512)
    bdir = tmp_path / "b"
    seen = {}
    odd = f"a {transport} backup of a disk whose size ({ODD}) is not a multiple of 64 KiB fails"
    p = backup(sd.name, bdir, "full", "--compress", "zstd", *extra, what=odd)
    seen[p["id"]] = sd.expected()
    w(0x33, ODD - 4 * KiB - 512, 4 * KiB)      # the last cluster only, a narrow run
    if online:
        discard(sd, "vda", 0, MiB)             # discard over the full's data (backing data)
    else:
        w(0, 0, MiB)
    w(0, ODD - 12 * KiB, 4 * KiB)              # zeroes inside the partial last cluster
    p = backup(sd.name, bdir, "inc", *extra, what=odd)
    seen[p["id"]] = sd.expected()
    w(0x44, ODD - 1024, 1024)
    p = backup(sd.name, bdir, "diff", *extra)
    seen[p["id"]] = sd.expected()
    points = json.loads(cli("list", bdir, "--json").out)["points"]
    assert [q["compression"] for q in points] == ["zstd"] * 3
    for pid, want in seen.items():
        restore_check(bdir, pid, want, tmp_path / f"out-{pid}")
    r = cli("verify", bdir, "--deep")
    assert r.rc == 0, r
    assert leftovers(bdir) == []


# -- several disks: 2 MiB clusters and raw, the default (auto) transport ----------------------------
def _define(sd: scratch.ScratchDomain, raw: List[str]) -> None:
    """Redefine the (shut off) domain with the `raw` targets as raw files."""
    from lxml import etree
    x = etree.fromstring(sd.dom.XMLDesc(0).encode())
    for d in x.findall("devices/disk"):
        t = d.find("target").get("dev")
        if t in raw:
            d.find("driver").set("type", "raw")
    sd.dom = sd.conn.defineXML(etree.tostring(x, encoding="unicode"))


def test_multi_disk_2m_clusters_and_raw_default_transport(make_domain, tmp_path):
    sd = make_domain({"vda": 48 * MiB, "vdb": 20 * MiB + 4 * KiB, "vdc": 24 * MiB}, start=False)
    sd.disk_path("vda").unlink()
    qemu_img.create(sd.disk_path("vda"), 48 * MiB, cluster_size=2 * MiB)
    raw = sd.disk_path("vdb")
    raw.unlink()
    with open(raw, "wb") as f:
        f.truncate(20 * MiB + 4 * KiB)
    _define(sd, ["vdb"])
    sd.dom.create()
    sd.write("vda", 0x51, 3 * MiB + 4 * KiB, 5 * MiB)
    sd.write("vdb", 0x52, 20 * MiB - 8 * KiB, 12 * KiB)
    sd.write("vdc", 0x53, 0, 4 * MiB)
    bdir = tmp_path / "b"
    seen = {}
    p = backup(sd.name, bdir, "full", "--compress", "zstd")   # the default transport
    seen[p["id"]] = sd.expected()
    sd.write("vda", 0x61, 4 * MiB + 4 * KiB, 4 * KiB)
    sd.write("vda", 0, 5 * MiB, 64 * KiB)
    sd.write("vdb", 0x62, 7 * KiB, 3 * KiB)
    sd.write("vdc", 0, 0, 2 * MiB + 4 * KiB)
    p = backup(sd.name, bdir, "auto")
    seen[p["id"]] = sd.expected()
    points = json.loads(cli("list", bdir, "--json").out)["points"]
    assert all(q["compression"] == "zstd" for q in points), points
    for pid, want in seen.items():
        restore_check(bdir, pid, want, tmp_path / f"out-{pid}")
    assert cli("verify", bdir, "--deep").rc == 0


# -- kills during the recompress ---------------------------------------------------------------------
RUNNER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from virtbackup.qemu import qemu_img
real = qemu_img.compress_into
sig = getattr(signal, sys.argv[1])
when = sys.argv[2]
def hit(*a, **k):
    if when == "before":
        os.kill(os.getpid(), sig)
    real(*a, **k)
    if when == "after":
        os.kill(os.getpid(), sig)
qemu_img.compress_into = hit
from virtbackup.cli import main
sys.argv = ["virtbackup", *sys.argv[3:]]
main()
"""


def killed_cli(tmp: Path, sig: str, when: str, *args: object) -> subprocess.CompletedProcess:
    script = tmp / "killrunner.py"
    script.write_text(textwrap.dedent(RUNNER.format(root=str(ROOT))))
    return subprocess.run([sys.executable, str(script), sig, when, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("sig,when", [("SIGKILL", "after"), ("SIGTERM", "before")])
def test_signal_during_push_recompress(make_domain, tmp_path, sig, when):
    sd = make_domain({"vda": 32 * MiB})
    sd.write("vda", 0x31, 0, 4 * MiB)
    bdir = tmp_path / "b"
    backup(sd.name, bdir, "full", "--mode", "push", "--compress", "zstd")
    sd.write("vda", 0x32, MiB, 2 * MiB)
    meta = (bdir / "virtbackup.json").read_bytes()
    p = killed_cli(tmp_path, sig, when, "backup", sd.name, bdir, "--mode", "push", "--level", "inc")
    if sig == "SIGKILL":
        assert p.returncode == -9, p
    else:
        assert p.returncode == 1, f"SIGTERM during the recompress: {p}"
        errs = [ln for ln in p.stderr.splitlines() if ln.startswith("virtbackup: error:")]
        assert len(errs) == 1, p
        assert (bdir / "virtbackup.json").read_bytes() == meta, "DEFECT: the interrupted run recorded something"
        assert leftovers(bdir) == [], f"DEFECT: SIGTERM left {leftovers(bdir)}"
        assert checkpoint_names(sd.dom) == [json.loads(meta)["points"][0]["checkpoint"]], \
            "DEFECT: SIGTERM left its checkpoint"
    assert (bdir / "virtbackup.json").read_bytes() == meta
    # the next run cleans up and takes the inc
    p2 = backup(sd.name, bdir, "inc", "--mode", "push")
    assert p2["level"] == "inc" and p2["compression"] == "zstd"
    assert leftovers(bdir) == [], f"DEFECT: after the next run: {leftovers(bdir)}"
    assert len(checkpoint_names(sd.dom)) == 2
    restore_check(bdir, p2["id"], sd.expected(), tmp_path / "out")
    assert cli("verify", bdir, "--deep").rc == 0


def _merge_chain(sd: scratch.ScratchDomain, bdir: Path) -> Dict[str, Dict[str, bytes]]:
    seen = {}
    p = backup(sd.name, bdir, "full", "--mode", "push", "--compress", "zstd")
    seen[p["id"]] = sd.expected()
    for step in range(3):
        sd.write("vda", 0x70 + step, (2 + 3 * step) * MiB, 2 * MiB)
        p = backup(sd.name, bdir, "inc", "--mode", "push")
        seen[p["id"]] = sd.expected()
    meta = json.loads((bdir / "virtbackup.json").read_text())
    meta["points"][0]["created"] = "2026-11-29T10:00:00+00:00"
    (bdir / "virtbackup.json").write_text(json.dumps(meta))
    return seen


def test_sigkill_during_prune_recompress_then_prune_again(make_domain, tmp_path):
    sd = make_domain({"vda": 32 * MiB})
    sd.write("vda", 0x41, 0, 6 * MiB)
    bdir = tmp_path / "b"
    seen = _merge_chain(sd, bdir)
    meta = (bdir / "virtbackup.json").read_bytes()
    p = killed_cli(tmp_path, "SIGKILL", "after", "prune", bdir, "--keep-daily", "2")
    assert p.returncode == -9, p
    assert (bdir / "virtbackup.json").read_bytes() == meta
    assert cli("verify", bdir).rc == 0
    left = leftovers(bdir)
    r = cli("prune", bdir, "--keep-daily", "2", "--json")
    if r.rc != 0:
        third = cli("prune", bdir, "--keep-daily", "2", "--json")
        assert r.rc == 0, (f"DEFECT: the prune after a prune killed during its recompress fails "
                           f"(left {left}; a third prune: rc {third.rc}): {r.err.strip()}")
    assert leftovers(bdir) == [], f"DEFECT: the killed prune's twin is never removed: {leftovers(bdir)}"
    ids = [q["id"] for q in json.loads(cli("list", bdir, "--json").out)["points"]]
    assert ids == ["0001", "0004"], ids
    for pid in ids:
        restore_check(bdir, pid, seen[pid], tmp_path / f"out-{pid}")


def test_twin_name_taken_before_prune(make_domain, tmp_path):
    """A regular file (or a symlink) at the name of the twin a prune will write: refused with one
    line and nothing changed, or handled; never deleted silently, never followed."""
    sd = make_domain({"vda": 32 * MiB})
    sd.write("vda", 0x41, 0, 6 * MiB)
    bdir = tmp_path / "b"
    _merge_chain(sd, bdir)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    twin = bdir / "points" / "0004" / "vda.1.qcow2.z"
    twin.symlink_to(victim)
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep-daily", "2")
    assert r.rc != 0, r
    one_error_line(r)
    assert victim.read_text() == "precious"
    assert snapshot_dir(bdir) == before
    twin.unlink()
    twin.write_text("someone's file")
    r = cli("prune", bdir, "--keep-daily", "2")
    kept = twin.exists()
    assert r.rc == 0, (f"DEFECT: a stray regular file at the twin's name fails the prune (the file is "
                       f"{'still there' if kept else 'deleted by the failed prune'}): {r.err.strip()}")


# -- hand-edited records ----------------------------------------------------------------------------
def test_hand_edited_data_size(make_domain, tmp_path):
    sd = make_domain({"vda": 16 * MiB}, start=False)
    scratch.write_offline(sd, "vda", 0x21, 0, MiB)
    bdir = tmp_path / "b"
    backup(sd.name, bdir, "full")
    meta = bdir / "virtbackup.json"
    d = json.loads(meta.read_text())
    d["points"][0]["disks"]["vda"]["data_size"] = -10 ** 12
    meta.write_text(json.dumps(d))
    r = cli("list", bdir, "--json")
    assert r.rc == 2 or (r.json()["compression_ratio"] or 0) >= 0, \
        f"DEFECT: a negative data_size is accepted and list shows a negative compression ratio: {r.out[-200:]}"


def test_encrypted_dir_and_compress(make_domain, tmp_path, monkeypatch):
    monkeypatch.setenv("VIRTBACKUP_ENCRYPT_ITER_TIME", "10")
    sd = make_domain({"vda": 16 * MiB})
    sd.write("vda", 0x44, 0, MiB)
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    os.chmod(key, 0o600)
    edir = tmp_path / "e"
    r = cli("backup", sd.name, edir, "--encrypt", "--key-file", key, "--json")
    assert r.rc == 0, r
    assert r.json()["point"]["compression"] is None
    before = snapshot_dir(edir)
    for extra in (["--compress", "zstd"], ["--compress", "zlib", "--level", "full"], ["--compress", "zstd",
                                                                                      "--mode", "pull"]):
        r = cli("backup", sd.name, edir, "--key-file", key, *extra)
        assert r.rc == 2 and "encryption" in one_error_line(r), (extra, r)
        assert snapshot_dir(edir) == before
    r = cli("backup", sd.name, edir, "--compress", "zstd")      # no key given
    assert r.rc == 2, r
    one_error_line(r)
    r = cli("backup", sd.name, edir, "--key-file", key, "--compress", "none", "--json")
    assert r.rc == 0 and r.json()["point"]["level"] == "inc", r
    # an old uncompressed dir getting --compress zstd: a new full, never an inc
    pdir = tmp_path / "p"
    backup(sd.name, pdir, "full", "--compress", "none")
    sd.write("vda", 0x45, MiB, MiB)
    r = cli("backup", sd.name, pdir, "--compress", "zstd", "--level", "diff")
    assert r.rc == 2, r
    p = backup(sd.name, pdir, "auto", "--compress", "zstd")
    assert p["level"] == "full" and p["compression"] == "zstd", p
    for bad in ("", " ", "ZSTD", "zstd "):
        r = cli("backup", sd.name, pdir, "--compress", bad)
        assert r.rc == 2, (bad, r)
        one_error_line(r)
