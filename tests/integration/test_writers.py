"""Hostile pass D2 through the real CLI: every writer refuses a planted device node, fifo, symlink
or foreign file and a directory another user can write to, with one error line and exit 2, and
leaves it as it was; run-directory locks do not pile up. (Pure cases: tests/unit/test_writers.py.)

Device nodes are made with mknod in the test's own directory: the code before the fix replaced
a metrics_file naming /dev/null with a regular file, and this must not run against the host's.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from tests.support.helpers import cli, one_error_line, take_backup

MiB = 1 << 20


def job(tmp_path: Path, metrics_file: Path) -> Path:
    """A job selecting no domain (allow_empty): it only writes its metrics file."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    p = tmp_path / "nightly.toml"
    p.write_text(f'backup_root = "{root}"\ndomains = ["vbw-none-{secrets.token_hex(4)}-*"]\nallow_empty = true\n'
                 f'metrics_file = "{metrics_file}"\n')
    return p


def test_run_refuses_a_metrics_file_that_is_not_ours(tmp_path: Path):
    prom = tmp_path / "virtbackup.prom"
    r = cli("run", job(tmp_path, prom))
    assert r.rc == 0, r
    assert prom.read_text().startswith("# HELP virtbackup_")
    assert cli("run", job(tmp_path, prom)).rc == 0          # our own file: replaced
    os.unlink(prom)

    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))          # what /dev/null is
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "link.prom"
    link.symlink_to(victim)
    foreign = tmp_path / "foreign.prom"
    foreign.write_text("node_load1 3\n")
    for target, kind in ((node, "a character device"), (fifo, "a fifo"), (link, "a symlink"),
                         (foreign, "does not look like a metrics file")):
        r = cli("run", job(tmp_path, target))
        assert r.rc == 2, r
        assert kind in one_error_line(r) and "key 'metrics_file' is refused" in r.err, r
    assert stat.S_ISCHR(os.lstat(node).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert link.is_symlink() and victim.read_text() == "precious\n"
    assert foreign.read_text() == "node_load1 3\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_refuses_a_metrics_dir_another_user_can_write(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    r = cli("run", job(tmp_path, shared / "virtbackup.prom"))
    assert r.rc == 2, r
    assert "other users can write to it" in one_error_line(r)
    assert list(shared.iterdir()) == []


def test_files_get_into_a_dir_another_user_can_write_is_refused(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    r = cli("files", tmp_path / "bk", "get", "vda:/etc/hosts", shared)
    assert r.rc == 2, r
    assert "not copying into" in one_error_line(r) and "other users can write to it" in r.err
    assert list(shared.iterdir()) == []


@pytest.fixture
def backed_up(make_domain, tmp_path: Path):
    d = make_domain({"vda": 8 * MiB})
    d.write("vda", 0x5A, 0, 1 * MiB)
    bdir = tmp_path / "bk"
    take_backup(d.name, bdir, "full")
    return d, bdir


def test_restore_refuses_a_bad_define_name_and_an_unsafe_output_dir_before_writing(backed_up, tmp_path: Path):
    d, bdir = backed_up
    out = tmp_path / "out"
    for name in ("a/b", "x" * 248, "web\n1"):
        r = cli("restore", bdir, out, "--define", name)
        assert r.rc == 2, r
        assert "not a domain name libvirt accepts" in one_error_line(r)
        assert not out.exists(), "nothing may be written for a name libvirt refuses"
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    r = cli("restore", bdir, shared)
    assert r.rc == 2, r
    assert "other users can write to it" in one_error_line(r)
    assert list(shared.iterdir()) == []


def test_backup_locks_need_a_safe_run_dir_and_do_not_pile_up(backed_up, tmp_path: Path, monkeypatch):
    d, bdir = backed_up
    run = tmp_path / "run"
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(run))
    take_backup(d.name, bdir, "inc")
    assert [p.name for p in run.iterdir()] == [], "the domain lock file must go with its lock"
    os.chmod(run, 0o777)
    r = cli("backup", d.name, bdir, "--level", "inc")
    assert r.rc == 2, r
    assert "other users can write to it" in one_error_line(r)
    assert list(run.iterdir()) == []
    assert len(cli("list", bdir, "--json").json()["points"]) == 2
