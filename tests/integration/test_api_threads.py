"""The API as a management stack embeds it: operations in worker threads of one process.

A host agent (oVirt-like) runs backups in its own threads, not as CLI processes. Here the API is
called in-process from threads: a backup cancelled from another thread mid-copy (push with an
encrypted chain, so its libvirt secret is in play, and pull) must leave exactly what a SIGINT
leaves (nothing: no checkpoint, bitmap, job, partial dir, scratch file or secret; the chain byte
for byte as before) and the next backup must continue the chain; two backups of two domains in
two threads both succeed and restore bit-exact; and each gets only its own progress events, per
disk monotonic with a constant total and a last event at the total.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import libvirt
import pytest

from tests.support import scratch
from tests.support.helpers import checkpoint_names, our_bitmaps, snapshot_dir
from tests.support.qemu import slow_reads
from virtbackup import api
from virtbackup.errors import Interrupted
from virtbackup.observe import Cancel, ProgressEvent
from virtbackup.qemu.keys import Key
from virtbackup.store import crypto
from virtbackup.virt import keysecret

MiB = 1 << 20
KEY = Key(b"api-threads test passphrase", "test")


@pytest.fixture
def own_secrets(conn):
    """The libvirt secrets of this process's encrypted backups: none may outlive a test (one
    that failed half-way included); yields a function listing them."""
    def ours() -> List[str]:
        out = []
        for s in conn.listAllSecrets(0):
            try:
                desc = keysecret._description(s) or ""
            except libvirt.libvirtError:
                continue
            if keysecret.is_ours(desc) and f" pid={os.getpid()} " in desc:
                out.append(s.UUIDString())
        return sorted(out)
    yield ours
    for uuid in ours():
        try:
            conn.secretLookupByUUIDString(uuid).undefine()
        except libvirt.libvirtError:
            pass


class Events:
    """A progress callback that keeps every event (called from the operation's threads)."""

    def __init__(self) -> None:
        self.events: List[ProgressEvent] = []
        self.lock = threading.Lock()
        self.copying = threading.Event()        # a copy is under way: 0 < done < total

    def __call__(self, ev: ProgressEvent) -> None:
        with self.lock:
            self.events.append(ev)
        if ev.phase == "copy" and 0 < ev.done < ev.total:
            self.copying.set()

    def streams(self) -> Dict[Tuple[str, Optional[str]], List[ProgressEvent]]:
        out: Dict[Tuple[str, Optional[str]], List[ProgressEvent]] = defaultdict(list)
        for ev in self.events:
            out[(ev.phase, ev.disk)].append(ev)
        return out

    def assert_well_formed(self, finished: bool = True) -> None:
        """Per phase and disk: a constant total, done never going down, and (`finished`) the
        last event at the total."""
        for key, evs in self.streams().items():
            assert len({e.total for e in evs}) == 1, (key, evs)
            dones = [e.done for e in evs]
            assert dones == sorted(dones), (key, dones)
            assert all(0 <= d <= evs[0].total for d in dones), (key, dones)
            if finished:
                assert dones[-1] == evs[0].total, (key, dones)


class InThread:
    """An API call in a worker thread; `result()` re-raises what it raised."""

    def __init__(self, fn: Any, *args: Any, start: Optional[threading.Barrier] = None, **kwargs: Any):
        self.value: Any = None
        self.error: Optional[BaseException] = None

        def run() -> None:
            if start is not None:
                start.wait(30)
            try:
                self.value = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                self.error = e
        self.thread = threading.Thread(target=run, name="api-worker", daemon=True)
        self.thread.start()

    def result(self, timeout: float = 240) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the API call did not return"
        if self.error is not None:
            raise self.error
        return self.value


def restores(bdir: Path, point: str, expected: Dict[str, bytes], out: Path, key: Optional[Key] = None,
             progress: Optional[Events] = None) -> None:
    """api.restore of `point` into `out`, every disk byte for byte what the guest saw."""
    r = api.restore(bdir, out, point, key=key, progress=progress)
    for disk, want in expected.items():
        assert r.images[disk] == out / f"{disk}.qcow2"
        got = scratch.read_raw(out / f"{disk}.qcow2")
        assert scratch.first_difference(got, want) is None, f"point {point} disk {disk} differs"


def state(d: Any, bdir: Path, prefix: str) -> Dict[str, Any]:
    return {"files": snapshot_dir(bdir), "checkpoints": checkpoint_names(d.dom),
            "bitmaps": our_bitmaps(d.dom, prefix)}


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["push", "pull"])
def test_cancel_from_another_thread_mid_copy_rolls_back_like_a_signal(make_domain, tmp_path, own_secrets,
                                                                      monkeypatch, mode):
    monkeypatch.setenv(crypto.ITER_TIME_ENV, "10")
    encrypted = mode == "push"          # pull mode refuses encrypted chains
    key = KEY if encrypted else None
    d = make_domain({"vda": 256 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    first = api.backup(d.name, bdir, level="full", mode=mode, encrypt=encrypted, key=key)
    expected = {first.point.id: d.expected()}
    prefix = first.point.checkpoint[:-4]
    assert own_secrets() == []

    # 192 MiB to copy at 2 MiB/s: a job of over a minute. Push mode gets its limit just after the
    # job started, when QEMU has begun its first requests at full speed (test_speed.py): its
    # reads are slowed from the first byte, or a loaded host could see the job end first.
    for off in (8 * MiB, 104 * MiB):
        d.write("vda", 0x22, off, 96 * MiB)
    before = state(d, bdir, prefix)
    cancel, events = Cancel(), Events()
    with contextlib.ExitStack() as slowed:
        lift = slowed.enter_context(slow_reads(d.dom, "vda", iops=8)) if mode == "push" else None
        job = InThread(api.backup, d.name, bdir, level="inc", mode=mode, max_speed=2 * MiB, key=key,
                       cancel=cancel, progress=events)
        assert events.copying.wait(120), f"no copy progress seen: {events.events}"
        assert job.thread.is_alive()
        assert d.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
        if encrypted:
            assert len(own_secrets()) == 1, "the job's key secret should exist while it runs"
        if lift:
            lift()               # the abort need not wait for the slowed reads
        t0 = time.monotonic()
        cancel.cancel()
        with pytest.raises(Interrupted) as ei:
            job.result()
    assert time.monotonic() - t0 < 60, "the cancel did not wake the wait"
    assert str(ei.value) == "backup cancelled; nothing was recorded"
    assert ei.value.exit_code == 1
    events.assert_well_formed(finished=False)

    # exactly what a signal leaves: nothing
    assert state(d, bdir, prefix) == before
    assert not list((bdir / "points").glob("*.partial"))
    assert d.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "the cancelled run left its job running"
    assert own_secrets() == []
    assert sorted(p.name for p in Path(d.workdir).glob("*.scratch")) == []
    assert api.list_points(bdir).points[-1].id == first.point.id

    # the next backup continues the chain from the last good point, holding every write
    again = api.backup(d.name, bdir, level="inc", mode=mode, key=key)
    assert again.point.parent == first.point.id and again.point.level == "inc"
    expected[again.point.id] = d.expected()
    for pid, exp in expected.items():
        restores(bdir, pid, exp, tmp_path / f"r{pid}", key)


def test_two_domains_backed_up_in_two_threads_each_with_its_own_events(make_domain, tmp_path):
    a = make_domain({"vda": 64 * MiB, "vdb": 32 * MiB})
    b = make_domain({"vdc": 64 * MiB, "vdd": 32 * MiB})
    for dom, (x, y) in ((a, ("vda", "vdb")), (b, ("vdc", "vdd"))):
        dom.write(x, 0x31, 0, 24 * MiB)
        dom.write(x, 0x32, 40 * MiB, 1 * MiB)
        dom.write(y, 0x33, 4 * MiB, 8 * MiB)
    ba, bb = tmp_path / "bk-a", tmp_path / "bk-b"
    expected: Dict[str, Dict[str, Dict[str, bytes]]] = {a.name: {}, b.name: {}}
    # two rounds: a full in push (a) and pull (b) mode side by side, then incrementals the other way
    for level, modes in (("full", ("push", "pull")), ("inc", ("pull", "push"))):
        if level == "inc":
            a.write("vdb", 0x41, 16 * MiB, 4 * MiB)
            b.write("vdc", 0x42, 48 * MiB, 4 * MiB)
        ev_a, ev_b = Events(), Events()
        start = threading.Barrier(2)
        want = {a.name: a.expected(), b.name: b.expected()}
        ja = InThread(api.backup, a.name, ba, level=level, mode=modes[0], max_speed=16 * MiB, progress=ev_a,
                      start=start)
        jb = InThread(api.backup, b.name, bb, level=level, mode=modes[1], max_speed=16 * MiB, progress=ev_b,
                      start=start)
        ra, rb = ja.result(), jb.result()
        for r, dom, ev, disks, mode in ((ra, a, ev_a, {"vda", "vdb"}, modes[0]),
                                        (rb, b, ev_b, {"vdc", "vdd"}, modes[1])):
            assert r.domain == dom.name and r.point.level == level and r.point.transport == mode
            expected[dom.name][r.point.id] = want[dom.name]
            # only this backup's events: its domain, its disks
            assert {e.domain for e in ev.events} == {dom.name}, ev.events
            assert {e.operation for e in ev.events} == {"backup"}
            assert {e.disk for e in ev.events if e.disk is not None} == disks
            ev.assert_well_formed()
            copies = {k[1]: v for k, v in ev.streams().items() if k[0] == "copy"}
            assert set(copies) == disks, ev.events
            for disk, evs in copies.items():
                assert evs[0].total == dom.disk_sizes[disk] and evs[0].unit == "bytes"
            hashed = {k[1]: v for k, v in ev.streams().items() if k[0] == "hash"}
            assert set(hashed) == disks
            for disk, evs in hashed.items():
                assert evs[-1].done == r.point.disks[disk].size
            assert [e.done for e in ev.streams()[("commit", None)]] == [0, 1]

    # restores of both, side by side in two threads, bit-exact, each with its own events
    for pid in ("0001", "0002"):
        ev_a, ev_b = Events(), Events()
        start = threading.Barrier(2)
        ja = InThread(restores, ba, pid, expected[a.name][pid], tmp_path / f"ra{pid}", progress=ev_a, start=start)
        jb = InThread(restores, bb, pid, expected[b.name][pid], tmp_path / f"rb{pid}", progress=ev_b, start=start)
        ja.result()
        jb.result()
        for ev, dom, disks in ((ev_a, a, {"vda", "vdb"}), (ev_b, b, {"vdc", "vdd"})):
            assert {(e.operation, e.phase, e.unit) for e in ev.events} == {("restore", "copy", "bytes")}
            assert {e.disk for e in ev.events} == disks, ev.events
            ev.assert_well_formed()
            for disk, evs in ev.streams().items():
                assert evs[0].total == dom.disk_sizes[disk[1] or ""]


def test_offline_backup_and_verify_events(make_domain, tmp_path):
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    d.write("vda", 0x51, 0, 8 * MiB)
    d.write("vdb", 0x52, 2 * MiB, 2 * MiB)
    scratch.stop_cleanly(d)
    bdir = tmp_path / "bk"
    ev = Events()
    r = api.backup(d.name, bdir, progress=ev)
    assert r.point.transport == "offline"
    ev.assert_well_formed()
    copies = {k[1]: v for k, v in ev.streams().items() if k[0] == "copy"}
    assert set(copies) == {"vda", "vdb"}
    assert all(evs[-1].done == d.disk_sizes[disk] for disk, evs in copies.items())

    ev = Events()
    v = api.verify(bdir, deep=True, progress=ev)
    assert v.ok
    ev.assert_well_formed()
    assert set(ev.streams()) == {("verify", None), ("read", None)}
    assert ev.streams()[("verify", None)][-1].done == v.images_checked == 2

    # a cancel given before the call stops it at once, and a cancelled verify says so
    cancel = Cancel()
    cancel.cancel("agent shutting down")
    with pytest.raises(Interrupted, match=r"^verify cancelled \(agent shutting down\)$"):
        api.verify(bdir, cancel=cancel)
    restores(bdir, r.point.id, d.expected(), tmp_path / "r")


def test_run_job_in_a_thread_forwards_each_domains_backup_events(make_domain, tmp_path):
    """`run` backs up each domain in a child process; its events reach the caller's callback,
    each with the domain it belongs to."""
    prefix = f"vbapi-{secrets.token_hex(3)}"
    a = make_domain({"vda": 32 * MiB}, name=f"{prefix}-a")
    b = make_domain({"vda": 16 * MiB, "vdb": 16 * MiB}, name=f"{prefix}-b")
    a.write("vda", 0x61, 0, 8 * MiB)
    b.write("vdb", 0x62, 0, 4 * MiB)
    root = tmp_path / "root"
    root.mkdir()
    job_path = tmp_path / "nightly.toml"
    job_path.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nparallel = 2\n')
    ev = Events()
    r = InThread(api.run_job, api.load_job(job_path), progress=ev).result()
    assert r.ok, r.to_json()
    assert {e.domain for e in ev.events} == {a.name, b.name}
    for dom in (a, b):
        mine = Events()
        mine.events = [e for e in ev.events if e.domain == dom.name]
        mine.assert_well_formed()
        assert {k[1] for k in mine.streams() if k[0] == "copy"} == set(dom.disk_sizes)
    restores(root / a.name, "0001", a.expected(), tmp_path / "ra")
