"""`backup --max-speed`: the limit reaches QEMU's copy job, and the backup is still bit-exact."""

from __future__ import annotations

import contextlib
import time

import libvirt

from tests.support.helpers import assert_point_restores, cli, finish, one_error_line, start_cli
from tests.support.qemu import slow_reads
from virtbackup.errors import HostError
from virtbackup.virt import monitor

MiB = 1 << 20


def _backup_jobs(dom: libvirt.virDomain) -> list:
    return [j for j in monitor.qmp(dom, "query-block-jobs") or [] if j.get("type") == "backup"]


def test_max_speed_is_applied_to_the_push_job_and_the_backup_is_bit_exact(make_domain, tmp_path):
    d = make_domain({"vda": 128 * MiB, "vdb": 128 * MiB})
    # more than QEMU copies before a limit set after the job's start bites (its first requests)
    for disk in ("vda", "vdb"):
        d.write(disk, 0x5A, 0, 120 * MiB)
    bdir = tmp_path / "bk"
    limit = 1 * MiB
    slowed = contextlib.ExitStack()
    for disk in ("vda", "vdb"):          # neither job can end before the test has seen its limit
        slowed.enter_context(slow_reads(d.dom, disk, iops=8))
    proc = start_cli("backup", d.name, bdir, "--level", "full", "--max-speed", limit, "--json", "--mode", "push")
    seen: dict = {}
    try:
        # wait (bounded) for the jobs to be visible with their limit; never a timed assertion:
        # at 1 MiB/s the ~100 MiB left take far longer than this loop ever waits
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and len(seen) < 2:
            for j in _backup_jobs(d.dom):
                if j.get("speed"):
                    seen[j["device"]] = j["speed"]
            time.sleep(0.05)
        # lift both limits so the test does not wait for the slow copy; the result must be exact
        slowed.close()
        for dev in seen:
            try:
                monitor.qmp(d.dom, "block-job-set-speed", {"device": dev, "speed": 0})
            except HostError:
                pass                # that disk's job already ended (QEMU copied its start unlimited)
    finally:
        slowed.close()
        r = finish(proc, timeout=300)
    assert len(seen) == 2 and set(seen.values()) == {limit}, f"backup jobs as QEMU reports them: {seen}; the CLI: {r}"
    assert r.rc == 0, r
    assert r.json()["point"]["level"] == "full"
    assert_point_restores(bdir, "0001", d.expected(), tmp_path / "out")
    assert cli("verify", bdir).rc == 0


def test_max_speed_must_be_positive(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    for bad in ("0", "-5"):
        r = cli("backup", d.name, tmp_path / "bk", "--max-speed", bad)
        assert r.rc == 2 and "--max-speed must be a positive" in one_error_line(r), r
    assert not (tmp_path / "bk").exists()


def test_max_speed_paces_a_pull_backup_and_it_is_bit_exact(make_domain, tmp_path):
    """Pull mode: our NBD client reads each disk at the limit (zeroes are not data); the
    whole run is timed only as a lower bound (a loaded machine only makes it slower)."""
    d = make_domain({"vda": 64 * MiB})
    d.write("vda", 0x5B, 0, 12 * MiB)
    d.write("vda", 0, 32 * MiB, 16 * MiB)          # zeroes: written as zeroes, not paced
    bdir = tmp_path / "bk"
    t = time.monotonic()
    r = cli("backup", d.name, bdir, "--mode", "pull", "--level", "full", "--max-speed", 4 * MiB, "--json")
    took = time.monotonic() - t
    assert r.rc == 0, r
    moved = r.json()["transfer"]["vda"]["read"]
    assert moved >= 12 * MiB, r.json()["transfer"]
    # 12 MiB at 4 MiB/s with one 4 MiB request of slack: at least 2 s
    assert took >= (moved - 4 * MiB) / (4 * MiB), (took, moved)
    assert_point_restores(bdir, "0001", d.expected(), tmp_path / "out")
    d.write("vda", 0x6C, 4 * MiB, 2 * MiB)
    r = cli("backup", d.name, bdir, "--mode", "pull", "--level", "inc", "--max-speed", 1 * MiB, "--json")
    assert r.rc == 0, r
    assert_point_restores(bdir, "0002", d.expected(), tmp_path / "out2")
