"""Shared fixtures. Integration tests need a running libvirtd (scripts/setup-host.sh starts one)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """A run started as a background job of a non-interactive shell (`sh -c 'pytest ... &'`)
    inherits SIGINT ignored, and so would every CLI the tests start: Python then never raises
    KeyboardInterrupt and the Ctrl-C tests fail for the wrong reason (seen here). Give this
    process Python's own handler: a handler is reset to the default across exec, so the children
    start as from a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Everything under tests/integration needs libvirtd and QEMU: mark it (`-m "not integration"`
    runs the unit tests alone)."""
    for item in items:
        if Path(str(item.fspath)).parts[-2] == "integration":
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def conn():
    """A connection per test: one test restarting libvirtd must not break the next."""
    from virtbackup.virt import host
    c = host.connect()
    yield c
    try:
        c.close()
    except Exception:  # noqa: BLE001 - a test may have restarted libvirtd: the connection is gone
        pass


@pytest.fixture
def make_domain(conn, tmp_path) -> Iterator[Callable[..., "object"]]:
    """Factory for scratch domains (no OS); every one is destroyed, undefined and deleted after."""
    from tests.support import scratch
    made: List[scratch.ScratchDomain] = []

    def make(disks: Optional[Dict[str, int]] = None, start: bool = True, name: Optional[str] = None):
        dom_name = name or f"vbtest-{secrets.token_hex(3)}"
        d = scratch.ScratchDomain(conn, dom_name, tmp_path / "disks", disks)
        made.append(d)
        return d.create(start=start)

    yield make
    # a fresh connection: a test may have restarted libvirtd, which kills the session's one
    from virtbackup.virt import host
    fresh = host.connect()
    try:
        for d in made:
            d.conn = fresh
            d.remove()
    finally:
        fresh.close()


@pytest.fixture
def restored_domains() -> Iterator[List[str]]:
    """Names of domains a test defines (restore --define); destroyed and undefined afterwards,
    also when it failed, over a fresh connection (a test may have restarted libvirtd)."""
    from tests.support import scratch
    from virtbackup.virt import host
    names: List[str] = []
    yield names
    conn = host.connect()
    try:
        for n in names:
            scratch.remove_domain(conn, n)
    finally:
        conn.close()


@pytest.fixture
def procs() -> Iterator[List[subprocess.Popen]]:
    """Background CLI runs of a test; any still alive at the end is resumed (a test may have
    stopped it) and killed, by pid."""
    started: List[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.kill()
            p.wait()
