"""Pull mode (issue 14): backups read over NBD into a directory only virtbackup can see.

Most tests keep the backup directory on a tmpfs in a private mount namespace (tests/support/hiddenns.py):
libvirtd and QEMU see an empty directory there, so push mode fails, and a pull backup that
restores bit-exact proves every byte travelled over NBD. Restores write to a directory outside
the tmpfs and are compared byte for byte with what the guest saw. Remote URIs go through a
private sshd on 127.0.0.1 (tests/support/sshd.py).

Faults are injected while the pull job is open: the test stops the virtbackup process
(SIGSTOP) as soon as libvirt shows its job, acts (drops the NBD export, destroys the domain,
signals the process), and lets it go on (SIGCONT). A pull job stays open until virtbackup ends
it, so the fault always lands before the point is recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import libvirt
import pytest

from tests.support.helpers import CLIResult, assert_point_restores, checkpoint_names, cli, one_error_line
from tests.support.hiddenns import HiddenDir
from tests.support.schemas import validate
from tests.support.sshd import PrivateSshd

MiB = 1 << 20
KiB = 1 << 10
GRANULARITY = 64 * KiB      # the checkpoints' bitmap granularity (qcow2 cluster size)
# the client certificate scripts/setup-host.sh makes (its throwaway CA signs libvirt's NBD server's too)
TLS_CLIENT = Path("/etc/pki/virtbackup-test/client")


@pytest.fixture
def hidden(tmp_path):
    made: List[HiddenDir] = []

    def make(size: str = "512m") -> HiddenDir:
        h = HiddenDir(tmp_path / f"hidden{len(made)}", size).start()
        made.append(h)
        return h
    yield make
    for h in made:
        h.stop()


@pytest.fixture
def sshd(tmp_path):
    s = PrivateSshd(Path("/tmp") / f"vbsshd-{os.getpid()}-{time.monotonic_ns()}").start()
    yield s
    s.stop()


def point_of(r) -> dict:
    assert r.rc == 0, r
    return r.json()["point"]


def leftovers(d, bdir: Optional[Path] = None) -> Dict[str, List[str]]:
    """What a pull run may leave on the host: scratch files, NBD sockets, a job, qemu-nbd."""
    scratch = sorted(str(p) for p in Path(d.workdir).glob("*.scratch"))
    run_dir = Path(os.environ.get("VIRTBACKUP_RUN_DIR", "/run/virtbackup"))
    prefix = ""
    for cp in checkpoint_names(d.dom):
        if cp.startswith("virtbackup-"):
            prefix = cp[:-4]
    socks = sorted(str(p) for p in run_dir.glob(f"nbd-{prefix}*.sock")) if prefix else []
    job = []
    if d.dom.isActive() and job_open(d):
        job = ["a job is running"]
    if d.dom.isActive():
        from virtbackup.virt import monitor
        job += [f"NBD export {e['id']}" for e in monitor.qmp(d.dom, "query-block-exports")]
    nbd = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{bdir}"], capture_output=True,
                         text=True).stdout.split() if bdir else []
    return {k: v for k, v in {"scratch": scratch, "sockets": socks, "job": job, "qemu-nbd": nbd}.items() if v}


def restore_and_compare(h: HiddenDir, bdir: Path, pid: str, expected: Dict[str, bytes], out: Path) -> None:
    """Restore inside the namespace (the only place the backup exists) into `out` (visible
    outside), then compare every disk byte for byte."""
    from tests.support import scratch
    r = h.cli("restore", bdir, out, "--point", pid)
    assert r.rc == 0, r
    for disk, want in expected.items():
        got = scratch.read_raw(out / f"{disk}.qcow2")
        assert scratch.first_difference(got, want) is None, f"point {pid} disk {disk} differs"
    subprocess.run(["rm", "-rf", str(out)], check=False)


def job_open(d) -> bool:
    try:
        return bool(d.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:    # "backup job data missing": libvirt is still setting it up
        return False


def stop_when_job_open(d, proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGSTOP the virtbackup run as soon as libvirt shows its (pull) job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if job_open(d):
            os.kill(proc.pid, signal.SIGSTOP)
            assert job_open(d), "job ended before the run was stopped"
            return
        time.sleep(0.01)
    out, err = proc.communicate()
    pytest.fail(f"the pull job never showed up (rc={proc.returncode}, err={err!r})")


def exported(d, timeout: float = 10) -> list:
    """QEMU's NBD exports of the domain, once libvirt has added them (at the end of backupBegin,
    which may still run while the test acts)."""
    from virtbackup.virt import monitor
    deadline = time.monotonic() + timeout
    while not (exports := monitor.qmp(d.dom, "query-block-exports")):
        assert time.monotonic() < deadline, "libvirt never exported the disks"
        time.sleep(0.02)
    return exports


def wait_no_qemu_nbd(bdir: Path, timeout: float = 10) -> None:
    """qemu-nbd serving a target ends with its only client (also a killed one): bounded wait."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["pgrep", "-f", f"qemu-nbd.*{bdir}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "qemu-nbd outlived the killed run"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 120):
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=timeout)
    return CLIResult(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


# -------------------------------------------------------------------------------------------------
def test_pull_chain_into_a_dir_only_virtbackup_sees(make_domain, hidden, tmp_path):
    """full -> inc -> diff -> inc in pull mode restore bit-exact; push mode can't even start there."""
    d = make_domain({"vda": 64 * MiB, "vdb": 32 * MiB})
    h = hidden()
    bdir = h.path / "bk"
    expected = {}

    d.write("vda", 0x11, 0, 2 * MiB)
    d.write("vda", 0x12, 40 * MiB, 256 * KiB)
    d.write("vdb", 0x21, 1 * MiB, 2 * MiB)

    # the proof that the directory is invisible to the hypervisor: push mode fails there
    r = h.cli("backup", d.name, bdir, "--mode", "push", "--level", "full")
    assert r.rc == 1 and "backup could not start" in one_error_line(r), r
    print(f"\npush into the hidden directory: {one_error_line(r)}")
    assert not any(n.startswith("virtbackup-") for n in checkpoint_names(d.dom))
    assert not [f for f in h.listing() if not f.endswith("virtbackup.json")], h.listing()

    p = point_of(h.cli("backup", d.name, bdir, "--mode", "pull", "--level", "full", "--json"))
    assert p["level"] == "full" and p["transport"] == "pull"
    expected[p["id"]] = d.expected()

    # G1: writes of known size; the incremental must read about that much, not the disk
    dirty = [("vda", 0x31, 512 * KiB, 1 * MiB), ("vda", 0x32, 20 * MiB, 128 * KiB), ("vdb", 0x41, 30 * MiB, 64 * KiB)]
    for w in dirty:
        d.write(*w)
    d.write("vda", 0, 40 * MiB, 64 * KiB)           # zeroes over old data: a write-zeroes, no data read
    r = h.cli("backup", d.name, bdir, "--level", "inc", "--mode", "pull", "--json")
    p = point_of(r)
    assert p["level"] == "inc" and p["parent"] == "0001" and p["transport"] == "pull"
    expected[p["id"]] = d.expected()
    validate("backup", r.json())            # the --json contract holds for pull points too
    transfer = r.json()["transfer"]
    read = sum(t["read"] for t in transfer.values())
    want = sum(w[3] for w in dirty)
    print(f"\nincremental pull: dirtied {want} bytes of data + 64 KiB of zeroes; read {read} bytes "
          f"over NBD ({transfer})")
    assert want <= read <= want + len(dirty) * 2 * GRANULARITY, transfer
    assert transfer["vda"]["zeroed"] >= 64 * KiB

    # G2 then a differential: everything since the full; scratch files in a directory of our choice
    d.write("vda", 0x51, 63 * MiB, 1 * MiB)
    d.write("vdb", 0, 1 * MiB, 512 * KiB)
    sdir = tmp_path / "scratch"
    r = h.cli("backup", d.name, bdir, "--mode", "pull", "--scratch-dir", sdir)    # does not exist yet
    # refused before the job (issue 23: the room check), as a usage error
    assert r.rc == 2 and f"scratch directory {sdir} for disk" in one_error_line(r), r
    assert "No such file or directory" in r.err, r
    for bad in (["--scratch-dir", "rel/dir"], ["--scratch-dir", sdir, "--mode", "push"]):
        r = h.cli("backup", d.name, bdir, *bad)
        assert r.rc == 2 and "--scratch-dir" in one_error_line(r), r
    sdir.mkdir()
    p = point_of(h.cli("backup", d.name, bdir, "--level", "diff", "--mode", "pull", "--scratch-dir", sdir,
                       "--json"))
    assert list(sdir.iterdir()) == []       # libvirt made them there and removed them at the job's end
    assert p["level"] == "diff" and p["parent"] == "0001"
    expected[p["id"]] = d.expected()

    d.write("vdb", 0x71, 16 * MiB, 1 * MiB)
    p = point_of(h.cli("backup", d.name, bdir, "--level", "inc", "--mode", "pull", "--json"))
    assert p["parent"] == "0003"
    expected[p["id"]] = d.expected()

    lst = h.cli("list", bdir, "--json")
    assert lst.rc == 0 and [q["transport"] for q in lst.json()["points"]] == ["pull"] * 4
    validate("list", lst.json())
    assert h.cli("verify", bdir).rc == 0
    assert leftovers(d, bdir) == {}
    for pid, exp in expected.items():
        restore_and_compare(h, bdir, pid, exp, tmp_path / f"out-{pid}")


def test_mixed_push_and_pull_chain_restores(make_domain, tmp_path):
    """push full, pull inc, push inc, pull diff, push inc, pull inc of nothing: one chain, every
    point bit-exact."""
    d = make_domain({"vda": 32 * MiB})
    bdir = tmp_path / "bk"
    expected = {}
    modes = ["push", "pull", "push", "pull", "push"]
    levels = ["full", "inc", "inc", "diff", "inc"]
    for i, (mode, level) in enumerate(zip(modes, levels, strict=True)):
        d.write("vda", 0x10 + i, i * 3 * MiB + 4096 * i, 1 * MiB + 8192)
        if i == 3:
            d.write("vda", 0, 0, 64 * KiB)
        p = point_of(cli("backup", d.name, bdir, "--mode", mode, "--level", level, "--json"))
        assert (p["transport"], p["level"]) == (mode, level)
        expected[p["id"]] = d.expected()
    # nothing dirty: nothing read, no target server started, the point reads as its parent
    r = cli("backup", d.name, bdir, "--mode", "pull", "--level", "inc", "--json")
    p = point_of(r)
    assert r.json()["transfer"]["vda"] == {**r.json()["transfer"]["vda"], "read": 0, "written": 0, "zeroed": 0}
    expected[p["id"]] = d.expected()
    assert cli("verify", bdir).rc == 0
    for pid, exp in expected.items():
        assert_point_restores(bdir, pid, exp, tmp_path / f"r{pid}")
    assert leftovers(d, bdir) == {}


def test_remote_uri_over_ssh_backup_status_repair_and_refusals(make_domain, hidden, sshd, tmp_path):
    """qemu+ssh://root@127.0.0.1: backups default to pull, status/repair work, the rest is refused."""
    d = make_domain({"vda": 32 * MiB})
    off = make_domain({"vda": 16 * MiB}, start=False)
    h = hidden()
    bdir = h.path / "bk"
    uri = sshd.uri

    d.write("vda", 0x11, 0, 3 * MiB)
    # issue 23: a remote pull is NBD over TLS; without a client certificate: refused up front
    r = h.cli("backup", d.name, bdir, "--json", "--nbd-tls-dir", tmp_path / "nocerts", uri=uri)
    assert r.rc == 2 and "uses NBD over TLS" in one_error_line(r) and "--insecure-nbd" in r.err, r
    assert not bdir.exists() and leftovers(d, bdir) == {}
    r = h.cli("backup", d.name, bdir, "--json", "--nbd-tls-dir", TLS_CLIENT, uri=uri)    # no --mode: pull
    p = point_of(r)
    assert p["transport"] == "pull" and p["level"] == "full" and p["nbd_tls"] is True
    assert "from a remote URI only pull is possible" in r.json()["transport_reason"], r.json()
    e1 = d.expected()
    d.write("vda", 0x22, 8 * MiB, 1 * MiB)
    # plaintext only when asked: warned about and recorded
    r = h.cli("backup", d.name, bdir, "--json", "--insecure-nbd", uri=uri)
    p = point_of(r)
    assert p["transport"] == "pull" and p["level"] == "inc" and p["nbd_tls"] is False
    assert "warning: --insecure-nbd" in r.err, r
    assert r.json()["transfer"]["vda"]["read"] == 1 * MiB
    e2 = d.expected()

    st = h.cli("status", d.name, "--json", uri=uri)
    assert st.rc == 0, st
    names = [b["name"] for b in st.json()["disks"]["vda"]["bitmaps"]]
    assert p["checkpoint"] in names
    rp = h.cli("repair", d.name, bdir, "--json", uri=uri)
    assert rp.rc == 0 and rp.json()["ok"], rp

    # refused up front, exit 2, nothing changed: what needs this host's files on the hypervisor
    before = h.listing()
    r = h.cli("backup", off.name, h.path / "off", uri=uri)
    assert r.rc == 2 and "offline backup is not possible with a remote libvirt URI" in one_error_line(r), r
    r = h.cli("status", off.name, uri=uri)
    assert r.rc == 2 and "status of a shut-off domain is not possible" in one_error_line(r), r
    r = h.cli("restore", bdir, tmp_path / "inst", "--instant", "--define", f"{d.name}-i", uri=uri)
    assert r.rc == 2 and "restore --instant is not possible with a remote libvirt URI" in one_error_line(r), r
    assert not (tmp_path / "inst").exists()
    assert h.listing() == before
    assert leftovers(d, bdir) == {}

    restore_and_compare(h, bdir, "0001", e1, tmp_path / "o1")
    restore_and_compare(h, bdir, "0002", e2, tmp_path / "o2")

    # restore --define defines the domain on the host the URI names
    from tests.support import scratch
    name = f"{d.name}-r"
    try:
        r = h.cli("restore", bdir, tmp_path / "def", "--define", name, uri=uri)
        assert r.rc == 0, r
        assert str(tmp_path / "def" / "vda.qcow2") in d.conn.lookupByName(name).XMLDesc(0)
    finally:
        scratch.remove_domain(d.conn, name)


def test_pull_faults_leave_the_chain_intact(make_domain, hidden, tmp_path, procs):
    """SIGTERM, SIGINT and a dropped NBD export mid-copy: exit 1, one line, nothing left or lost;
    after SIGKILL the next run cleans up."""
    from virtbackup.virt import monitor
    d = make_domain({"vda": 128 * MiB})
    h = hidden()
    bdir = h.path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    point_of(h.cli("backup", d.name, bdir, "--mode", "pull", "--json"))
    expected = {"0001": d.expected()}

    def drop_export() -> None:
        for e in exported(d):
            monitor.qmp(d.dom, "block-export-del", {"id": e["id"], "mode": "hard"})

    faults = [
        ("SIGTERM", lambda p: os.kill(p.pid, signal.SIGTERM), "backup interrupted by SIGTERM; nothing was recorded"),
        ("export dropped", lambda p: drop_export(), "backup failed: "),
        ("SIGINT", lambda p: os.kill(p.pid, signal.SIGINT), "backup interrupted by SIGINT; nothing was recorded"),
    ]
    for i, (name, act, message) in enumerate(faults):
        d.write("vda", 0x20 + i, 0, 64 * MiB)        # a copy that takes a while
        files, cps = h.listing(), checkpoint_names(d.dom)
        p = h.popen("backup", d.name, bdir, "--mode", "pull", "--level", "inc", "--json")
        procs.append(p)
        stop_when_job_open(d, p)
        act(p)
        r = finish(p)
        assert r.rc == 1, (name, r)
        assert message in one_error_line(r), (name, r)
        print(f"\n{name}: {one_error_line(r)}")
        assert h.listing() == files, name
        assert checkpoint_names(d.dom) == cps, name
        assert leftovers(d, bdir) == {}, name

    # SIGKILL: nothing can clean up in the run itself; its job stays open on the host (export,
    # scratch file) and its checkpoint stays. The next run of this directory aborts and removes them.
    d.write("vda", 0x30, 0, 64 * MiB)
    p = h.popen("backup", d.name, bdir, "--mode", "pull", "--level", "inc")
    procs.append(p)
    stop_when_job_open(d, p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert job_open(d), "the killed run's pull job should still be open"
    wait_no_qemu_nbd(bdir)

    d.write("vda", 0x31, 100 * MiB, 1 * MiB)
    r = h.cli("backup", d.name, bdir, "--mode", "pull", "--level", "inc", "--json")
    p2 = point_of(r)
    assert "aborting the backup job left by an interrupted run" in r.err, r
    assert p2["parent"] == "0001"      # retried from the last good checkpoint: every write since it
    prefix = p2["checkpoint"][:-4]
    assert [n for n in checkpoint_names(d.dom) if n.startswith(prefix)] == [prefix + "0001", p2["checkpoint"]]
    assert leftovers(d, bdir) == {}
    expected[p2["id"]] = d.expected()
    for pid, exp in expected.items():
        restore_and_compare(h, bdir, pid, exp, tmp_path / f"o{pid}")


def test_pull_domain_destroyed_mid_copy(make_domain, hidden, tmp_path, procs):
    d = make_domain({"vda": 128 * MiB})
    h = hidden()
    bdir = h.path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    point_of(h.cli("backup", d.name, bdir, "--mode", "pull", "--json"))
    e1 = d.expected()
    d.write("vda", 0x22, 0, 96 * MiB)
    files, cps = h.listing(), checkpoint_names(d.dom)
    p = h.popen("backup", d.name, bdir, "--mode", "pull", "--level", "inc")
    procs.append(p)
    stop_when_job_open(d, p)
    exported(d)
    d.dom.destroy()
    r = finish(p)
    assert r.rc == 1, r
    assert "backup job failed: the domain stopped during the backup" in one_error_line(r), r
    assert h.listing() == files and checkpoint_names(d.dom) == cps
    assert leftovers(d, bdir) == {}
    restore_and_compare(h, bdir, "0001", e1, tmp_path / "o1")


def test_pull_local_target_full_enospc(make_domain, hidden, tmp_path):
    """The backup directory's filesystem fills up during the copy: exit 1, nothing recorded or left."""
    d = make_domain({"vda": 64 * MiB})
    h = hidden("12m")
    bdir = h.path / "bk"
    d.write("vda", 0x11, 0, 2 * MiB)
    # uncompressed: pattern data would fit compressed (test_compress fills it with random data)
    point_of(h.cli("backup", d.name, bdir, "--mode", "pull", "--compress", "none", "--json"))
    e1 = d.expected()
    d.write("vda", 0x22, 8 * MiB, 24 * MiB)
    files, cps = h.listing(), checkpoint_names(d.dom)
    r = h.cli("backup", d.name, bdir, "--mode", "pull", "--level", "inc")
    assert r.rc == 1, r
    line = one_error_line(r)
    assert "No space left on device" in line and "writing" in line, r
    print(f"\nENOSPC: {line}")
    assert h.listing() == files and checkpoint_names(d.dom) == cps
    assert leftovers(d, bdir) == {}
    restore_and_compare(h, bdir, "0001", e1, tmp_path / "o1")


def test_a_scratch_filesystem_without_room_is_refused_before_the_job(make_domain, tmp_path):
    """Issue 23, fleecing that cannot hurt the guest: the scratch files may have to hold the old
    data of everything the guest rewrites before it is read (a full: the allocated bytes; an
    incremental: the dirty bytes). A scratch filesystem with less room is refused before
    backupBegin (exit 2, nothing recorded, no job, no checkpoint); an incremental whose dirty
    bytes fit goes through on the same filesystem."""
    from tests.support.helpers import tmpfs
    d = make_domain({"vda": 64 * MiB})
    d.write("vda", 0x61, 0, 24 * MiB)
    bdir = tmp_path / "bk"
    with tmpfs(tmp_path / "small", "8M") as small:
        r = cli("backup", d.name, bdir, "--mode", "pull", "--scratch-dir", small, "--json")
        assert r.rc == 2, r
        line = one_error_line(r)
        assert f"scratch files in {small} may need up to" in line and "--scratch-dir" in line, line
        assert r.json()["error"]["kind"] == "no-space"
        assert not checkpoint_names(d.dom) and not leftovers(d, bdir)
        assert not (bdir / "points").exists() or not any((bdir / "points").iterdir())
        assert not list(small.iterdir())
        # an incremental of 2 MiB dirty fits in 8 MiB
        assert cli("backup", d.name, bdir, "--mode", "pull", "--level", "full").rc == 0
        d.write("vda", 0x62, 4 * MiB, 2 * MiB)
        r = cli("backup", d.name, bdir, "--mode", "pull", "--scratch-dir", small, "--json")
        assert r.rc == 0 and r.json()["point"]["level"] == "inc", r
        assert_point_restores(bdir, r.json()["point"]["id"], d.expected(), tmp_path / "r")


def test_auto_pulls_a_running_domain_and_pushes_when_its_scratch_files_may_not_fit(conn, tmp_path):
    """Issue 23, the default switch: without --mode a running domain is pulled, and says so
    (point, transport_reason). Where pull's scratch files may not fit beside the disks (their
    default place), auto pushes instead, with a warning and the reason, rather than refusing a
    nightly backup; an explicit --mode pull there is refused (exit 2) as before. Every point
    restores bit-exact and no scratch file is left."""
    from tests.support import scratch
    from tests.support.helpers import tmpfs
    bdir = tmp_path / "bk"
    with tmpfs(tmp_path / "small", "40M") as small:
        d = scratch.ScratchDomain(conn, f"vbauto-{os.getpid()}", small, {"vda": 64 * MiB})
        try:
            d.create()
            d.write("vda", 0x51, 0, 24 * MiB)      # ~24 MiB allocated, ~16 MiB left beside it
            r = cli("backup", d.name, bdir, "--mode", "pull", "--json")
            assert r.rc == 2 and r.json()["error"]["kind"] == "no-space", r
            assert "scratch files in" in one_error_line(r) and not checkpoint_names(d.dom)
            full = cli("backup", d.name, bdir, "--json")
            assert full.rc == 0, full
            fj = full.json()
            assert fj["point"]["transport"] == "push", fj
            assert fj["transport_reason"].startswith("--mode auto: the pull job's scratch files in"), fj
            assert "--scratch-dir DIR" in fj["transport_reason"] and "pushed instead" in fj["transport_reason"]
            assert any("--mode auto" in w and "pushed instead" in w for w in fj["warnings"]), fj["warnings"]
            assert "virtbackup: warning: --mode auto: " in full.err
            want = {fj["point"]["id"]: d.expected()}
            d.write("vda", 0x52, 32 * MiB, 2 * MiB)    # 2 MiB dirty: fits
            inc = cli("backup", d.name, bdir, "--json")
            assert inc.rc == 0, inc
            ij = inc.json()
            assert (ij["point"]["level"], ij["point"]["transport"]) == ("inc", "pull"), ij
            assert ij["transport_reason"].startswith("--mode auto pulls (the default)") and not ij["warnings"], ij
            want[ij["point"]["id"]] = d.expected()
            assert not list(small.glob("*.scratch")), list(small.iterdir())
            assert d.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
            for pid, expected in want.items():
                assert_point_restores(bdir, pid, expected, tmp_path / f"r{pid}")
        finally:
            d.remove()


def test_auto_pushes_when_the_default_scratch_directory_is_missing(conn, tmp_path):
    """The default scratch place is the disk image's directory (libvirt's image dir for a block or
    network disk), which need not exist on this host: here the running domain's image directory
    is removed (QEMU keeps its open file). Without --mode the backup pushes and says why; an
    explicit --mode pull is refused up front (exit 2, nothing recorded, no checkpoint)."""
    import shutil

    from tests.support import scratch
    disks = tmp_path / "gone"
    d = scratch.ScratchDomain(conn, f"vbnodir-{os.getpid()}", disks, {"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    try:
        d.create()
        d.write("vda", 0x41, 0, 2 * MiB)
        shutil.rmtree(disks)
        r = cli("backup", d.name, bdir, "--mode", "pull", "--json")
        assert r.rc == 2 and f"scratch directory {disks} for disk vda" in one_error_line(r), r
        assert not checkpoint_names(d.dom)
        r = cli("backup", d.name, bdir, "--json")
        assert r.rc == 0, r
        j = r.json()
        assert j["point"]["transport"] == "push", j
        assert j["transport_reason"].startswith(f"--mode auto: scratch directory {disks} for disk vda:"), j
        assert "No such file or directory" in j["transport_reason"] and "pushed instead" in j["transport_reason"]
        assert_point_restores(bdir, j["point"]["id"], d.expected(), tmp_path / "r")
    finally:
        d.remove()


def test_auto_pushes_where_libnbd_is_missing_and_an_explicit_pull_says_what_to_install(make_domain, tmp_path):
    """A plain `pip install` into a venv without Debian's packages has no libnbd binding (the
    README's 'elsewhere' install): without --mode the backups go on, pushed, and say why; an
    explicit --mode pull incremental fails with one line naming the package, nothing recorded."""
    from tests.support.helpers import ROOT, CLIResult
    stub = tmp_path / "no-libnbd"
    stub.mkdir()
    (stub / "nbd.py").write_text('raise ImportError("libnbd is not installed here (test stub)")\n')
    env = dict(os.environ, PYTHONPATH=f"{stub}:{ROOT}")

    def run(*args: object) -> CLIResult:
        return CLIResult(subprocess.run([sys.executable, "-m", "virtbackup.cli", *map(str, args)],
                                        capture_output=True, text=True, timeout=300, env=env))
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x71, 0, 2 * MiB)
    want = {}
    for level in ("full", "inc"):
        r = run("backup", d.name, bdir, "--level", level, "--json")
        assert r.rc == 0, r
        j = r.json()
        assert (j["point"]["level"], j["point"]["transport"]) == (level, "push"), j
        assert j["transport_reason"].startswith("--mode auto: pull mode needs libnbd's Python binding"), j
        assert "python3-libnbd" in j["transport_reason"] and "pushed instead" in j["transport_reason"]
        want[j["point"]["id"]] = d.expected()
        d.write("vda", 0x72, 4 * MiB, MiB)
    r = run("backup", d.name, bdir, "--level", "inc", "--mode", "pull")
    assert r.rc == 1 and "apt-get install python3-libnbd" in one_error_line(r), r
    assert sorted(p.name for p in (bdir / "points").iterdir()) == sorted(want)     # nothing recorded, no .partial
    assert d.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    for pid, expected in want.items():
        assert_point_restores(bdir, pid, expected, tmp_path / f"r{pid}")


def test_a_scratch_dir_that_is_no_directory_or_holds_control_characters_is_refused(make_domain, tmp_path):
    """A --scratch-dir that is a regular file, missing, or has a control character in it (a job
    file's TOML escapes can hold any): exit 2 with one line naming it, before any job starts."""
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x63, 0, MiB)
    bdir = tmp_path / "bk"
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for bad, said in ((afile, f"scratch directory {afile} for disk vda: not a directory"),
                      (tmp_path / "missing", f"scratch directory {tmp_path / 'missing'} for disk vda: No such file"),
                      (f"{tmp_path}/a\nb", "--scratch-dir must not contain control characters: "),
                      (f"{tmp_path}/\x1b[31m", "--scratch-dir must not contain control characters: ")):
        r = cli("backup", d.name, bdir, "--mode", "pull", "--scratch-dir", bad, "--json")
        assert r.rc == 2 and said in one_error_line(r), (bad, r)
        assert not checkpoint_names(d.dom) and not leftovers(d, bdir)
        assert d.dom.jobInfo()[0] == 0
    assert afile.read_text() == "not a directory"


def test_a_scratch_file_left_behind_does_not_block_the_next_pull(make_domain, tmp_path):
    """Smaller finding of the hostile pass: a scratch file a failed run left (libvirt deletes
    them when a job ends; a crash of libvirtd does not) blocked every later pull backup of that
    directory, the name being the same each retry. It is removed (it is this chain's and no job
    of ours runs), and each run's scratch names carry a tag of their own."""
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x71, 0, 2 * MiB)
    bdir = tmp_path / "bk"
    p1 = point_of(cli("backup", d.name, bdir, "--mode", "pull", "--json"))
    prefix = p1["checkpoint"][:-4]
    stale = Path(d.workdir) / f"{prefix}0002-vda.scratch"          # the next point's plain name
    stale.write_bytes(b"left by a crash")
    other = Path(d.workdir) / "virtbackup-00000000-0002-vda.scratch"   # another chain's: kept
    other.write_bytes(b"not ours")
    d.write("vda", 0x72, 4 * MiB, MiB)
    r = cli("backup", d.name, bdir, "--mode", "pull", "--json")
    p2 = point_of(r)
    assert p2["level"] == "inc" and f"removed {stale}" in r.err, r
    assert not stale.exists() and other.read_bytes() == b"not ours"
    other.unlink()
    assert not leftovers(d, bdir)
    assert_point_restores(bdir, p2["id"], d.expected(), tmp_path / "r")


def test_a_remote_pull_client_the_hypervisor_does_not_trust_is_refused(make_domain, sshd, tmp_path):
    """Issue 23: libvirt's NBD server for a remote pull requires TLS and a client certificate of
    the CA it trusts (backup_tls_x509_verify): a client whose certificate another CA signed gets
    no data (exit 1, nothing recorded, the job ended); the same run with the right certificate
    restores bit-exact."""
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x33, 0, 2 * MiB)
    other = tmp_path / "other-ca"
    other.mkdir()
    for cmd in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=another CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                 "-keyout", "ca-key.pem", "-out", "ca-cert.pem"],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=intruder", "-keyout", "client-key.pem",
                 "-out", "c.csr"],
                ["x509", "-req", "-in", "c.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                 "-days", "2", "-out", "client-cert.pem"]):
        subprocess.run(["openssl", *cmd], cwd=other, check=True, capture_output=True)
    # it trusts the hypervisor's CA and its own (a bundle: QEMU's client checks its own certificate
    # too), so the failure is the server refusing it, not the reverse
    bundle = (TLS_CLIENT / "ca-cert.pem").read_bytes() + (other / "ca-cert.pem").read_bytes()
    (other / "ca-cert.pem").write_bytes(bundle)
    os.chmod(other / "client-key.pem", 0o600)
    bdir = tmp_path / "bk"
    r = cli("-c", sshd.uri, "backup", d.name, bdir, "--json", "--nbd-tls-dir", other)
    line = one_error_line(r)
    assert r.rc == 1 and "NBD export 'vda'" in line, r
    assert not (bdir / "virtbackup.json").exists() or not json.loads((bdir / "virtbackup.json").read_text())["points"]
    assert leftovers(d, bdir) == {}
    r = cli("-c", sshd.uri, "backup", d.name, bdir, "--json", "--nbd-tls-dir", TLS_CLIENT)
    p = point_of(r)
    assert p["nbd_tls"] is True
    assert_point_restores(bdir, p["id"], d.expected(), tmp_path / "r")


def test_a_qemu_nbd_left_by_a_killed_run_is_ended_by_the_next(make_domain, tmp_path):
    """Found by the soak: an encrypted pull SIGKILLed as its target server started left that
    qemu-nbd waiting for its first client for minutes (its parent-death signal lost), serving the
    dead run's partial image and holding its key file. The next run of the directory (under its
    lock, so no live run of ours can be using it) ends every qemu-nbd of ours that serves an
    image in its .partial dirs; nothing else."""
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x44, 0, MiB)
    bdir = tmp_path / "bk"
    point_of(cli("backup", d.name, bdir, "--mode", "pull", "--json"))
    part = bdir / "points" / "0002.partial"
    part.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(part / "vda.qcow2"), str(16 * MiB)], check=True)
    other = tmp_path / "unrelated.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(MiB)], check=True)
    pids = []
    for img, sock in ((part / "vda.qcow2", tmp_path / "left.sock"), (other, tmp_path / "other.sock")):
        # orphaned at once: its starting shell exits, as the killed run did
        out = subprocess.run(["sh", "-c", f"qemu-nbd -f qcow2 -k {sock} {img} >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True).stdout
        pids.append(int(out))
    left, unrelated = pids
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "left.sock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.write("vda", 0x45, 2 * MiB, MiB)
        r = cli("backup", d.name, bdir, "--mode", "pull", "--json")
        p = point_of(r)
        assert f"ended qemu-nbd (pid {left})" in r.err, r
        deadline = time.monotonic() + 10
        while Path(f"/proc/{left}").exists() and "zombie" not in Path(f"/proc/{left}/status").read_text().lower():
            assert time.monotonic() < deadline, "the left-over qemu-nbd is still running"
            time.sleep(0.05)
        assert Path(f"/proc/{unrelated}").exists(), "a qemu-nbd serving something else was ended"
        assert_point_restores(bdir, p["id"], d.expected(), tmp_path / "r")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
