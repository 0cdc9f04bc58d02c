"""Run the virtbackup CLI and SIGKILL it at a chosen moment of a prune (fault injection from the
tests, not from production code).

    python -m tests.support.killpoint STEP prune BACKUP_DIR --keep 3

STEP: `image:N` right after the N-th rewritten image is complete, `commit` just before the
metadata commit, `cleanup:N` after N removals that follow the commit. The process kills itself
with a real SIGKILL (no handler, no cleanup can run), exactly as `kill -9` from outside would,
but at a moment a test can name.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import sys
from typing import Any, Callable, Dict


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(step: str) -> None:
    from virtbackup.store import chain, retention

    kind, _, n = step.partition(":")
    count: Dict[str, int] = {"images": 0, "removals": 0}
    committed = {"done": False}

    if kind == "image":
        real_write = retention._write_image

        def write(*args: Any, **kwargs: Any) -> None:
            real_write(*args, **kwargs)
            count["images"] += 1
            if count["images"] == int(n):
                _die()
        retention._write_image = write

    real_save = chain.BackupDir.save

    def save(self: Any, c: Any) -> None:
        if kind == "commit":
            _die()
        real_save(self, c)
        committed["done"] = True
    chain.BackupDir.save = save   # type: ignore[method-assign,assignment]

    if kind == "cleanup":
        def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                result = fn(*args, **kwargs)
                if committed["done"]:
                    count["removals"] += 1
                    if count["removals"] == int(n):
                        _die()
                return result
            return wrapper
        shutil.rmtree = counted(shutil.rmtree)   # type: ignore[assignment]
        pathlib.Path.unlink = counted(pathlib.Path.unlink)   # type: ignore[method-assign]


if __name__ == "__main__":
    arm(sys.argv[1])
    from virtbackup.cli import main
    sys.argv = ["virtbackup", *sys.argv[2:]]
    main()
