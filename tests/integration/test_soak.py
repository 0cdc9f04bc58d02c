"""A short run of the seeded soak (scripts/soak.py) as part of the suite: a fixed seed, so a
failure here reproduces with `scripts/soak.py --seed 20261130 --steps 24`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short work dir: the soak's run dir holds pull jobs' NBD sockets, whose paths must fit a
    unix socket's 107 bytes (pytest's tmp_path is too deep for that)."""
    d = Path(tempfile.mkdtemp(prefix="vbsk-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_short_soak_has_no_violation(short_dir):
    tmp_path = short_dir
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--steps", "24", "--seed", "20261130",
                           "--json", "--quiet", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and not summary["violations"], (summary, proc.stderr[-2000:])
    assert summary["steps"] == 24 and summary["faults"], summary
    assert summary["points_restored_and_compared"] > 0
    assert summary["wrong_restores_exit0"] == 0 and summary["orphans"] == 0 and summary["writes_outside"] == 0
    assert not list(tmp_path.iterdir()), "the soak must remove its work dir"
