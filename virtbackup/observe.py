"""Progress reports from the core to whoever displays them (the CLI's progress bars).

The core calls `report()` at natural steps (qemu-img's own progress while converting, each
image verified); nothing listens unless the CLI runs on a terminal, and then `report()` is one
function call. Kept apart from `progress.py` so the core never imports rich.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

# (what, done, total): e.g. ("vda.qcow2", 37.5, 100.0) or ("verify", 3, 8)
Observer = Callable[[str, float, float], None]

_lock = threading.Lock()
_observer: Optional[Observer] = None


def active() -> bool:
    return _observer is not None


def report(what: str, done: float, total: float) -> None:
    obs = _observer
    if obs is not None:
        obs(what, done, total)


@contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Send this process's reports to `observer` while inside (one observer at a time)."""
    global _observer
    with _lock:
        previous, _observer = _observer, observer
    try:
        yield
    finally:
        with _lock:
            _observer = previous
