"""Issue 10: damage is refused, never restored or laundered; nothing is read, written or deleted
outside the directories; readers and writers of a backup dir exclude each other.

Real libvirtd and QEMU: scratch domains, data written through HMP qemu-io, every restore
compared byte for byte with what the guest saw. Damage and hostile input are real too:
truncated and swapped images, hand-edited metadata, symlinks, processes killed or stopped at a
named step (the tool's test hooks).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

import libvirt

from tests.integration.test_faults import IN_FLIGHT_DATA, SLOW_IOPS, pause_job
from tests.integration.test_restore_retention import hmp_write
from tests.support import scratch
from tests.support.helpers import (
    assert_point_restores,
    checkpoint_names,
    cli,
    finish,
    one_error_line,
    our_bitmaps,
    snapshot_dir,
    start_cli,
)
from tests.support.qemu import slow_reads
from virtbackup.qemu import qemu_img

MiB = 1 << 20


def build_chain(make_domain, bdir: Path, disks: Dict[str, int], incs: int) -> Tuple[object, Dict[str, dict]]:
    """A full and `incs` incrementals; what the guest saw at each point, by point id."""
    d = make_domain(disks)
    expected: Dict[str, Dict[str, bytes]] = {}
    for i in range(incs + 1):
        for n, disk in enumerate(sorted(disks)):
            d.write(disk, 0x11 + 16 * i + n, (i * 3 + n) * MiB, 1 * MiB)
        r = cli("backup", d.name, bdir, "--level", "full" if i == 0 else "inc", "--json")
        assert r.rc == 0, r
        expected[r.json()["point"]["id"]] = d.expected()
    return d, expected


def restores(bdir: Path, point: str, want: Dict[str, bytes], out: Path) -> None:
    assert_point_restores(bdir, point, want, out)
    shutil.rmtree(out)


def wait_stopped(pid: int, timeout: float = 60) -> None:
    """Until the process has stopped itself (SIGSTOP at a test hook)."""
    deadline = time.monotonic() + timeout
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        assert time.monotonic() < deadline, f"process {pid} never reached its stop point"
        time.sleep(0.05)


def test_damaged_image_is_refused_by_restore_and_prune(make_domain, tmp_path):
    """Defects 1 and 2: a truncated or swapped image mid-chain is never restored or laundered."""
    bdir = tmp_path / "bk"
    d, expected = build_chain(make_domain, bdir, {"vda": 32 * MiB, "vdb": 16 * MiB}, incs=3)
    victim = bdir / "points/0002/vda.qcow2"
    pristine = tmp_path / "pristine.qcow2"
    shutil.copy2(victim, pristine)

    for how in ("truncate", "swap"):
        if how == "truncate":
            os.truncate(victim, victim.stat().st_size // 2)
        else:
            shutil.copyfile(bdir / "points/0003/vda.qcow2", victim)   # another point's image over it
        assert cli("verify", bdir).rc == 1
        out = tmp_path / f"out-{how}"
        r = cli("restore", bdir, out, "--point", "0004")
        line = one_error_line(r)
        assert r.rc == 1 and "points/0002/vda.qcow2" in line and "affected points: 0002, 0003, 0004" in line, r
        assert not out.exists(), "a refused restore must write nothing"
        # salvage: the intact disk, and a word on the missing one
        r = cli("restore", bdir, out, "--point", "0004", "--salvage", "--json")
        assert r.rc == 0, r
        assert set(r.json()["missing"]) == {"vda"} and "points/0002/vda.qcow2" in r.json()["missing"]["vda"]
        assert "not restored" in r.err and not (out / "vda.qcow2").exists()
        assert scratch.first_difference(scratch.read_raw(out / "vdb.qcow2"), expected["0004"]["vdb"]) is None
        shutil.rmtree(out)
        # points below the damage still restore exactly
        restores(bdir, "0001", expected["0001"], tmp_path / f"r1-{how}")
        # prune would rewrite 0003 from the damaged image: refused, nothing changed
        before = snapshot_dir(bdir)
        r = cli("prune", bdir, "--keep", "2")
        line = one_error_line(r)
        assert r.rc == 1 and "cannot consolidate point(s) 0003" in line and "points/0002/vda.qcow2" in line, r
        assert snapshot_dir(bdir) == before
        assert cli("verify", bdir).rc == 1, "the damage must stay visible"

    shutil.copyfile(pristine, victim)
    assert cli("verify", bdir).rc == 0
    r = cli("prune", bdir, "--keep", "2")
    assert r.rc == 0, r
    assert cli("verify", bdir).rc == 0
    for pid in ("0003", "0004"):
        restores(bdir, pid, expected[pid], tmp_path / f"after-{pid}")


def test_hand_edited_metadata_disk_names_and_nesting(make_domain, tmp_path):
    """Defects 3 and 10: a disk name can't escape OUTPUT_DIR; deep nesting is exit 2, one line."""
    bdir = tmp_path / "bk"
    d, expected = build_chain(make_domain, bdir, {"vda": 16 * MiB}, incs=0)
    meta = bdir / "virtbackup.json"
    good = meta.read_text()
    out = tmp_path / "a" / "out"
    for evil in (f"{tmp_path}/escaped", "../escaped", "vda/../../x", "", "v d a"):
        data = json.loads(good)
        data["points"][0]["disks"] = {evil: data["points"][0]["disks"]["vda"]}
        meta.write_text(json.dumps(data))
        for cmd in (("restore", bdir, out), ("verify", bdir), ("prune", bdir, "--keep", "1"), ("list", bdir)):
            r = cli(*cmd)
            assert r.rc == 2 and "corrupt" in one_error_line(r) and "disk name" in r.err, (evil, cmd, r)
        assert not list(tmp_path.rglob("escaped*")) and not out.exists()
    for deep in ("[" * 100000 + "]" * 100000, '{"a":' * 50000 + "1" + "}" * 50000):
        meta.write_text(deep)
        for cmd in (("list", bdir), ("restore", bdir, out), ("verify", bdir)):
            r = cli(*cmd)
            assert r.rc == 2 and "corrupt" in one_error_line(r), (cmd, r)
    meta.write_text(good)
    restores(bdir, "0001", expected["0001"], out)


def test_prune_never_follows_symlinks(make_domain, tmp_path):
    """Defects 4 and 5: a symlinked point dir or a symlink at the name prune writes next: exit 2,
    nothing deleted or written anywhere."""
    bdir = tmp_path / "bk"
    d, expected = build_chain(make_domain, bdir, {"vda": 16 * MiB}, incs=2)
    # 4: points/0002 -> a directory elsewhere, holding unrelated files prune used to delete
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(bdir / "points/0002"), str(elsewhere))
    (elsewhere / "victim.qcow2").write_text("not yours")
    (elsewhere / "domain-victim.xml").write_text("not yours either")
    (bdir / "points/0002").symlink_to(elsewhere)
    outside_before = snapshot_dir(elsewhere)
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 2 and "symlink" in one_error_line(r), r
    assert snapshot_dir(elsewhere) == outside_before and snapshot_dir(bdir) == before
    r = cli("restore", bdir, tmp_path / "o", "--point", "0002")
    assert r.rc == 2 and "symlink" in one_error_line(r), r
    (bdir / "points/0002").unlink()
    for f in ("victim.qcow2", "domain-victim.xml"):
        (elsewhere / f).unlink()
    shutil.move(str(elsewhere), str(bdir / "points/0002"))

    # 5: a dangling symlink where prune writes point 0003's new base image
    target = tmp_path / "outside.qcow2"
    (bdir / "points/0003/vda.1.qcow2").symlink_to(target)
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 2 and "vda.1.qcow2" in one_error_line(r) and "symlink" in r.err, r
    assert not target.exists() and snapshot_dir(bdir) == before
    (bdir / "points/0003/vda.1.qcow2").unlink()
    assert cli("prune", bdir, "--keep", "1").rc == 0
    restores(bdir, "0003", expected["0003"], tmp_path / "r3")


def test_lock_files_never_followed_and_busy_names_live_holder(make_domain, tmp_path, monkeypatch):
    """Defects 6 and 12."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(run_dir))
    bdir = tmp_path / "bk"
    d, expected = build_chain(make_domain, bdir, {"vda": 16 * MiB}, incs=0)
    lock = bdir / ".virtbackup.lock"
    dead_pid = lock.read_text().strip()          # the finished backup's pid, still in the file
    assert dead_pid.isdigit() and not Path(f"/proc/{dead_pid}").exists()

    # 12: the lock is held by a process that wrote no pid (this test): name it, not the dead one
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for cmd in (("backup", d.name, bdir), ("prune", bdir, "--keep", "1")):
            r = cli(*cmd, timeout=60)
            line = one_error_line(r)
            assert r.rc == 1 and f"pid {os.getpid()}" in line and dead_pid not in line, r
    finally:
        os.close(fd)

    # 6: lock files as symlinks to a file: refused (exit 2), the file untouched
    precious = tmp_path / "precious"
    precious.write_text("precious")
    lock.unlink()
    lock.symlink_to(precious)
    for cmd in (("backup", d.name, bdir), ("prune", bdir, "--keep", "1"), ("verify", bdir),
                ("restore", bdir, tmp_path / "o")):
        r = cli(*cmd)
        assert r.rc == 2 and "symlink" in one_error_line(r), (cmd, r)
    assert precious.read_text() == "precious" and not (tmp_path / "o").exists()
    lock.unlink()
    dom_lock = run_dir / f"domain-{d.dom.UUIDString()}.lock"
    dom_lock.unlink(missing_ok=True)
    dom_lock.symlink_to(precious)
    r = cli("backup", d.name, bdir)
    assert r.rc == 2 and "symlink" in one_error_line(r), r
    assert precious.read_text() == "precious"
    dom_lock.unlink(missing_ok=True)
    assert cli("backup", d.name, bdir).rc == 0


def test_empty_string_arguments_are_usage_errors(make_domain, tmp_path, restored_domains):  # noqa: F811
    """Defect 7: "" is never the current directory, and --define "" is not 'no domain'."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    d = make_domain({"vda": 16 * MiB})
    r = cli("backup", d.name, "", cwd=cwd)
    assert r.rc == 2 and "empty" in one_error_line(r), r
    bdir = tmp_path / "bk"
    assert cli("backup", d.name, bdir).rc == 0
    for cmd in (("restore", bdir, ""), ("restore", "", "out"), ("restore", bdir, "out", "--define", ""),
                ("restore", bdir, "out", "--disk", ""), ("verify", ""), ("list", ""), ("prune", "", "--keep", "1"),
                ("flatten", ""), ("-c", "", "list", bdir), ("repair", d.name, "")):
        r = cli(*cmd, cwd=cwd)
        assert r.rc == 2 and one_error_line(r), (cmd, r)
    assert list(cwd.iterdir()) == []
    assert checkpoint_names(d.dom) == [c for c in checkpoint_names(d.dom) if c.startswith("virtbackup-")]


def test_killed_first_backup_leftovers_are_recognised(make_domain, tmp_path):
    """Defect 8: SIGKILL during the very first backup into a new directory."""
    d = make_domain({"vda": 128 * MiB})
    d.write("vda", 0x41, 0, IN_FLIGHT_DATA)
    bdir = tmp_path / "bk"
    with slow_reads(d.dom, "vda", SLOW_IOPS):
        proc = start_cli("backup", d.name, bdir, "--json", "--mode", "push")
        caught = pause_job(d.dom, proc)
    assert caught, f"the first backup ended before it was paused: {finish(proc)}"
    proc.kill()
    proc.wait()
    left = [c for c in checkpoint_names(d.dom) if c.endswith("-0001") and (bdir / "virtbackup.json").exists()
            and json.loads((bdir / "virtbackup.json").read_text())["dir_id"] in c]
    assert left, "the directory must record its chain id before its first checkpoint exists"
    r = cli("repair", d.name, bdir, "--dry-run")
    assert r.rc == 0 and "nothing to repair" not in r.out, r
    d.write("vda", 0x7e, 1 * MiB, 1 * MiB)
    want = d.expected()
    r = cli("backup", d.name, bdir, "--json")
    assert r.rc == 0, r
    prefix = r.json()["point"]["checkpoint"][:-4]
    ours = [c for c in checkpoint_names(d.dom) if c.startswith(prefix)]
    assert ours == [r.json()["point"]["checkpoint"]], ours
    assert our_bitmaps(d.dom, prefix) == {"vda": ours}
    restores(bdir, r.json()["point"]["id"], want, tmp_path / "r")


def test_killed_restore_is_cleaned_by_rerun(make_domain, tmp_path):
    """Defect 9: a restore killed after placing one of two disks; the rerun cleans and restores."""
    bdir = tmp_path / "bk"
    d, expected = build_chain(make_domain, bdir, {"vda": 16 * MiB, "vdb": 16 * MiB}, incs=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.qcow2").write_text("keep me")
    r = subprocess.run([*fault_cmd("kill", "restore-placed:1"), "restore", str(bdir), str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r
    assert (out / "vda.qcow2").exists() and list(out.glob(".virtbackup-restore-*"))
    r2 = cli("restore", bdir, out)
    assert r2.rc == 0 and "interrupted restore" in r2.err, r2
    assert sorted(p.name for p in out.iterdir()) == ["unrelated.qcow2", "vda.qcow2", "vdb.qcow2"]
    for disk in ("vda", "vdb"):
        assert scratch.first_difference(scratch.read_raw(out / f"{disk}.qcow2"), expected["0002"][disk]) is None


def test_define_attaches_hot_plugged_disk(make_domain, conn, tmp_path, restored_domains):  # noqa: F811
    """Defect 11: a disk hot-plugged (live only) before the backup is attached to the restored domain."""
    d = make_domain({"vda": 16 * MiB})
    extra = tmp_path / "hot.qcow2"
    qemu_img.create(extra, 8 * MiB)
    d.dom.attachDeviceFlags(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                            f"<source file='{extra}'/><target dev='vdb' bus='virtio'/></disk>",
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
    d.write("vda", 0x21, 0, 1 * MiB)
    hmp_write(d.dom, "vdb", 0x5a, 1 * MiB, 1 * MiB)
    bdir = tmp_path / "bk"
    r = cli("backup", d.name, bdir, "--json")
    assert r.rc == 0 and set(r.json()["point"]["disks"]) == {"vda", "vdb"}, r
    name = f"{d.name}-r"
    restored_domains.append(name)
    out = tmp_path / "out"
    r = cli("restore", bdir, out, "--define", name)
    assert r.rc == 0 and "vdb" in r.err and "hot-plugged" in r.err, r
    xml = conn.lookupByName(name).XMLDesc(0)
    assert f"{out}/vdb.qcow2" in xml and f"{out}/vda.qcow2" in xml, xml
    want = bytearray(8 * MiB)
    want[1 * MiB:2 * MiB] = b"\x5a" * MiB
    assert scratch.first_difference(scratch.read_raw(out / "vdb.qcow2"), bytes(want)) is None


def test_readers_and_prune_exclude_each_other(make_domain, tmp_path):
    """Defect 13 and the directory lock: verify/restore during a prune wait for it (no false
    damage); a prune during a restore waits (bounded) or refuses; the restore stays bit-exact."""
    bdir = tmp_path / "bk"
    d, expected = build_chain(make_domain, bdir, {"vda": 16 * MiB, "vdb": 16 * MiB}, incs=4)
    prune = start_fault("stop", "prune-locked", "prune", bdir, "--keep", "3")
    readers = []
    try:
        wait_stopped(prune.pid)
        readers = [start_cli("verify", bdir), start_cli("restore", bdir, tmp_path / "during", "--point", "0004")]
        time.sleep(1.0)
        assert all(p.poll() is None for p in readers), "readers must wait for the prune"
        os.kill(prune.pid, signal.SIGCONT)
        assert finish(prune).rc == 0
        v, r = (finish(p) for p in readers)
        assert v.rc == 0 and "ok" in v.out, v
        assert r.rc == 0, r
        for disk in ("vda", "vdb"):
            got = scratch.read_raw(tmp_path / "during" / f"{disk}.qcow2")
            assert scratch.first_difference(got, expected["0004"][disk]) is None
    finally:
        for p in [prune, *readers]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()

    # a restore in progress (stopped after its first disk, holding the shared lock)
    rest = start_fault("stop", "restore-placed:1", "restore", bdir, tmp_path / "r2", "--point", "0004")
    waiting = None
    try:
        wait_stopped(rest.pid)
        r = finish(start_cli("prune", bdir, "--keep", "1", env={"VIRTBACKUP_LOCK_WAIT": "1"}))
        line = one_error_line(r) if r.rc else ""
        assert r.rc == 1 and f"pid {rest.pid}" in line and "being read" in line, r
        waiting = start_cli("prune", bdir, "--keep", "1")
        time.sleep(1.0)
        assert waiting.poll() is None, "the prune must wait for the restore"
        os.kill(rest.pid, signal.SIGCONT)
        assert finish(rest).rc == 0
        assert finish(waiting).rc == 0
    finally:
        for p in (rest, waiting):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    for disk in ("vda", "vdb"):
        got = scratch.read_raw(tmp_path / "r2" / f"{disk}.qcow2")
        assert scratch.first_difference(got, expected["0004"][disk]) is None
    assert cli("verify", bdir).rc == 0
    restores(bdir, "latest", expected["0005"], tmp_path / "r3")


# -- helpers for running the CLI with a test hook ---------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent.parent


def fault_cmd(action: str, step: str) -> List[str]:
    """The CLI, SIGKILLed or SIGSTOPped at a named step (tests/support/faultpoint.py)."""
    import sys
    return [sys.executable, "-m", "tests.support.faultpoint", action, step]


def start_fault(action: str, step: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([*fault_cmd(action, step), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
