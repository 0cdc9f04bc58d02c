"""Every file virtbackup writes (hostile pass D2): created exclusively, never through a link, in a
directory checked for ownership and mode (root's or ours, not writable by other users unless
sticky); a device node, fifo, symlink or a file we did not write is never replaced.

One test (or more) per writer: the metrics file, the chain metadata, the point's XML files
(write_private), run logs, run-directory locks (and their removal on release), backup-dir
locks, freeze markers, key files, restore outputs and `files get`. Each failed on the code
before the fix. Device nodes are made here with mknod (never the host's /dev/null: the old code
would have replaced it).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from virtbackup import jobs, restore
from virtbackup.errors import UnsafePath, UsageError
from virtbackup.files import plan_get
from virtbackup.qemu import keys
from virtbackup.store import metrics, runlog
from virtbackup.store.chain import BackupDir, FileLock, domain_lock, write_private
from virtbackup.virt import quiesce

OTHER_UID = 65534           # nobody


def result() -> Any:
    return SimpleNamespace(job="nightly", interrupted=None, started_ts=0.0, finished_ts=1.0, domains=[], ok=True)


def devnode(path: Path) -> Path:
    """A character device like /dev/null (1, 3), made here."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory any user can write to (not sticky)."""
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    yield d


# --- the metrics file --------------------------------------------------------------------------
def test_metrics_never_replace_a_device_node_fifo_symlink_or_foreign_file(tmp_path: Path):
    node = devnode(tmp_path / "null.prom")
    with pytest.raises(UnsafePath, match="character device.*not replacing it"):
        metrics.write(node, result())
    assert stat.S_ISCHR(os.lstat(node).st_mode)

    fifo = tmp_path / "fifo.prom"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath, match="a fifo"):
        metrics.write(fifo, result())
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "link.prom"
    link.symlink_to(victim)
    with pytest.raises(UnsafePath, match="a symlink"):
        metrics.write(link, result())
    assert link.is_symlink() and victim.read_text() == "precious\n"

    foreign = tmp_path / "foreign.prom"
    foreign.write_text("node_load1 3\n")
    with pytest.raises(UnsafePath, match="does not look like a metrics file virtbackup wrote"):
        metrics.write(foreign, result())
    assert foreign.read_text() == "node_load1 3\n"

    theirs = tmp_path / "theirs.prom"
    theirs.write_text(metrics.render(result()))
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePath, match=f"owned by uid {OTHER_UID}"):
        metrics.write(theirs, result())
    assert not list(tmp_path.glob(".*.tmp"))


def test_metrics_replace_our_own_file_and_an_empty_one(tmp_path: Path):
    prom = tmp_path / "v.prom"
    metrics.write(prom, result())
    metrics.write(prom, result())            # ours: replaced
    empty = tmp_path / "empty.prom"
    empty.touch()
    metrics.write(empty, result())            # nothing to lose
    assert empty.read_text().startswith("# HELP virtbackup_")


def test_metrics_directory_must_be_ours_and_not_writable_by_others(tmp_path: Path, shared_dir: Path):
    with pytest.raises(UnsafePath, match="other users can write to it"):
        metrics.write(shared_dir / "v.prom", result())
    assert list(shared_dir.iterdir()) == []
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePath, match=f"owned by uid {OTHER_UID}"):
        metrics.write(theirs / "v.prom", result())
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)                  # like /tmp: others can't swap what we create
    metrics.write(sticky / "v.prom", result())
    assert (sticky / "v.prom").read_text().startswith("# HELP")


def test_a_job_naming_a_device_node_as_metrics_file_is_refused_at_load(tmp_path: Path):
    node = devnode(tmp_path / "null")
    job = tmp_path / "j.toml"
    job.write_text(f'backup_root = "{tmp_path}"\ndomains = ["*"]\nmetrics_file = "{node}"\n')
    with pytest.raises(jobs.JobFileError, match=r"j.toml:3: key 'metrics_file' is refused: .* character device"):
        jobs.load_job(job)
    assert stat.S_ISCHR(os.lstat(node).st_mode)


# --- the chain metadata and the point's XML files ---------------------------------------------
def test_chain_metadata_never_replaces_a_fifo(tmp_path: Path):
    from tests.unit.test_chain import sample
    os.mkfifo(tmp_path / "virtbackup.json")
    with pytest.raises(UnsafePath, match="a fifo"):
        BackupDir(tmp_path).save(sample())
    assert stat.S_ISFIFO(os.lstat(tmp_path / "virtbackup.json").st_mode)


def test_write_private_never_truncates_an_existing_file(tmp_path: Path):
    f = tmp_path / "domain.xml"
    f.write_text("somebody's\n")
    with pytest.raises(Exception, match="exists"):
        write_private(f, "<domain/>")
    assert f.read_text() == "somebody's\n"
    write_private(tmp_path / "new.xml", "<domain/>")
    assert stat.S_IMODE((tmp_path / "new.xml").stat().st_mode) == 0o600


# --- run logs ----------------------------------------------------------------------------------
def test_run_log_is_not_written_into_a_logs_dir_others_can_write(tmp_path: Path):
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, 0o777)
    said = []
    with runlog.run_log(tmp_path, "backup", said.append) as path:
        logging.getLogger("virtbackup.test").info("hello")
    assert path is None and list(logs.iterdir()) == []
    assert said and "other users can write to it" in said[0]


# --- locks -------------------------------------------------------------------------------------
def test_a_lock_file_hard_linked_to_another_file_is_refused_untouched(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / ".virtbackup.lock")
    with pytest.raises(UnsafePath, match="hard links"):
        with FileLock(tmp_path / ".virtbackup.lock", "dir"):
            pass
    assert victim.read_text() == "precious\n"
    os.unlink(tmp_path / ".virtbackup.lock")
    os.mkfifo(tmp_path / ".virtbackup.lock")
    with pytest.raises(UnsafePath, match="a fifo"):
        with FileLock(tmp_path / ".virtbackup.lock", "dir"):
            pass


def test_run_dir_locks_are_removed_on_release_and_need_a_safe_dir(tmp_path: Path, monkeypatch, shared_dir: Path):
    """/run/virtbackup kept one domain-<uuid>.lock per domain ever backed up."""
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(tmp_path / "run"))
    with domain_lock("u-1"):
        assert (tmp_path / "run" / "domain-u-1.lock").read_text() == str(os.getpid())
    assert list((tmp_path / "run").iterdir()) == []
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(shared_dir))
    with pytest.raises(UnsafePath, match="other users can write to it"):
        with domain_lock("u-1"):
            pass
    assert list(shared_dir.iterdir()) == []


def test_a_taker_that_locked_a_just_removed_lock_file_locks_the_new_one(tmp_path: Path):
    """The race the removal needs handled: a taker opened the file, its holder removed it on
    release, the taker's flock then succeeds on the removed inode and must try again."""
    lock = FileLock(tmp_path / "domain-x.lock", "domain x", run_dir=True)
    (tmp_path / "stale").write_text("")
    stale = os.open(tmp_path / "stale", os.O_RDWR)
    os.unlink(tmp_path / "stale")
    real = lock._open
    calls = []

    def first_stale(dfd: int) -> Any:
        calls.append(dfd)
        return stale if len(calls) == 1 else real(dfd)

    lock._open = first_stale                 # type: ignore[method-assign]
    with lock:
        assert (tmp_path / "domain-x.lock").read_text() == str(os.getpid())
        assert lock.fd is not None and os.fstat(lock.fd).st_ino == (tmp_path / "domain-x.lock").stat().st_ino
    assert len(calls) == 2 and not (tmp_path / "domain-x.lock").exists()


# --- freeze markers ----------------------------------------------------------------------------
def fake_dom() -> Any:
    return SimpleNamespace(UUIDString=lambda: "5f1c-uuid", name=lambda: "web")


def test_freeze_marker_is_never_written_through_a_planted_link(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(run))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid = os.getpid()
    for tmp_name in (f".frozen-5f1c-uuid.json.{pid}", f".frozen-5f1c-uuid.json.{pid}.tmp"):
        (run / tmp_name).symlink_to(victim)
    with pytest.raises(UnsafePath, match="symlink"):
        quiesce._write_marker(fake_dom())
    assert victim.read_text() == "precious\n"
    for p in run.iterdir():
        p.unlink()
    (run / "frozen-5f1c-uuid.json").symlink_to(victim)
    with pytest.raises(UnsafePath, match="a symlink"):
        quiesce._write_marker(fake_dom())
    assert victim.read_text() == "precious\n"
    (run / "frozen-5f1c-uuid.json").unlink()
    assert quiesce._write_marker(fake_dom()) == run / "frozen-5f1c-uuid.json"
    assert quiesce.read_marker("5f1c-uuid")["pid"] == pid      # type: ignore[index]
    quiesce._write_marker(fake_dom())            # our own marker is replaced


def test_freeze_marker_needs_a_safe_run_dir(monkeypatch, shared_dir: Path):
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(shared_dir))
    with pytest.raises(UnsafePath, match="other users can write to it"):
        quiesce._write_marker(fake_dom())
    assert list(shared_dir.iterdir()) == []


# --- key files ---------------------------------------------------------------------------------
def test_key_file_is_never_made_in_a_directory_others_can_write(monkeypatch, shared_dir: Path):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == "/dev/shm" else real_access(p, m))
    monkeypatch.setattr(tempfile, "tempdir", str(shared_dir))
    with pytest.raises(UnsafePath, match="other users can write to it"):
        with keys.key_file(keys.Key(b"secret", "test")):
            pass
    assert list(shared_dir.iterdir()) == []


def test_key_file_in_a_sticky_dir(monkeypatch, tmp_path: Path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == "/dev/shm" else real_access(p, m))
    monkeypatch.setattr(tempfile, "tempdir", str(sticky))
    with keys.key_file(keys.Key(b"secret", "test")) as k:
        assert k.read_bytes() == b"secret" and stat.S_IMODE(k.parent.stat().st_mode) == 0o700
    assert list(sticky.iterdir()) == []


# --- restore outputs and files get -------------------------------------------------------------
def test_restore_refuses_an_output_dir_others_can_write_before_anything(tmp_path: Path, shared_dir: Path):
    for out in (shared_dir, shared_dir / "new" / "deeper"):
        with pytest.raises(UnsafePath, match="other users can write to it"):
            restore.restore(tmp_path / "no-backup-dir", out)
    assert list(shared_dir.iterdir()) == []


@pytest.mark.parametrize("name, why", [
    ("a/b", "contains '/'"), ("web\n1", "contains a control character"), ("x\x1b[2J", "contains a control character"),
    (".", "names a directory"), ("x" * 248, "is longer than 247 bytes"), ("é" * 124, "is longer than 247 bytes"),
])
def test_restore_define_name_is_checked_before_anything(tmp_path: Path, name: str, why: str):
    with pytest.raises(UsageError, match=f"not a domain name libvirt accepts: it {why}"):
        restore.restore(tmp_path / "no-backup-dir", tmp_path / "out", define=name)
    assert not (tmp_path / "out").exists()
    assert restore.domain_name_problem("web-1 (restored)") is None
    assert restore.domain_name_problem("é" * 123) is None


def test_files_get_refuses_a_dest_others_can_write(tmp_path: Path, shared_dir: Path):
    with pytest.raises(UnsafePath, match="other users can write to it"):
        plan_get(["vda:/etc/hosts"], shared_dir, tmp_path / "b")
    with pytest.raises(UnsafePath, match="other users can write to it"):
        plan_get(["vda:/etc/hosts"], shared_dir / "hosts", tmp_path / "b")
    theirs = tmp_path / "home"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePath, match=f"owned by uid {OTHER_UID}"):
        plan_get(["vda:/etc/hosts"], theirs, tmp_path / "b")
    assert plan_get(["vda:/etc/hosts"], tmp_path, tmp_path / "b")[0][1] == tmp_path / "hosts"


def test_restore_makes_its_output_dirs_exclusively(tmp_path: Path, monkeypatch):
    """A new OUTPUT_DIR under a sticky /tmp: another user may take the name between the check and
    the mkdir; `mkdir -p` would then write into their directory."""
    made = restore._make_output_dir(tmp_path / "a" / "b")
    assert made == [tmp_path / "a", tmp_path / "a" / "b"] and (tmp_path / "a" / "b").is_dir()
    theirs = tmp_path / "taken"
    theirs.mkdir()
    real = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: False if Path(p) == theirs else real(p))
    with pytest.raises(UnsafePath, match="appeared while the restore created it"):
        restore._make_output_dir(theirs / "out")
    assert list(theirs.iterdir()) == []
