"""store.chain.replace_file: the one atomic writer of the chain metadata and the metrics file."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from virtbackup.errors import OperationFailed, UnsafePath
from virtbackup.store import metrics
from virtbackup.store.chain import replace_file


def test_replaces_atomically_with_its_mode_whatever_the_umask(tmp_path: Path):
    target = tmp_path / "m.prom"
    target.write_text("old\n")
    old = os.umask(0o077)
    try:
        replace_file(target, b"new\n", 0o644, "metrics file")
    finally:
        os.umask(old)
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_a_link_planted_at_the_temp_name_is_not_followed(tmp_path: Path):
    """The metrics file's temp name is predictable (its pid): a symlink there used to make root
    write through it and chmod the victim 0644."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    target = tmp_path / "m.prom"
    (tmp_path / f".m.prom.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(UnsafePath, match="symlink"):
        metrics.write(target, SimpleNamespace(job="nightly", interrupted=None, started_ts=0.0,  # type: ignore
                                              finished_ts=1.0, domains=[], ok=True))
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not target.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path):
    d = tmp_path / "d"
    d.mkdir()
    target = d / "virtbackup.json"
    target.write_text("{}\n")
    os.chmod(d, 0o500)
    try:
        if os.access(d, os.W_OK):            # root ignores the mode: make the rename fail instead
            os.chmod(d, 0o700)
            (d / f".virtbackup.json.{os.getpid()}.tmp").mkdir()
        with pytest.raises((OperationFailed, UnsafePath)):
            replace_file(target, b"x", 0o600, "chain metadata")
    finally:
        os.chmod(d, 0o700)
    assert target.read_text() == "{}\n"
