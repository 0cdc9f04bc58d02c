"""--debug shows what was sent (argv, XML, QMP) with timings; each run leaves its log in BACKUP_DIR."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from tests.support.helpers import cli, take_backup

MiB = 1 << 20


def qemu_img_recorder(tmp_path: Path) -> "tuple[Path, Path]":
    """A qemu-img that writes each argv it gets to a file, then runs the real one."""
    record = tmp_path / "qemu-img-argv.txt"
    wrapper = tmp_path / "qemu-img"
    wrapper.write_text(f"""#!{sys.executable}
import os, sys
with open({str(record)!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
os.execvp("qemu-img", ["qemu-img"] + sys.argv[1:])
""")
    wrapper.chmod(0o755)
    return wrapper, record


def test_debug_shows_backup_and_checkpoint_xml_and_every_qemu_img_argv(make_domain, tmp_path, monkeypatch):
    d = make_domain({"vda": 16 * MiB, "vdb": 8 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    take_backup(d.name, bdir, "full")
    d.write("vda", 0x22, 2 * MiB, 1 * MiB)

    wrapper, record = qemu_img_recorder(tmp_path)
    monkeypatch.setenv("VIRTBACKUP_QEMU_IMG", str(wrapper))
    r = cli("--debug", "backup", d.name, bdir, "--level", "inc")
    assert r.rc == 0, r
    err = r.err
    assert "virtbackup: debug:" in err and "argv" in err
    # the backup XML (incremental from the full's checkpoint; pull, the default) and the
    # checkpoint XML, as sent; the qemu-nbd that writes the target, with its argv
    assert "<domainbackup mode=\"pull\">" in err and "<incremental>virtbackup-" in err, err
    assert "target server: [" in err and "qemu-nbd" in err, err
    assert "backupBegin" in err and "<domaincheckpoint>" in err
    assert "checkpoint XML of virtbackup-" in err          # the saved one, as libvirt returned it
    assert "QMP " in err and "query-named-block-nodes" in err   # the bitmap check
    argvs = [ln for ln in record.read_text().splitlines() if ln]
    assert argvs and any(a.startswith("create ") for a in argvs), argvs
    for argv in argvs:
        assert f"exec {wrapper} {argv}" in err, f"qemu-img {argv} not in the debug output"
    assert "took" in err                                      # timings
    # without --debug: none of it
    d.write("vda", 0x33, 4 * MiB, 1 * MiB)
    quiet = cli("backup", d.name, bdir, "--level", "inc")
    assert quiet.rc == 0 and "debug:" not in quiet.err, quiet

    logs = sorted((bdir / "logs").iterdir())
    assert len(logs) == 3 and all(p.name.startswith("backup-") for p in logs), logs
    assert stat.S_IMODE((bdir / "logs").stat().st_mode) == 0o700
    for p in logs:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    text = logs[1].read_text()       # the --debug run: concise (INFO), not the debug stream
    assert "plan: point 0002, inc backup from checkpoint virtbackup-" in text, text
    assert "recorded point 0002" in text and "exec " not in text and "<domainbackup" not in text


def test_run_log_of_a_failed_run_and_a_symlinked_log_dir(make_domain, tmp_path):
    d = make_domain({"vda": 8 * MiB})
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    r = cli("backup", d.name, bdir, "--level", "inc", "--disk", "vdz")
    assert r.rc == 2, r
    failed = sorted((bdir / "logs").iterdir())[-1].read_text()
    assert "backup failed: DiskNotFound: domain has no disk 'vdz'" in failed, failed

    # logs/ replaced by a symlink: never written through, the backup still works
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(bdir / "logs", tmp_path / "old-logs")
    os.symlink(elsewhere, bdir / "logs")
    r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 0, r
    assert list(elsewhere.iterdir()) == []
    # ... and never silently: one warning line on stderr, and in the --json result
    assert f"warning: no run log: {bdir / 'logs'} is not usable (it is a symlink; not followed)" in r.err, r
    r = cli("backup", d.name, bdir, "--level", "inc", "--json")
    assert r.rc == 0, r
    assert any("it is a symlink" in w for w in json.loads(r.out)["warnings"]), r
    r = cli("prune", bdir, "--keep", "2", "--json")
    assert r.rc == 0, r
    assert any("it is a symlink" in w for w in json.loads(r.out)["warnings"]), r
    r = cli("prune", bdir, "--keep", "1")
    assert r.rc == 0 and "warning: no run log" in r.err, r
    assert list(elsewhere.iterdir()) == []


def test_prune_leaves_a_log_and_a_dry_run_does_not(make_domain, tmp_path):
    d = make_domain({"vda": 8 * MiB})
    bdir = tmp_path / "bk"
    for level in ("full", "inc", "inc"):
        take_backup(d.name, bdir, level)
    assert cli("prune", bdir, "--keep", "2", "--dry-run").rc == 0
    assert not [p for p in (bdir / "logs").iterdir() if p.name.startswith("prune")]
    assert cli("prune", bdir, "--keep", "2").rc == 0
    (log,) = [p for p in (bdir / "logs").iterdir() if p.name.startswith("prune")]
    assert "committed: kept 0002, 0003, dropped 0001" in log.read_text()
