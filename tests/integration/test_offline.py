"""Backups of shut-off domains: the same chain as online, and libvirt never starts the domain.

Writes made while the domain is off go through the `qemu-io` binary (QEMU's block layer marks
the persistent bitmaps, as guest writes would); the scratch model follows them byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import libvirt
import pytest

from tests.support import helpers
from tests.support.helpers import (
    assert_point_restores,
    checkpoint_names,
    cli,
    image_held,
    one_error_line,
    snapshot_dir,
    take_backup,
    tmpfs,
)

MiB = 1 << 20
KiB = 1 << 10


backup = take_backup


def image_bitmaps(d, target: str) -> Dict[str, List[str]]:
    return helpers.image_bitmaps(d.disk_path(target))


def times_started(d) -> int:
    """How often libvirt started the domain, from its log (the line QEMU start-up writes)."""
    log = Path(f"/var/log/libvirt/qemu/{d.name}.log")
    return log.read_text(errors="replace").count("starting up") if log.exists() else 0


@pytest.fixture
def lifecycle(conn) -> Iterator[Dict[str, List[int]]]:
    """Every lifecycle event libvirt sends, per domain name (STARTED would mean it was started)."""
    seen: Dict[str, List[int]] = {}

    def cb(_c, dom, event, _detail, _o):
        seen.setdefault(dom.name(), []).append(event)

    cb_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
    yield seen
    conn.domainEventDeregisterAny(cb_id)


def assert_stays_off(d, lifecycle, starts_before: int) -> None:
    assert not d.dom.isActive()
    assert d.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert times_started(d) == starts_before
    time.sleep(0.05)   # let the event thread deliver anything pending
    assert libvirt.VIR_DOMAIN_EVENT_STARTED not in lifecycle.get(d.name, [])


def test_online_full_offline_incs_online_inc(make_domain, lifecycle, tmp_path):
    from tests.support import scratch
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    bdir = tmp_path / "bk"
    expected = {}

    d.write("vda", 0x11, 0, 2 * MiB)
    d.write("vdb", 0x21, 4 * MiB, 1 * MiB)
    r = backup(d.name, bdir, "full")
    prefix = r["point"]["checkpoint"][:-4]
    expected["0001"] = d.expected()

    # A clean stop: QEMU stores the bitmaps (no 'in-use' flag = consistent)
    scratch.stop_cleanly(d)
    assert d.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    for t in ("vda", "vdb"):
        assert image_bitmaps(d, t) == {prefix + "0001": ["auto"]}
    starts = times_started(d)
    lifecycle.clear()

    # writes while off: overwrite, zeroes over old data, a new segment at the end
    scratch.write_offline(d, "vda", 0x31, 1 * MiB, 2 * MiB)
    scratch.write_offline(d, "vdb", 0, 4 * MiB, 512 * KiB)
    scratch.write_offline(d, "vdb", 0x32, 15 * MiB, 1 * MiB)
    r = backup(d.name, bdir, "inc")
    p = r["point"]
    assert p["level"] == "inc" and p["parent"] == "0001" and p["base_checkpoint"] == prefix + "0001"
    assert not p["disks"]["vda"]["copied_full"]
    assert p["disks"]["vdb"]["size"] < 4 * MiB        # the changes only
    expected["0002"] = d.expected()
    assert_stays_off(d, lifecycle, starts)
    # the new bitmap is stored and consistent, the base one untouched
    for t in ("vda", "vdb"):
        assert image_bitmaps(d, t) == {prefix + "0001": ["auto"], prefix + "0002": ["auto"]}
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0001", prefix + "0002"]

    # auto continues offline too; the retired checkpoint 0001... stays (full of the chain), 0002 goes
    scratch.write_offline(d, "vda", 0x41, 30 * MiB, 64 * KiB)
    r = backup(d.name, bdir, "auto")
    assert r["point"]["level"] == "inc" and r["point"]["parent"] == "0002"
    assert r["removed_checkpoints"] == [prefix + "0002"]
    expected["0003"] = d.expected()
    assert_stays_off(d, lifecycle, starts)
    for t in ("vda", "vdb"):   # libvirt dropped only metadata; the bitmap went from the image too
        assert sorted(image_bitmaps(d, t)) == [prefix + "0001", prefix + "0003"]

    # the domain runs again: the next online incremental continues from the offline checkpoint
    d.dom.create()
    d.write("vda", 0x51, 8 * MiB, 1 * MiB)
    d.write("vdb", 0x52, 0, 64 * KiB)
    r = backup(d.name, bdir, "inc")
    assert r["point"]["parent"] == "0003" and r["point"]["base_checkpoint"] == prefix + "0003"
    expected["0004"] = d.expected()
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0001", prefix + "0004"]
    cp4 = d.dom.checkpointLookupByName(prefix + "0004")
    assert cp4.getParent().getName() == prefix + "0001"   # 0003 was its parent until retired

    assert cli("verify", bdir).rc == 0
    for pid, exp in expected.items():
        assert_point_restores(bdir, pid, exp, tmp_path / f"restore-{pid}")


def test_never_started_domain_full_inc_diff_offline(make_domain, lifecycle, tmp_path):
    from tests.support import scratch
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    expected = {}
    assert times_started(d) == 0

    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    scratch.write_offline(d, "vdb", 0x12, 8 * MiB, 256 * KiB)
    r = cli("backup", d.name, bdir, "--json")
    assert r.rc == 0, r
    assert "shut off" in r.err and "no previous backup" in r.err
    p = r.json()["point"]
    assert p["level"] == "full" and set(p["disks"]) == {"vda", "vdb"}
    prefix = p["checkpoint"][:-4]
    expected["0001"] = d.expected()

    scratch.write_offline(d, "vda", 0x21, 512 * KiB, 1 * MiB)
    assert backup(d.name, bdir, "inc")["point"]["parent"] == "0001"
    expected["0002"] = d.expected()

    scratch.write_offline(d, "vdb", 0, 8 * MiB, 64 * KiB)
    scratch.write_offline(d, "vda", 0x31, 20 * MiB, 128 * KiB)
    r = backup(d.name, bdir, "diff")
    p = r["point"]
    assert p["level"] == "diff" and p["parent"] == "0001" and p["base_checkpoint"] == prefix + "0001"
    expected["0003"] = d.expected()
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0001", prefix + "0003"]

    scratch.write_offline(d, "vdb", 0x41, 0, 4 * KiB)
    assert backup(d.name, bdir, "inc")["point"]["parent"] == "0003"
    expected["0004"] = d.expected()

    assert times_started(d) == 0 and not d.dom.isActive()
    assert libvirt.VIR_DOMAIN_EVENT_STARTED not in lifecycle.get(d.name, [])
    for t in ("vda", "vdb"):
        assert image_bitmaps(d, t) == {prefix + "0001": ["auto"], prefix + "0004": ["auto"]}
    assert cli("verify", bdir).rc == 0
    for pid, exp in expected.items():
        assert_point_restores(bdir, pid, exp, tmp_path / f"restore-{pid}")


def test_enospc_offline_changes_nothing_and_retry_works(make_domain, tmp_path):
    from tests.support import scratch
    d = make_domain({"vda": 64 * MiB}, start=False)
    with tmpfs(tmp_path / "tiny", "6M") as mnt:
        bdir = mnt / "bk"
        scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
        # uncompressed: pattern data would fit compressed (test_compress fills it with random data)
        r = cli("backup", d.name, bdir, "--level", "full", "--compress", "none", "--json")
        assert r.rc == 0, r
        r = r.json()
        prefix = r["point"]["checkpoint"][:-4]
        e1 = d.expected()
        before_files = snapshot_dir(bdir)
        before_cps = checkpoint_names(d.dom)
        before_bitmaps = image_bitmaps(d, "vda")

        scratch.write_offline(d, "vda", 0x22, 8 * MiB, 12 * MiB)   # more than the space left
        r = cli("backup", d.name, bdir, "--level", "inc")
        assert r.rc == 1, r
        assert "No space left on device" in one_error_line(r)
        assert snapshot_dir(bdir) == before_files
        assert checkpoint_names(d.dom) == before_cps
        assert image_bitmaps(d, "vda") == before_bitmaps == {prefix + "0001": ["auto"]}
        assert not list((bdir / "points").glob("*.partial"))
        assert not d.dom.isActive()

        scratch.write_offline(d, "vda", 0x33, 30 * MiB, 1 * MiB)
        subprocess.run(["mount", "-o", "remount,size=64M", str(mnt)], check=True)
        r = backup(d.name, bdir, "inc")
        assert r["point"]["parent"] == "0001" and r["point"]["id"] == "0002"
        assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")
        assert_point_restores(bdir, "0001", e1, tmp_path / "r1")


def test_image_in_use_refused_with_one_line_and_nothing_changed(make_domain, tmp_path):
    from tests.support import scratch
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir, "full")
    files = snapshot_dir(bdir)
    cps = checkpoint_names(d.dom)
    bitmaps = image_bitmaps(d, "vda")
    with image_held(d.disk_path("vda")):
        r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 1, r
    line = one_error_line(r)
    assert "in use by another process" in line and "vda" in line
    assert snapshot_dir(bdir) == files and checkpoint_names(d.dom) == cps
    assert image_bitmaps(d, "vda") == bitmaps
    assert not d.dom.isActive()
    assert backup(d.name, bdir, "inc")["point"]["parent"] == "0001"


def test_inconsistent_bitmap_offline_inc_refused_auto_takes_full(make_domain, tmp_path):
    from tests.support import scratch
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir, "full")
    # A QEMU process killed while it had the image open leaves the bitmaps it loaded flagged
    # in-use. (One created in that process and never stored would simply be missing.)
    with image_held(d.disk_path("vda"), kill=True):
        pass
    prefix = cli("list", bdir, "--json").json()["points"][0]["checkpoint"][:-4]
    assert "in-use" in image_bitmaps(d, "vda")[prefix + "0001"]
    scratch.write_offline(d, "vda", 0x22, 4 * MiB, 1 * MiB)
    files = snapshot_dir(bdir)

    r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 2, r
    assert "inconsistent" in one_error_line(r)
    assert snapshot_dir(bdir) == files

    r = backup(d.name, bdir, "auto")
    assert r["point"]["level"] == "full" and "inconsistent" in r["point"]["reason"]
    assert not d.dom.isActive()
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")
    # the broken chain is retired; the new full's bitmap is the only one of ours left
    assert image_bitmaps(d, "vda") == {prefix + "0002": ["auto"]}


def test_domain_started_before_the_offline_job_is_refused(make_domain, tmp_path):
    """The race guard: a domain that runs by the time the private QEMU would open its images."""
    from virtbackup import backup as engine_mod
    from virtbackup.runners import offline
    from virtbackup.store import chain
    from virtbackup.virt import host
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    backup(d.name, bdir, "full")
    files = snapshot_dir(bdir)
    cps = checkpoint_names(d.dom)
    d.dom.create()
    conn = host.connect()
    try:
        dom = conn.lookupByName(d.name)
        b = chain.BackupDir(bdir)
        handle = host.DomainHandle(conn, dom)
        job = engine_mod.Engine(handle, b, offline.OfflineRunner(handle, lambda _m: None))
        with pytest.raises(Exception) as ei:
            job.run(b.load(), "inc", ())
        assert "was started during the offline backup" in str(ei.value)
        assert getattr(ei.value, "exit_code", None) == 1
    finally:
        conn.close()
    assert snapshot_dir(bdir) == files and checkpoint_names(d.dom) == cps
    assert d.dom.isActive()


def _private_qemu_of(pid: int) -> Optional[int]:
    """The pid of process `pid`'s qemu child (the private QEMU), if it has one right now."""
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            try:
                if "qemu-system" in Path(f"/proc/{child}/cmdline").read_text():
                    return int(child)
            except OSError:
                pass
    return None


def _start_slow_backup(d, bdir: Path) -> "tuple[subprocess.Popen, int]":
    """A CLI offline incremental copying at 1 MiB/s; returns it and its private QEMU's pid."""
    import sys
    env = dict(os.environ, VIRTBACKUP_OFFLINE_SPEED=str(1 * MiB))
    proc = subprocess.Popen([sys.executable, "-m", "virtbackup.cli", "backup", d.name, str(bdir), "--level", "inc"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while True:
        qpid = _private_qemu_of(proc.pid)
        if qpid:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no private QEMU seen: {proc.communicate()}")
        time.sleep(0.005)
    # The job runs once its target grows by a cluster (the empty target is created before QEMU
    # starts; the copy goes at 1 MiB/s): as early in the copy as can be seen. A fixed sleep was
    # too short on a loaded machine.
    deadline = time.monotonic() + 30
    first: Optional[int] = None
    while time.monotonic() < deadline and proc.poll() is None:
        size: Optional[int] = None
        for target in (bdir / "points").glob("*.partial/vda.qcow2"):
            try:
                size = target.stat().st_size
            except OSError:
                pass
        if size is not None:
            first = size if first is None else first
            if size >= first + 64 * 1024:
                break
        time.sleep(0.005)
    return proc, qpid


def test_sigint_during_offline_job_quits_qemu_cleanly_and_records_nothing(make_domain, tmp_path):
    from tests.support import scratch
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir, "full")
    prefix = cli("list", bdir, "--json").json()["points"][0]["checkpoint"][:-4]
    scratch.write_offline(d, "vda", 0x22, 2 * MiB, 8 * MiB)
    files = snapshot_dir(bdir)
    cps = checkpoint_names(d.dom)

    proc, _qpid = _start_slow_backup(d, bdir)    # the copy would take ~8 s
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "backup interrupted by SIGINT; nothing was recorded" in err
    assert snapshot_dir(bdir) == files and checkpoint_names(d.dom) == cps
    # QEMU quit cleanly: the base bitmap is consistent, the interrupted run's bitmap is gone
    assert image_bitmaps(d, "vda") == {prefix + "0001": ["auto"]}
    assert not d.dom.isActive()
    r = backup(d.name, bdir, "inc")
    assert r["point"]["parent"] == "0001"
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")


def test_virtbackup_killed_mid_job_leaves_no_qemu_and_next_run_works(make_domain, tmp_path):
    """SIGKILL can't be caught: the private QEMU gets SIGTERM (parent-death signal) and exits cleanly."""
    from tests.support import scratch
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir, "full")
    prefix = cli("list", bdir, "--json").json()["points"][0]["checkpoint"][:-4]
    scratch.write_offline(d, "vda", 0x22, 2 * MiB, 8 * MiB)
    meta = (bdir / "virtbackup.json").read_bytes()

    proc, qpid = _start_slow_backup(d, bdir)
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{qpid}").exists() and Path(f"/proc/{qpid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the private QEMU outlived virtbackup"
        time.sleep(0.01)
    assert (bdir / "virtbackup.json").read_bytes() == meta
    # QEMU exited cleanly: nothing in-use; the dead run's bitmap is there, with no checkpoint
    bitmaps = image_bitmaps(d, "vda")
    assert bitmaps == {prefix + "0001": ["auto"], prefix + "0002": ["auto"]}
    assert prefix + "0002" not in checkpoint_names(d.dom)

    r = cli("backup", d.name, bdir, "--level", "inc", "--json")
    assert r.rc == 0, r
    assert r.json()["point"]["id"] == "0002" and r.json()["point"]["parent"] == "0001"
    assert not list((bdir / "points").glob("*.partial"))
    assert sorted(image_bitmaps(d, "vda")) == [prefix + "0001", prefix + "0002"]
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")


def _disconnect_libvirt_clients_of(pid: int) -> int:
    """Drop every libvirtd client connection of process `pid`, server side (virt-admin)."""
    admin = ["virt-admin", "-c", "libvirtd:///system"]
    out = subprocess.run([*admin, "client-list", "libvirtd"], capture_output=True, text=True, check=True).stdout
    dropped = 0
    # newest first (ids grow): the backup's connection is among the last opened
    for line in reversed(out.splitlines()[2:]):
        if not line.split():
            continue
        cid = line.split()[0]
        info = subprocess.run([*admin, "client-info", "libvirtd", cid], capture_output=True, text=True).stdout
        if f"unix_process_id: {pid}\n" in info + "\n":
            subprocess.run([*admin, "client-disconnect", "libvirtd", cid], capture_output=True, check=True)
            dropped += 1
    return dropped


def test_libvirt_connection_lost_during_offline_copy_reconnects(make_domain, tmp_path):
    """The private QEMU doesn't need libvirtd; losing the connection meanwhile costs nothing."""
    from tests.support import scratch
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    backup(d.name, bdir, "full")
    prefix = cli("list", bdir, "--json").json()["points"][0]["checkpoint"][:-4]
    # ~6 s of copying at 1 MiB/s: virt-admin asks about every client of libvirtd one by one,
    # which took longer than a 2 s copy on a loaded machine (seen: nothing left to drop)
    scratch.write_offline(d, "vda", 0x22, 2 * MiB, 6 * MiB)

    proc, _qpid = _start_slow_backup(d, bdir)
    try:
        dropped = _disconnect_libvirt_clients_of(proc.pid)
        assert dropped >= 1, f"no libvirt connection of the backup found (still running: {proc.poll() is None})"
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "reconnecting" in err
    assert prefix + "0002" in checkpoint_names(d.dom)
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")


def test_offline_auto_falls_back_to_full_when_qemu_finds_the_base_bitmap_unusable(make_domain, tmp_path,
                                                                                  monkeypatch):
    """The header check passed but QEMU, having opened the images, finds the base bitmap bad
    (it changed in between; simulated: that race can't be timed). auto rolls back and takes a
    full with the reason recorded; inc refuses."""
    from tests.support import scratch
    from virtbackup import api
    from virtbackup.errors import LevelNotPossible
    from virtbackup.qemu import qemu_img
    from virtbackup.runners import offline
    d = make_domain({"vda": 16 * MiB}, start=False)
    bdir = tmp_path / "bk"
    scratch.write_offline(d, "vda", 0x11, 0, 1 * MiB)
    first = api.backup(d.name, bdir, "full").point
    scratch.write_offline(d, "vda", 0x22, 2 * MiB, 1 * MiB)

    seen = []

    def racing(self, qemu, disks, base):
        seen.append(base)
        raise LevelNotPossible(f"cannot continue the chain offline: bitmap {base} is missing on disk vda; "
                               "take a full backup")

    monkeypatch.setattr(offline.OfflineRunner, "_check_base_bitmaps", racing)
    files = snapshot_dir(bdir)
    with pytest.raises(LevelNotPossible):
        api.backup(d.name, bdir, "inc")
    assert snapshot_dir(bdir) == files
    p = api.backup(d.name, bdir, "auto").point
    assert seen == [first.checkpoint, first.checkpoint]
    assert p.level == "full" and p.id == "0002" and "new chain" in (p.reason or "")
    assert not d.dom.isActive()
    bitmaps = qemu_img.info(d.disk_path("vda"))["format-specific"]["data"].get("bitmaps", [])
    assert [b["name"] for b in bitmaps] == [p.checkpoint]
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "r2")
