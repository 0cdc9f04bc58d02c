"""Extent planning of the NBD copy (pure logic; the copy itself runs against libvirt's real NBD
server in tests/integration/test_pull.py)."""

from __future__ import annotations

import pytest

from virtbackup.qemu import nbdcopy

MiB = 1 << 20


class FakeStatus:
    """Answers block_status from fixed extent lists (pure logic; the real server is tested in
    tests/integration/test_pull.py)."""

    def __init__(self, answers):
        self.answers = answers

    def block_status(self, count, offset, cb, flags=0):
        for ctx, runs in self.answers.items():
            entries, start = [], None
            for s, n, f in runs:
                if s + n <= offset:
                    continue
                if start is None:
                    start = max(s, offset)
                    n -= start - s
                entries += [n, f]
            cb(ctx, start, entries, 0)


def test_full_copy_skips_zero_extents():
    h = FakeStatus({"base:allocation": [(0, 1 * MiB, 0), (1 * MiB, 7 * MiB, 3), (8 * MiB, 8 * MiB, 0)]})
    runs, end = nbdcopy.extents(h, 16 * MiB, None)
    assert runs == [(0, 1 * MiB, False), (8 * MiB, 8 * MiB, False)] and end == 16 * MiB


def test_incremental_copies_dirty_runs_split_into_data_and_zero():
    h = FakeStatus({
        "base:allocation": [(0, 4 * MiB, 0), (4 * MiB, 4 * MiB, 2), (8 * MiB, 8 * MiB, 0)],
        "qemu:dirty-bitmap:backup-vda": [(0, 3 * MiB, 0), (3 * MiB, 2 * MiB, 1), (5 * MiB, 11 * MiB, 0)],
    })
    runs, end = nbdcopy.extents(h, 16 * MiB, "qemu:dirty-bitmap:backup-vda")
    assert runs == [(3 * MiB, 1 * MiB, False), (4 * MiB, 1 * MiB, True)] and end == 16 * MiB


def test_a_short_answer_ends_the_window_where_the_shortest_context_ended():
    h = FakeStatus({
        "base:allocation": [(0, 2 * MiB, 0)],                                  # answered 2 MiB only
        "qemu:dirty-bitmap:backup-vda": [(0, 16 * MiB, 1)],
    })
    runs, end = nbdcopy.extents(h, 16 * MiB, "qemu:dirty-bitmap:backup-vda")
    assert runs == [(0, 2 * MiB, False)] and end == 2 * MiB
    runs, end = nbdcopy.extents(FakeStatus({"base:allocation": [(4 * MiB, 12 * MiB, 0)]}), 16 * MiB, None,
                                offset=4 * MiB)
    assert runs == [(4 * MiB, 12 * MiB, False)] and end == 16 * MiB


def test_missing_context_answer_is_an_error():
    h = FakeStatus({"base:allocation": [(0, 16 * MiB, 0)]})
    try:
        nbdcopy.extents(h, 16 * MiB, "qemu:dirty-bitmap:backup-vda")
    except nbdcopy.NbdError as e:
        assert "no block status" in str(e)
    else:
        raise AssertionError("an incremental without bitmap status must not copy")


def test_pacer_holds_reads_to_the_speed_with_one_request_of_burst(monkeypatch):
    from virtbackup.qemu import nbdcopy
    now = [100.0]
    monkeypatch.setattr(nbdcopy.time, "monotonic", lambda: now[0])
    p = nbdcopy.Pacer(4 << 20, 4 << 20)           # 4 MiB/s, a bucket of one 4 MiB request
    assert p.wait_for(4 << 20) == 0.0             # the first request goes at once
    p.took(4 << 20)
    assert p.wait_for(4 << 20) == 1.0             # the next one a second later
    now[0] += 0.5
    assert p.wait_for(4 << 20) == 0.5
    now[0] += 0.5
    assert p.wait_for(4 << 20) == 0.0
    p.took(4 << 20)
    now[0] += 10                                  # idle time is not banked beyond one request
    assert p.wait_for(4 << 20) == 0.0
    p.took(4 << 20)
    assert p.wait_for(1 << 20) == 0.25
    slow = nbdcopy.Pacer(1 << 20, 4 << 20)        # slower than one request per second
    slow.took(4 << 20)
    assert slow.wait_for(4 << 20) == 4.0
    unpaced = nbdcopy.Pacer(None, 4 << 20)
    assert unpaced.wait_for(1 << 40) == 0.0       # no limit: never waits


def test_the_target_server_never_starts_after_its_parent_died(tmp_path):
    """qemu-nbd is tied to the process that starts it (parent-death signal); a parent killed before
    that signal was set left a server nobody ended. The wrapper execs the server only while its
    parent is still the process that asked for it, keeping the pid (socket activation needs it)."""
    import subprocess

    from virtbackup.qemu import nbdcopy

    marker = tmp_path / "ran"
    argv = nbdcopy.tied_to_this_process(["/bin/sh", "-c", f'echo $$ > {marker}'])
    if argv[0].endswith("sh"):
        pytest.skip("setpriv is not installed")
    proc = subprocess.Popen(argv)                       # our child: its parent is still us
    assert proc.wait() == 0 and marker.read_text().strip() == str(proc.pid)   # exec'd in place
    marker.unlink()
    stale = argv[:argv.index("sh") + 1] + ["1"] + argv[argv.index("sh") + 2:]   # as if our parent were pid 1
    assert subprocess.run(stale).returncode == 1 and not marker.exists()
