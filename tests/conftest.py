"""Shared fixtures. Integration tests need a running libvirtd (scripts/setup-host.sh starts one)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent


class CLIResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc = proc
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> dict:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"<rc={self.rc} out={self.out!r} err={self.err!r}>"


def cli(*args: object, timeout: float = 300, cwd: Optional[Path] = None) -> CLIResult:
    """Run the real command line, as a user would."""
    cmd = [sys.executable, "-m", "virtbackup.cli", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return CLIResult(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env))


def take_backup(dom_name: str, bdir: Path, level: str = "auto") -> dict:
    """`virtbackup backup --json` that must succeed; its JSON result."""
    r = cli("backup", dom_name, bdir, "--level", level, "--json")
    assert r.rc == 0, r
    return r.json()


@pytest.fixture
def conn():
    """A connection per test: one test restarting libvirtd must not break the next."""
    from virtbackup import host
    c = host.connect()
    yield c
    try:
        c.close()
    except Exception:
        pass


@pytest.fixture
def make_domain(conn, tmp_path) -> Iterator[Callable[..., "object"]]:
    """Factory for scratch domains (no OS); every one is destroyed, undefined and deleted after."""
    from virtbackup import scratch
    made: List[scratch.ScratchDomain] = []

    def make(disks: Optional[Dict[str, int]] = None, start: bool = True, name: Optional[str] = None):
        dom_name = name or f"vbtest-{secrets.token_hex(3)}"
        d = scratch.ScratchDomain(conn, dom_name, tmp_path / "disks", disks)
        made.append(d)
        return d.create(start=start)

    yield make
    # a fresh connection: a test may have restarted libvirtd, which kills the session's one
    from virtbackup import host
    fresh = host.connect()
    try:
        for d in made:
            d.conn = fresh
            d.remove()
    finally:
        fresh.close()


def assert_point_restores(bdir: Path, point: str, expected: Dict[str, bytes], out: Path) -> None:
    """Restore `point` through the CLI and compare every disk byte for byte with what the guest saw."""
    from virtbackup import scratch
    r = cli("restore", bdir, out, "--point", point)
    assert r.rc == 0, r
    for disk, want in expected.items():
        img = out / f"{disk}.qcow2"
        assert scratch.backing_chain(img) == [str(img)], "restored image must be standalone"
        got = scratch.read_raw(img)
        diff = scratch.first_difference(got, want)
        assert diff is None, f"point {point} disk {disk}: first difference at byte {diff}"


def our_bitmaps(dom, prefix: str) -> Dict[str, List[str]]:
    from virtbackup import host, monitor
    disks = host.domain_disks(dom.XMLDesc(0))
    return {t: [b.name for b in bms if b.name.startswith(prefix)]
            for t, bms in monitor.disk_bitmaps(dom, disks).items()}


def checkpoint_names(dom) -> List[str]:
    return sorted(cp.getName() for cp in dom.listAllCheckpoints(0))


def snapshot_dir(path: Path) -> Dict[str, bytes]:
    """Every file under path with its content (to prove a failed run changed nothing)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".virtbackup.lock"}
