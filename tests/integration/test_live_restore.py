"""Live restore (`restore --live --define NAME`, `restore --resume-live NAME`) against real
libvirtd and QEMU: the domain runs before the copy ends, guest writes during the copy survive,
the result needs no backup dir, interrupted or stopped live restores finish on resume."""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import libvirt

from tests.support import scratch
from tests.support.helpers import (
    cli,
    cli_bg,
    forget_xml_digests,
    header_backing,
    hmp_write,
    lookup_domain,
    patched,
    pulling,
    snapshot_dir,
    take_backup,
    wait_for,
)
from tests.support.schemas import validate
from virtbackup.qemu import qemu_img

MiB = 1 << 20
KiB = 1 << 10


def stop(dom: libvirt.virDomain) -> None:
    """SIGTERM only: QEMU closes the images in order (no OS inside to shut down)."""
    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)


def assert_reads(image: Path, want: bytes) -> None:
    diff = scratch.first_difference(scratch.read_raw(image), want)
    assert diff is None, f"{image}: first difference at byte {diff}"


def test_live_restore_runs_at_once_keeps_guest_writes_and_frees_itself(make_domain, conn, restored_domains,
                                                                       procs, tmp_path):
    d = make_domain({"vda": 32 * MiB, "vdb": 16 * MiB})
    d.write("vda", 0x11, 0, 4 * MiB)
    d.write("vdb", 0x21, 2 * MiB, 2 * MiB)
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    d.write("vda", 0x12, 24 * MiB, 4 * MiB)
    take_backup(d.name, bdir, "inc")          # vda reads through a two-image chain
    want = d.expected()
    before = snapshot_dir(bdir)
    name = f"vblive-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "live"

    t0 = time.monotonic()
    p = cli_bg(procs, "restore", bdir, out, "--live", "--define", name, "--max-speed", 2 * MiB)
    dom = wait_for("the restored domain to run", lambda: (lambda x: x if x and x.isActive() else None)(
        lookup_domain(conn, name)), every=0.01)
    running = time.monotonic() - t0
    wait_for("the pull to copy something", lambda: pulling(dom, "vda"))
    print(f"\nlive restore: domain running {running:.2f}s after the command started "
          "(32 + 16 MiB disks, 10 MiB of data)")

    # guest writes during the copy, one where the pull has not been yet (vda 26 MiB)
    hmp_write(dom, "vda", 0x5a, 26 * MiB, 512 * KiB)
    hmp_write(dom, "vdb", 0x5b, 0, 256 * KiB)
    want["vda"] = patched(want["vda"], 0x5a, 26 * MiB, 512 * KiB)
    want["vdb"] = patched(want["vdb"], 0x5b, 0, 256 * KiB)
    # the backup dir is read-only and protected while the domain reads from it
    v = cli("verify", bdir, "--json")
    assert v.rc == 0 and v.json()["ok"], v
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 1 and f"is the backing of domain '{name}' (disk vda)" in r.err, r
    assert pulling(dom, "vda"), "the copy ended before the checks ran; they proved nothing"

    stdout, stderr = p.communicate(timeout=120)
    independent = time.monotonic() - t0
    assert p.returncode == 0, (stdout, stderr)
    assert f"domain {name} running after" in stdout and "independent of" in stdout, stdout
    assert "copying vda" in stderr, stderr           # progress was shown
    reported = stdout.split("running after ", 1)[1].split("s", 1)[0]
    print(f"live restore: the command reports running after {reported}s; independent {independent:.2f}s "
          "after it started (2 MiB/s per disk)")
    for disk in ("vda", "vdb"):
        assert header_backing(out / f"{disk}.qcow2") is None
    assert dom.isActive()
    assert snapshot_dir(bdir) == before
    assert cli("verify", bdir).rc == 0
    assert cli("restore", "--resume-live", name).rc == 2     # nothing left to resume

    # the backup can go away: the domain's data is all in its own images
    moved = tmp_path / "bk-moved"
    bdir.rename(moved)
    hmp_write(dom, "vda", 0x5c, 30 * MiB, 64 * KiB)
    want["vda"] = patched(want["vda"], 0x5c, 30 * MiB, 64 * KiB)
    stop(dom)
    for disk in ("vda", "vdb"):
        assert scratch.backing_chain(out / f"{disk}.qcow2") == [str(out / f"{disk}.qcow2")]
        assert_reads(out / f"{disk}.qcow2", want[disk])
    dom.create()                                   # and it starts without the backup dir
    assert dom.isActive()


def test_live_restore_interrupted_then_resumed(make_domain, conn, restored_domains, procs, tmp_path):
    d = make_domain({"vda": 32 * MiB})
    d.write("vda", 0x31, 0, 8 * MiB)
    bdir = tmp_path / "bk"
    # a compressed chain (issue 24): the live domain reads zstd clusters until the pull is done
    assert cli("backup", d.name, bdir, "--level", "full", "--compress", "zstd").rc == 0
    d.write("vda", 0x32, 16 * MiB, 64 * KiB)
    take_backup(d.name, bdir, "inc")
    want = d.expected()["vda"]
    name = f"vblive-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "live"
    img = out / "vda.qcow2"

    p = cli_bg(procs, "restore", bdir, out, "--live", "--define", name, "--max-speed", 1 * MiB)
    dom = wait_for("the restored domain", lambda: lookup_domain(conn, name))
    wait_for("the pull to copy something", lambda: pulling(dom, "vda"))
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1, (stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("virtbackup: error:")]
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], stderr
    assert f"virtbackup restore --resume-live {name}" in lines[0], stderr
    # the domain runs on a valid overlay that still reads from the backup; the pull stopped
    assert dom.isActive() and not dom.blockJobInfo("vda", 0)
    assert header_backing(img) == str((bdir / "points/0002/vda.qcow2").resolve())
    copied = qemu_img.info(img, force_share=True)["actual-size"]
    assert 0 < copied < 8 * MiB, copied                 # part of the data came over, not all
    assert cli("verify", bdir).rc == 0
    # dropping 0001 would rewrite the images the running domain still reads: refused
    before = snapshot_dir(bdir)
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 1 and f"is the backing of domain '{name}' (disk vda)" in r.err, r
    assert snapshot_dir(bdir) == before
    hmp_write(dom, "vda", 0x3a, 6 * MiB, 1 * MiB)       # the guest goes on writing
    want = patched(want, 0x3a, 6 * MiB, 1 * MiB)

    r = cli("restore", "--resume-live", name, "--json")
    assert r.rc == 0, r
    validate("live-restore", r.json())
    assert r.json()["resumed"] and not r.json()["offline"] and r.json()["domain"]["name"] == name
    assert header_backing(img) is None
    stop(dom)
    bdir.rename(tmp_path / "bk-moved")
    assert scratch.backing_chain(img) == [str(img)]
    assert_reads(img, want)


def test_live_restore_domain_stopped_midway_finishes_offline(make_domain, conn, restored_domains, procs, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x41, 1 * MiB, 6 * MiB)
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    want = d.expected()["vda"]
    name = f"vblive-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "live"

    p = cli_bg(procs, "restore", bdir, out, "--live", "--define", name, "--max-speed", 1 * MiB)
    dom = wait_for("the restored domain", lambda: lookup_domain(conn, name))
    wait_for("the pull to copy something", lambda: pulling(dom, "vda"))
    hmp_write(dom, "vda", 0x4a, 0, 2 * MiB)
    want = patched(want, 0x4a, 0, 2 * MiB)
    stop(dom)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1, (stdout, stderr)
    assert "the domain stopped during the live restore" in stderr, stderr
    assert f"--resume-live {name}" in stderr and "offline" in stderr, stderr
    assert header_backing(out / "vda.qcow2") is not None

    r = cli("restore", "--resume-live", name, "--max-speed", 1 * MiB)   # speed ignored offline
    assert r.rc == 0 and "flattened offline" in r.out, r
    assert not dom.isActive()
    bdir.rename(tmp_path / "bk-moved")
    assert scratch.backing_chain(out / "vda.qcow2") == [str(out / "vda.qcow2")]
    assert_reads(out / "vda.qcow2", want)


def test_live_restore_refusals(make_domain, conn, restored_domains, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    out = tmp_path / "out"
    cases = [
        (("restore", bdir, out, "--live"), "--live needs --define"),
        (("restore", bdir, out, "--max-speed", 1000), "--max-speed only applies"),
        (("restore", bdir, out, "--live", "--define", "x", "--max-speed", 0), "--max-speed must be"),
        (("restore", "--live", "--define", "x"), "needs BACKUP_DIR and OUTPUT_DIR"),
        (("restore", bdir, "--resume-live", "x"), "takes no BACKUP_DIR"),
        (("restore", "--resume-live", f"vbnone-{secrets.token_hex(3)}"), "not found"),
        (("restore", "--resume-live", d.name), "has no live restore to resume"),
        (("restore", bdir, out, "--live", "--define", d.name), "exists"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.rc == 2, (args, r)
        assert r.err.startswith("virtbackup: error:") and msg in r.err and len(r.err.splitlines()) == 1, (args, r)
    assert not out.exists() or not any(out.iterdir())


def test_live_restore_domain_that_cannot_start_leaves_nothing(make_domain, conn, restored_domains, tmp_path):
    """libvirt defines it but QEMU can't start it (hand-edited saved XML: 64 TiB of RAM, refused
    with ENOMEM on this host): undefined again, overlays removed, exit 1, one line."""
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    p = take_backup(d.name, bdir, "full")["point"]
    xml = bdir / p["domain_xml"]
    text = xml.read_text()
    start, end = text.index("<memory"), text.index("</memory>") + len("</memory>")
    text = text[:start] + "<memory unit='TiB'>64</memory>" + text[end:]
    if "<currentMemory" in text:
        start, end = text.index("<currentMemory"), text.index("</currentMemory>") + len("</currentMemory>")
        text = text[:start] + text[end:]
    xml.write_text(text)
    forget_xml_digests(bdir)     # else the edited XML is refused as damaged before libvirt sees it
    name = f"vblive-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "out"
    r = cli("restore", bdir, out, "--live", "--define", name)
    assert r.rc == 1, r
    assert r.err.startswith("virtbackup: error:") and len(r.err.splitlines()) == 1, r
    assert f"domain '{name}' did not start" in r.err and "undefined and its overlays removed" in r.err, r
    assert lookup_domain(conn, name) is None
    assert not list(out.iterdir())


def test_live_restore_killed_right_after_define_is_resumable_and_prune_keeps_its_backing(
        make_domain, conn, restored_domains, tmp_path):
    """Hostile pass D8: SIGKILL just after the define left a domain on overlays backed by the
    backup dir without its resume record: --resume-live found nothing and a prune removed the
    backing file. Now the domain is defined with its record; prune (also a dry run) refuses to
    remove or rewrite what it is layered on until the live restore is finished."""
    import subprocess
    import sys

    from tests.support.helpers import ROOT
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x41, 0, 4 * MiB)
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    want = d.expected()["vda"]
    d.write("vda", 0x42, 8 * MiB, 1 * MiB)
    take_backup(d.name, bdir, "inc")
    name = f"vblive-{secrets.token_hex(3)}"
    restored_domains.append(name)
    out = tmp_path / "live"
    img = out / "vda.qcow2"
    p = subprocess.run([sys.executable, "-m", "tests.support.faultpoint", "kill", "define", "restore", str(bdir),
                        str(out), "--point", "0001", "--live", "--define", name],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == -signal.SIGKILL, p
    dom = lookup_domain(conn, name)
    assert dom is not None and not dom.isActive()
    assert header_backing(img) == str((bdir / "points/0001/vda.qcow2").resolve())

    before = snapshot_dir(bdir)
    for dry in ((), ("--dry-run",)):
        r = cli("prune", bdir, "--keep", "1", *dry)
        assert r.rc == 1 and f"is the backing of domain '{name}' (disk vda)" in r.err, r
        assert "--resume-live" in r.err, r
    assert snapshot_dir(bdir) == before

    r = cli("restore", "--resume-live", name, "--json")
    assert r.rc == 0, r
    assert r.json()["resumed"] and r.json()["offline"]
    assert header_backing(img) is None
    assert_reads(img, want)
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 0, r


def test_a_failed_define_leaves_no_output_dir(make_domain, conn, tmp_path):
    """Smaller finding of the hostile pass: a --define that libvirt refuses used to leave an
    empty OUTPUT_DIR behind (the images were taken back, the directory not)."""
    d = make_domain({"vda": 8 * MiB})
    d.write("vda", 0x51, 0, MiB)
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    out = tmp_path / "never"
    r = cli("restore", bdir, out, "--define", "bad/name")
    assert r.rc != 0, r
    assert not out.exists(), list(out.iterdir())
