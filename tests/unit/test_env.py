"""env.py: programs, the run directory, and temp dirs a later run cleans up after a killed one
(hostile pass D7: a SIGKILLed encrypted offline backup left the key in /dev/shm; D10: a SIGKILLed
drill left /tmp/virtbackup-drill-*; both are removed by the next run now)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from virtbackup import env
from virtbackup.qemu import keys


def killed_leftover(prefix: str, base: Path) -> Path:
    """A temp dir made by a process that was then SIGKILLed (it could not clean up)."""
    code = ("import os, signal, sys; from virtbackup import env; "
            f"d = env.owned_tempdir({prefix!r}, {str(base)!r}); (d / 'key').write_bytes(b'secret'); "
            "print(d, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r
    left = Path(r.stdout.strip())
    assert (left / "key").exists()
    return left


def test_a_killed_runs_tempdir_is_removed_and_a_live_ones_kept(tmp_path: Path):
    dead = killed_leftover("virtbackup-drill-", tmp_path)
    live = env.owned_tempdir("virtbackup-drill-", str(tmp_path))
    other = tmp_path / "virtbackup-drill-notours"
    other.mkdir()
    link = tmp_path / "virtbackup-drill-1-2-x"
    link.symlink_to(other)
    assert env.remove_dead_tempdirs("virtbackup-drill-", str(tmp_path)) == [dead]
    assert not dead.exists() and live.is_dir() and other.is_dir() and link.is_symlink()
    assert oct(live.stat().st_mode & 0o777) == "0o700"


def test_the_next_key_file_removes_a_killed_runs_key(tmp_path: Path):
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    dead = killed_leftover(keys.KEY_DIR_PREFIX, base)
    with keys.key_file(keys.Key(b"k", "test")) as path:
        assert path.read_bytes() == b"k" and path.parent.parent == base
        assert not dead.exists()
    assert not path.parent.exists()


def test_programs_and_run_dir_follow_the_environment(monkeypatch):
    monkeypatch.delenv("VIRTBACKUP_QEMU_IMG", raising=False)
    assert env.program("qemu-img") == "qemu-img"
    monkeypatch.setenv("VIRTBACKUP_QEMU_IMG", "/opt/q/qemu-img")
    assert env.program("qemu-img") == "/opt/q/qemu-img"
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", "/tmp/r")
    assert env.run_dir() == Path("/tmp/r")
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", "")
    assert env.run_dir() == Path("/run/virtbackup")
