"""Issue 11 with a real Linux guest (tests/support/guest.py, TCG): quiesce, thaw, restore drills.

One guest is booted per module (TCG boots are slow); every test backs it up into its own
directory. Files are written inside the guest through the agent's guest-exec, *without* sync:
the guest keeps them in its page cache, so only a freeze puts them on the disk before the
backup's point in time. Restored images are read with debugfs (no host mount).
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import libvirt
import pytest
from lxml import etree

from tests.support import guest as guestlib
from tests.support.helpers import ROOT, checkpoint_names, cli, finish, one_error_line, snapshot_dir, start_cli, tmpfs
from tests.support.schemas import validate, validate_output

MiB = 1 << 20
AGENT_TIMEOUT = 900        # TCG on 2 loaded cores: the reference's 8 s can become minutes
DRILL_TIMEOUT = 900


@pytest.fixture(scope="module")
def g(tmp_path_factory, request) -> Iterator[guestlib.Guest]:
    from virtbackup.virt import host
    guestlib.report_boot_times(request.config)
    conn = host.connect()
    gu = guestlib.Guest(conn, tmp_path_factory.mktemp("guest"), name=f"vbguest-{secrets.token_hex(3)}")
    try:
        gu.create(agent_timeout=AGENT_TIMEOUT)
        yield gu
    finally:
        try:
            gu.conn = host.connect()    # `dom` swapped in per-test connections and closed them
        except libvirt.libvirtError:
            gu.conn = conn
        gu.remove()                     # (on a closed connection it found nothing: the guest ran on)
        for c in {id(x): x for x in (gu.conn, conn)}.values():
            try:
                c.close()
            except libvirt.libvirtError:
                pass


@pytest.fixture
def dom(g):
    """The module guest's domain on a connection of this test (a test may have broken the module's).

    Afterwards the guest is resumed and thawed whatever the test did, so one failure does not
    fail the rest.
    """
    from virtbackup.virt import host
    c = host.connect()
    g.conn = c
    g.dom = c.lookupByName(g.name)
    yield g.dom
    try:
        if g.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:   # the test failed on it; not the next one
            g.dom.resume()
        wait_agent_back(g.dom, 120)
        if freeze_status(g.dom) != "thawed":
            guestlib.agent_command(g.dom, "guest-fsfreeze-thaw", timeout=30)
    except (libvirt.libvirtError, AssertionError):
        pass
    finally:
        c.close()


def write_unsynced(g: guestlib.Guest, name: str) -> bytes:
    content = f"written by {name} at {time.time()} {secrets.token_hex(8)}\n".encode()
    rc, _out, err = g.exec(f"printf '%s' '{content.decode()}' > /data/{name}")
    assert rc == 0, err
    return content


def freeze_status(dom: libvirt.virDomain) -> str:
    return str(guestlib.agent_command(dom, "guest-fsfreeze-status", timeout=30))


def restored_file(bdir: Path, point: str, guest_path: str, out: Path) -> Optional[bytes]:
    r = cli("restore", bdir, out, "--point", point)
    assert r.rc == 0, r
    return guestlib.read_file(out / "vda.qcow2", guest_path)


def points(bdir: Path) -> List[dict]:
    if not (bdir / "virtbackup.json").exists():
        return []
    r = cli("list", bdir, "--json")
    assert r.rc == 0, r
    return validate_output("list", r.out, r.rc)["points"]


def ours(dom: libvirt.virDomain) -> List[str]:
    return [n for n in checkpoint_names(dom) if n.startswith("virtbackup-")]


class Run:
    """A CLI run whose stderr lines the test can wait for (to stop it between freeze and thaw)."""

    def __init__(self, *args: object):
        self.proc = subprocess.Popen([sys.executable, "-m", "virtbackup.cli", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.err: List[str] = []
        self.out: List[str] = []
        self.readers = [threading.Thread(target=self._read_err, daemon=True),
                        threading.Thread(target=self._read_out, daemon=True)]
        for t in self.readers:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.out.extend(self.proc.stdout)

    def wait_line(self, text: str, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            if text in line:
                return True
        return False

    def finish(self, timeout: float = 300) -> "tuple[int, str, str]":
        rc = self.proc.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=30)
        return rc, "".join(self.out), "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stopped_while_frozen(dom: libvirt.virDomain, bdir: Path, attempts: int = 5) -> Run:
    """Start `backup --quiesce` and SIGSTOP it between freeze and thaw; the stopped Run.

    The window is the job start (~0.1 s): the test stops the run as soon as it reports the
    freeze and checks the guest really is frozen; a run that got past the thaw first is let
    finish (a valid point) and the next attempt tries again.
    """
    for _ in range(attempts):
        run = Run("backup", dom.name(), bdir, "--quiesce")
        try:
            assert run.wait_line("froze "), run.finish()
            run.proc.send_signal(signal.SIGSTOP)
            if freeze_status(dom) == "frozen":
                return run
            run.proc.send_signal(signal.SIGCONT)
            rc, out, err = run.finish()
            assert rc == 0, err
        except BaseException:
            run.kill()
            raise
    pytest.fail(f"could not stop a run between freeze and thaw in {attempts} attempts")


# -- quiesce --------------------------------------------------------------------------------------
def test_quiesced_backup_holds_a_file_that_was_only_in_the_page_cache(g, dom, tmp_path):
    bdir = tmp_path / "bk"
    content = write_unsynced(g, "quiesced.txt")
    # the precondition that gives the test its meaning: the file is not on the disk yet
    assert guestlib.read_file(g.disk, "/data/quiesced.txt") is None

    r = cli("backup", g.name, bdir, "--quiesce", "--json")
    assert r.rc == 0, r
    p = validate_output("backup", r.out, r.rc)["point"]
    assert p["consistency"] == "application", p
    assert "froze 1 filesystem" in p["consistency_reason"]
    assert p["frozen_seconds"] is not None and 0 < p["frozen_seconds"] < 60
    assert "froze 1 filesystem(s)" in r.err and "thawed" in r.err
    assert freeze_status(dom) == "thawed"
    assert restored_file(bdir, p["id"], "/data/quiesced.txt", tmp_path / "r1") == content

    # default (auto) with an agent: quiesced as well
    r = cli("backup", g.name, bdir, "--json")
    assert r.rc == 0, r
    assert r.json()["point"]["consistency"] == "application"
    assert freeze_status(dom) == "thawed"

    r = cli("list", bdir)
    assert r.rc == 0, r
    header, rows, total = r.out.splitlines()[1], r.out.splitlines()[2:-1], r.out.splitlines()[-1]
    assert "CONSISTENCY" in header and total.startswith("stored: "), r.out
    assert len(rows) == 2 and all(re.search(r" MiB  application\b|KiB  application\b", row) for row in rows), r.out
    assert [x["consistency"] for x in points(bdir)] == ["application", "application"]


def test_crash_consistent_backup_records_crash_and_claims_nothing_more(g, dom, tmp_path):
    bdir = tmp_path / "bk"
    content = write_unsynced(g, "crash.txt")
    r = cli("backup", g.name, bdir, "--quiesce=off", "--json")
    assert r.rc == 0, r
    p = validate_output("backup", r.out, r.rc)["point"]
    assert (p["consistency"], p["consistency_reason"], p["frozen_seconds"]) == ("crash", "quiesce off", None)
    assert "froze" not in r.err
    seen = restored_file(bdir, p["id"], "/data/crash.txt", tmp_path / "r")
    # What crash consistency means here: the file may be missing, empty or complete (ext4
    # ordered mode never shows garbage); which one depends on what the guest had flushed.
    print(f"crash-consistent point: /data/crash.txt is "
          f"{'missing' if seen is None else 'empty' if seen == b'' else 'complete' if seen == content else seen!r}")
    assert seen in (None, b"", content)
    r = cli("list", bdir)
    assert re.search(r"B  crash\b", r.out.splitlines()[2]), r.out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_frozen_thaws_and_records_nothing(g, dom, tmp_path, sig):
    bdir = tmp_path / "bk"
    assert cli("backup", g.name, bdir, "--quiesce=off").rc == 0
    before = snapshot_dir(bdir)
    before_cps = ours(dom)
    write_unsynced(g, f"{sig.name}.txt")
    run = stopped_while_frozen(dom, bdir)
    try:
        run.proc.send_signal(sig)
        run.proc.send_signal(signal.SIGCONT)
        rc, _out, err = run.finish()
    finally:
        run.kill()
    assert freeze_status(dom) == "thawed"
    if rc == 0:      # the signal came after the job had ended: a complete point, said so
        assert "arrived while point" in err, err
    else:
        assert rc == 1, err
        assert f"interrupted by {sig.name}" in err and "nothing was recorded" in err, err
        assert snapshot_dir(bdir) == before
        assert ours(dom) == before_cps
    assert not guestlib_marker(dom).exists()


def guestlib_marker(dom: libvirt.virDomain) -> Path:
    from virtbackup.virt import quiesce
    return quiesce.marker_path(dom.UUIDString())


def test_job_failure_enospc_thaws(g, dom, tmp_path):
    rc, _o, err = g.exec("dd if=/dev/urandom of=/data/big bs=1M count=24 2>/dev/null && sync", timeout=600)
    assert rc == 0, err
    before_cps = ours(dom)
    with tmpfs(tmp_path / "tiny", "8M") as mnt:
        bdir = mnt / "bk"
        r = cli("backup", g.name, bdir, "--quiesce", "--mode", "push")    # push: the guest's write path
        assert r.rc == 1, r
        assert "No space left on device" in one_error_line(r)
        assert "froze 1 filesystem(s)" in r.err
        # a guest write during the job that had to copy its old data into the full target
        # paused the guest once (QEMU's ENOSPC policy): the rollback resumes it
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, ("guest left paused", dom.state(), r.err)
        assert freeze_status(dom) == "thawed"
        assert points(bdir) == []
        assert not any(bdir.glob("points/*"))
    assert ours(dom) == before_cps
    assert not guestlib_marker(dom).exists()


def test_pull_scratch_that_fills_never_leaves_the_guest_paused(g, dom, tmp_path):
    """Hostile pass D5: pull mode with 2 MiB left on the scratch filesystem while the guest rewrites 20 MiB.
    The old data its writes must save does not fit; QEMU pauses the guest (ENOSPC policy). 0.2
    finished the copy, exited 0 and left the guest paused. Now the run ends the job, resumes the
    guest (its write then goes through), fails with one line that says what to do, and records
    nothing; the guest's rewrite completes."""
    rc, _o, err = g.exec("dd if=/dev/urandom of=/data/d5 bs=1M count=20 2>/dev/null && sync", timeout=600)
    assert rc == 0, err
    before_cps = ours(dom)
    with tmpfs(tmp_path / "scratch", "128M") as mnt:
        bdir = tmp_path / "bk"
        # slow enough that the rewrite happens while the job runs
        proc = start_cli("backup", g.name, bdir, "--mode", "pull", "--scratch-dir", mnt, "--max-speed", str(MiB))
        deadline = time.monotonic() + 120
        while not list(mnt.glob("*.scratch")):
            assert proc.poll() is None, finish(proc)
            assert time.monotonic() < deadline, "the pull job did not start"
            time.sleep(0.1)
        # the run checked the room before the job (a full of this disk could need ~50 MiB);
        # now something else fills the filesystem, leaving 2 MiB
        vfs = os.statvfs(mnt)
        with open(mnt / "filler", "wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, vfs.f_bavail * vfs.f_frsize - 2 * MiB)
        # started, not waited for: while the guest is paused its agent does not answer
        pid = guestlib.agent_command(dom, "guest-exec", {"path": "/bin/sh", "capture-output": True, "arg": [
            "-c", "dd if=/dev/urandom of=/data/d5 bs=1M count=20 conv=notrunc 2>/dev/null && sync"]})["pid"]
        r = finish(proc, timeout=600)
        assert r.rc == 1, r
        line = one_error_line(r)
        assert "paused the guest" in line and "--scratch-dir" in line, line
        assert "resumed it" in r.err, r.err
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, ("guest left paused", dom.state(), r.err)
        deadline = time.monotonic() + 600
        while not (st := guestlib.agent_command(dom, "guest-exec-status", {"pid": pid}, timeout=30)).get("exited"):
            assert time.monotonic() < deadline, "the guest's rewrite did not finish"
            time.sleep(0.5)
        assert st.get("exitcode") == 0, ("the guest's rewrite failed", st)
        assert points(bdir) == [] and not any(bdir.glob("points/*"))
        assert [p.name for p in mnt.iterdir()] == ["filler"], "scratch file left behind"
    assert ours(dom) == before_cps


def test_sigkill_between_freeze_and_thaw_next_run_thaws_first(g, dom, tmp_path):
    bdir = tmp_path / "bk"
    content = write_unsynced(g, "sigkill.txt")
    run = stopped_while_frozen(dom, bdir)
    pid = run.proc.pid
    run.proc.send_signal(signal.SIGKILL)
    run.proc.send_signal(signal.SIGCONT)
    run.kill()
    assert freeze_status(dom) == "frozen"          # nobody thawed it: the case this is about
    assert guestlib_marker(dom).exists()

    r = cli("backup", g.name, bdir, "--quiesce", "--json")
    assert r.rc == 0, r
    assert f"thawed 1 filesystem(s) of domain '{g.name}' left frozen by an interrupted run (pid {pid}" in r.err, r.err
    assert r.json()["point"]["consistency"] == "application"
    assert freeze_status(dom) == "thawed"
    assert not guestlib_marker(dom).exists()
    assert restored_file(bdir, r.json()["point"]["id"], "/data/sigkill.txt", tmp_path / "r") == content
    assert cli("verify", bdir).rc == 0


def wait_agent_back(dom: libvirt.virDomain, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            guestlib.agent_command(dom, "guest-ping", timeout=5)
            return
        except libvirt.libvirtError:
            assert time.monotonic() < deadline, "the guest agent did not come back"
            time.sleep(0.5)


def test_hung_agent_freeze_times_out_require_fails_auto_is_crash(g, dom, tmp_path):
    """The agent stopped inside the guest (SIGSTOP until the host says go on the control port, at
    most `hang` s): the freeze's timeout."""
    hang = 300
    bdir = tmp_path / "bk"
    assert cli("backup", g.name, bdir, "--quiesce=off").rc == 0
    before, before_cps = snapshot_dir(bdir), ours(dom)
    # no waiting for this one: its shell stops the agent that would report on it
    port = f"/dev/virtio-ports/{guestlib.CONTROL_CHANNEL}"
    held = g.hold()
    guestlib.agent_command(dom, "guest-exec", {"path": "/bin/sh", "arg": [
        "-c", f"p=$(pidof qemu-ga); kill -STOP $p; timeout {hang} head -c 3 {port} >/dev/null; kill -CONT $p"]})
    time.sleep(1)
    try:
        _hung_agent_runs(g, dom, bdir, before, before_cps, hang)
    finally:
        g.release(held)         # the agent goes on
    # the agent comes back and runs what was queued (maybe the freeze): the marker says so, and
    # the next run thaws
    wait_agent_back(dom)
    state = freeze_status(dom)
    assert state == "thawed" or guestlib_marker(dom).exists(), state
    r = cli("backup", g.name, bdir, "--quiesce", "--json")
    assert r.rc == 0, r
    assert r.json()["point"]["consistency"] == "application"
    assert freeze_status(dom) == "thawed" and not guestlib_marker(dom).exists()


def _hung_agent_runs(g, dom, bdir: Path, before: dict, before_cps: List[str], hang: float) -> None:
    env = {**os.environ, "VIRTBACKUP_FREEZE_TIMEOUT": "2", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "virtbackup.cli", "backup", g.name, bdir, "--quiesce"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("virtbackup: error:")]
    assert len(line) == 1 and "cannot quiesce" in line[0] and "did not freeze within 2s" in line[0], r.stderr
    assert snapshot_dir(bdir) == before and ours(dom) == before_cps
    r = subprocess.run([sys.executable, "-m", "virtbackup.cli", "backup", g.name, bdir, "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r
    p = json.loads(r.stdout)["point"]
    # the first run's timeout made libvirt give up on the agent: it answers at once now
    assert p["consistency"] == "crash" and (
        "did not freeze within 2s" in p["consistency_reason"]
        or "Guest agent is not responding" in p["consistency_reason"]), p
    assert "warning:" in r.stderr and "crash-consistent" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 120, "the runs must not have waited for the agent"
    assert freeze_status_or_none(dom) is None, "the agent must still be stopped (the test holds it)"


def freeze_status_or_none(dom: libvirt.virDomain) -> Optional[str]:
    try:
        return str(guestlib.agent_command(dom, "guest-fsfreeze-status", timeout=2))
    except libvirt.libvirtError:
        return None


def test_guest_frozen_by_another_tool_is_left_to_it_and_thaw_command(g, dom, tmp_path):
    bdir = tmp_path / "bk"
    dom.fsFreeze()             # someone else's freeze (virsh domfsfreeze): not virtbackup's to undo
    try:
        r = cli("backup", g.name, bdir, "--quiesce")
        assert r.rc == 1, r
        assert "frozen state" in one_error_line(r), r
        assert freeze_status(dom) == "frozen"
        r = cli("backup", g.name, bdir, "--json")
        assert r.rc == 0, r
        assert r.json()["point"]["consistency"] == "crash"
        assert freeze_status(dom) == "frozen" and not guestlib_marker(dom).exists()

        r = cli("thaw", g.name)             # the admin's way out
        assert r.rc == 0, r
        assert r.out.startswith("thawed 1 filesystem(s)"), r
        assert freeze_status(dom) == "thawed"
        r = cli("thaw", g.name, "--json")   # nothing left frozen: still a result, no marker
        assert r.rc == 0, r
        t = validate("thaw", json.loads(r.out))
        assert (t["domain"], t["marker"], t["marker_removed"]) == (g.name, None, False)
    finally:
        dom.fsThaw()


# -- domains without a working agent (OS-less scratch domains: fast) --------------------------------
def with_agent_channel(conn: libvirt.virConnect, d) -> None:
    """Redefine a (shut-off) scratch domain with an agent channel and start it: no agent will answer."""
    root = etree.fromstring(d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    ch = etree.SubElement(root.find("devices"), "channel", type="unix")
    etree.SubElement(ch, "target", type="virtio", name="org.qemu.guest_agent.0")
    d.dom = conn.defineXML(etree.tostring(root, encoding="unicode"))
    d.dom.create()


def test_no_agent_channel_require_fails_clean_auto_is_crash(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    r = cli("backup", d.name, bdir, "--quiesce")
    assert r.rc == 1, r
    line = one_error_line(r)
    assert "no guest agent channel" in line and "nothing was recorded" in line, line
    assert not bdir.exists()
    assert ours(d.dom) == []

    r = cli("backup", d.name, bdir, "--quiesce=auto", "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert (p["consistency"], p["consistency_reason"]) == ("crash", "the domain has no guest agent channel")

    r = cli("verify", bdir, "--boot", "--check", "true")
    assert r.rc == 2, r
    assert "no guest agent channel" in one_error_line(r)
    r = cli("thaw", d.name)
    assert r.rc == 2 and "no guest agent channel" in one_error_line(r), r
    r = cli("backup", d.name, bdir, "--quiesce=sometimes")
    assert r.rc == 2 and "unknown quiesce mode" in one_error_line(r), r


def test_agent_not_answering_require_fails_clean_auto_is_crash_drill_fails_at_agent(conn, make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB}, start=False)
    with_agent_channel(conn, d)
    bdir = tmp_path / "bk"
    assert cli("backup", d.name, bdir, "--quiesce=off").rc == 0
    before = snapshot_dir(bdir)
    before_cps = ours(d.dom)
    r = cli("backup", d.name, bdir, "--quiesce=require")
    assert r.rc == 1, r
    line = one_error_line(r)
    assert "cannot quiesce" in line and "not connected" in line and "nothing was recorded" in line, line
    assert snapshot_dir(bdir) == before and ours(d.dom) == before_cps
    assert not guestlib_marker(d.dom).exists()

    r = cli("backup", d.name, bdir, "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert p["consistency"] == "crash" and "not connected" in p["consistency_reason"], p
    assert "warning:" in r.err

    drills_before = set(glob.glob("/tmp/virtbackup-drill-*"))
    before = snapshot_dir(bdir)
    r = cli("verify", bdir, "--boot", "--timeout", "5", "--json")
    assert r.rc == 1, r
    assert "drill failed at agent: the guest agent did not answer within 5s" in one_error_line(r)
    drill = validate_output("verify-boot", r.out, r.rc)
    assert (drill["ok"], drill["stage"], drill["error"]["kind"]) == (False, "agent", "drill-failed")
    assert no_drill_domains(conn)
    assert set(glob.glob("/tmp/virtbackup-drill-*")) <= drills_before     # nothing new left (dead ones go)
    assert snapshot_dir(bdir) == before


# -- restore drills on the real guest --------------------------------------------------------------
def no_drill_domains(conn: libvirt.virConnect) -> bool:
    return not [x.name() for x in conn.listAllDomains(0) if x.name().startswith("virtbackup-drill-")]


def file_state(path: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))
            if p.name != ".virtbackup.lock"}


def test_drill_boots_point_passes_check_fails_bad_check_and_leaves_nothing(g, dom, conn, tmp_path):
    bdir = tmp_path / "bk"
    write_unsynced(g, "drill.txt")
    # a compressed chain (the drill boots it like any other: issue 24's readers)
    r = cli("backup", g.name, bdir, "--quiesce", "--compress", "zstd", "--json")
    assert r.rc == 0 and r.json()["point"]["compression"] == "zstd", r
    before, before_state = snapshot_dir(bdir), file_state(bdir)
    drills_before = set(glob.glob("/tmp/virtbackup-drill-*"))
    dom.suspend()            # two TCG guests on two loaded cores: give the drill the CPU
    try:
        r = cli("verify", bdir, "--boot", "--check", "test -f /data/drill.txt", "--timeout", DRILL_TIMEOUT,
                timeout=DRILL_TIMEOUT + 120)
        assert r.rc == 0, r
        assert r.out.startswith("ok: point 0001 boots:") and "guest agent answered after" in r.out, r
        print(r.out.strip())
        for stage in ("drill: starting point 0001", "waiting up to", "guest agent answered", "running check"):
            assert stage in r.err, r.err
        assert no_drill_domains(conn)

        r = cli("verify", bdir, "--boot", "--check", "test -f /data/not-there", "--timeout", DRILL_TIMEOUT,
                "--json", timeout=DRILL_TIMEOUT + 120)
        assert r.rc == 1, r
        assert one_error_line(r) == ("virtbackup: error: drill failed at check: check 'test -f /data/not-there' "
                                     "exited with 1")
        out = validate_output("verify-boot", r.out, r.rc)
        assert (out["ok"], out["stage"], out["check_exit"]) == (False, "check", 1)
        assert out["agent_seconds"] > 0 and out["error"]["exit_code"] == 1
    finally:
        dom.resume()
    assert no_drill_domains(conn)
    assert set(glob.glob("/tmp/virtbackup-drill-*")) <= drills_before     # nothing new left (dead ones go)
    assert snapshot_dir(bdir) == before and file_state(bdir) == before_state


def test_offline_point_is_consistent_by_nature(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB}, start=False)
    r = cli("backup", d.name, tmp_path / "bk", "--quiesce", "--json")
    assert r.rc == 0, r
    p = r.json()["point"]
    assert (p["consistency"], p["frozen_seconds"]) == ("application", None)
    assert "shut off" in p["consistency_reason"]
    assert not d.dom.isActive()


# -- hostile pass D4 (second half): whatever happens to stderr, or to the `run` that started it ----
def test_quiesce_require_with_stderr_on_a_full_device_leaves_the_guest_thawed(g, dom, tmp_path):
    """`backup --quiesce=require 2>/dev/full`: every write to stderr fails (ENOSPC), the "froze"
    notice included. 0.2 wrote that notice outside the block that thaws and left the guest frozen.
    The run must still thaw; its result is on stdout (a point, application-consistent)."""
    bdir = tmp_path / "bk"
    content = write_unsynced(g, "devfull.txt")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "virtbackup.cli", "backup", g.name, bdir, "--quiesce=require",
                            "--json"], stdout=subprocess.PIPE, stderr=full, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert freeze_status(dom) == "thawed", "the guest was left frozen"
    assert not guestlib_marker(dom).exists()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert r.returncode == 0, r
    p = json.loads(r.stdout)["point"]
    assert p["consistency"] == "application", p
    assert restored_file(bdir, p["id"], "/data/devfull.txt", tmp_path / "r") == content
    assert cli("verify", bdir).rc == 0


def _children_of(bdir: Path) -> List[int]:
    """The `backup` children of a `run` (their own session: they outlive it), by their argv."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            argv = Path(d, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"backup" in argv and os.fsencode(str(bdir)) in argv:
            pids.append(int(os.path.basename(d)))
    return pids


def _kill_run_at(job: Path, bdir: Path, dom: libvirt.virDomain, when: str) -> "tuple[List[int], float]":
    """Start `virtbackup run JOB` and SIGKILL it: 0.3 s in, as soon as its child exists, or as soon
    as the child wrote its freeze marker (it is about to freeze, or frozen). Returns the children
    seen and when the kill happened (seconds after the start)."""
    from virtbackup.virt import quiesce
    marker = quiesce.marker_path(dom.UUIDString())
    proc = subprocess.Popen([sys.executable, "-m", "virtbackup.cli", "run", str(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    t0 = time.monotonic()
    children: List[int] = []
    try:
        deadline = t0 + 300
        while time.monotonic() < deadline and proc.poll() is None:
            children = children or _children_of(bdir)
            if when == "0.3s" and time.monotonic() - t0 >= 0.3:
                break
            if when == "child" and children:
                break
            if when == "frozen" and marker.exists():
                break
            time.sleep(0.005)
        assert proc.poll() is None, ("the run ended before the kill", when, proc.communicate())
        proc.send_signal(signal.SIGKILL)
        at = time.monotonic() - t0
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()           # the read ends go: a child's next write gets EPIPE
    return children or _children_of(bdir), at


@pytest.mark.parametrize("when", ["0.3s", "child", "frozen"])
def test_children_of_a_sigkilled_run_finish_or_roll_back_and_thaw(g, dom, tmp_path, when):
    """SIGKILL of `virtbackup run JOBFILE` (0.3 s in, and later): the README promises its children
    finish or roll back on their own. 0.2's children died at their first stderr write (the pipe to
    the dead run) and could leave the guest frozen. Each child must end by itself with the guest
    thawed and running, no partial point, no marker, and a chain that verifies and goes on."""
    root = tmp_path / "root"
    root.mkdir()
    job = tmp_path / "killed.toml"
    job.write_text(f'backup_root = "{root}"\ndomains = ["{g.name}"]\nquiesce = "require"\n')
    bdir = root / g.name
    write_unsynced(g, f"kill-{when}.txt")
    seen: List[int] = []
    try:
        seen, at = _kill_run_at(job, bdir, dom, when)
        deadline = time.monotonic() + 600
        while (left := _children_of(bdir)):
            assert time.monotonic() < deadline, f"children {left} of the killed run did not end"
            time.sleep(0.2)
    finally:
        for pid in _children_of(bdir):      # a failed test: nothing of it runs on
            if pid in seen:
                os.kill(pid, signal.SIGKILL)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
    assert freeze_status(dom) == "thawed", f"guest left frozen (run killed {at:.2f} s in, {when})"
    assert not guestlib_marker(dom).exists()
    assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "a backup job is left running"
    assert not list(bdir.glob("points/*.partial")), "the child did not roll back"
    recorded = points(bdir)
    if recorded:                            # the child finished: its point is whole
        assert cli("verify", bdir).rc == 0
        assert recorded[-1]["consistency"] == "application"
    # and the next run goes on from whatever the child left
    r = cli("run", job, "--json")
    assert r.rc == 0, r
    assert points(bdir)[-1]["consistency"] == "application"
    assert freeze_status(dom) == "thawed" and not guestlib_marker(dom).exists()
