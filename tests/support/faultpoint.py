"""Run the virtbackup CLI and SIGKILL or SIGSTOP it at a named moment of a restore or a prune
(fault injection from the tests, not from production code).

    python -m tests.support.faultpoint kill restore-placed:1 restore BACKUP_DIR OUT
    python -m tests.support.faultpoint stop prune-locked prune BACKUP_DIR --keep 3

`restore-placed:N`: right after the N-th restored disk got its name (the run holds the backup
dir's shared lock and has a half restore on disk). `prune-locked`: once prune holds the exclusive
lock and has checked its sources, before it changes anything. `define`: right after libvirt
defined a restored domain (restore --define, --live). `stop` lets a test run other
commands against a process holding its lock, then SIGCONT it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict


def arm(action: str, step: str) -> None:
    from virtbackup import restore
    from virtbackup.store import retention

    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    where, _, n = step.partition(":")
    count: Dict[str, int] = {"placed": 0}

    def hit() -> None:
        os.kill(os.getpid(), sig)

    if where == "restore-placed":
        real_place = restore._place

        def place(*args: Any, **kwargs: Any) -> None:
            real_place(*args, **kwargs)
            count["placed"] += 1
            if count["placed"] == int(n):
                hit()
        restore._place = place
    elif where == "prune-locked":
        real_check = retention.check_sources

        def check(*args: Any, **kwargs: Any) -> None:
            real_check(*args, **kwargs)
            hit()
        retention.check_sources = check
    elif where == "define":
        # right after libvirt defined the restored domain (restore --define, --live)
        from virtbackup.virt import host
        real_define = host.define

        def define(*args: Any, **kwargs: Any) -> Any:
            d = real_define(*args, **kwargs)
            hit()
            return d
        host.define = define
    else:
        raise SystemExit(f"unknown fault point {step}")


if __name__ == "__main__":
    arm(sys.argv[1], sys.argv[2])
    from virtbackup.cli import main
    sys.argv = ["virtbackup", *sys.argv[3:]]
    main()
