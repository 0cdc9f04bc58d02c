"""The job-runner interface: how one planned backup's copy runs.

The engine (backup.py) plans, pre-creates the targets, commits or rolls back and retires old
checkpoints; a runner only runs the copy for a `BackupPlan`. Runners today: `pushjob.PushRunner`
(libvirt push job, running domains), `pull.PullRunner` (libvirt pull job: its NBD export read
with libnbd, `--mode pull`) and `offline.OfflineRunner` (a private QEMU, shut-off domains).

The contract:
- `preflight()` runs before anything changes (leftover cleanup, planning) and refuses what
  this runner cannot do now (e.g. an image open elsewhere).
- `start(plan)` fixes the point in time: after it returns, the plan's checkpoint covers every
  write from now on, and the copy runs.
- `wait()` returns once every target is complete, flushed and closed and the plan's checkpoint
  (with its bitmaps on every disk) is known to libvirt; it raises `BackupFailed`,
  `Interrupted` or `LevelNotPossible` (the base bitmap proved unusable: auto then retries as a
  full) otherwise.
- `abort()` ends whatever `start` began, bounded; it returns False when a job may still write
  into the targets (the engine then keeps the checkpoint for the next run to remove). It never
  raises and may be called more than once, also before `start`.
- `interrupt(signal_name)` is called from the signal handler while start/wait run: note it,
  wake the wait, and let `wait` raise `Interrupted` after stopping the job.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Protocol

from .plan import BackupPlan, Transport

Notify = Callable[[str], None]


class Runner(Protocol):
    transport: Transport
    interrupted: Optional[str]      # the signal noted by interrupt(), if any
    warnings: List[str]             # said during the run; reported with the result

    def preflight(self) -> None:
        """Refuse (raise) before anything changes when the copy cannot run now."""

    def start(self, plan: BackupPlan) -> None:
        """Begin the copy for `plan` (targets exist, empty, as the plan says)."""

    def wait(self) -> None:
        """Block until the copy ended; raise unless every target is complete."""

    def abort(self) -> bool:
        """Stop the copy; False when a job may still write into the targets."""

    def interrupt(self, signal_name: str) -> None:
        """Note a SIGINT/SIGTERM (called from the signal handler)."""
