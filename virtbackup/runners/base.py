"""The job-runner interface: how one planned backup's copy runs.

The engine (backup.py) plans, pre-creates the targets, commits or rolls back and retires old
checkpoints; a runner only runs the copy for a `BackupPlan`. Runners today: `push.PushRunner`
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
- `interrupt(reason)` is called when the operation is cancelled while start/wait run (the
  engine registers it with the operation's `observe.Cancel`: another thread's `cancel()`, or
  SIGINT/SIGTERM in the main thread, reason "SIGINT"): note it, wake the wait, and let `wait`
  raise `Interrupted` after stopping the job. It may run in any thread (or a signal handler).
- While the copy runs a runner reports it as `observe` "copy" events per disk, when someone
  listens (`observe.listening()`), and finishes each disk's copy when it is complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol

import libvirt
from lxml import etree

from virtbackup import observe
from virtbackup.errors import BackupFailed
from virtbackup.runners.plan import BackupPlan, Transport
from virtbackup.store.chain import PARTIAL_SUFFIX
from virtbackup.virt import host

log = logging.getLogger(__name__)

Notify = Callable[[str], None]


class Runner(Protocol):
    transport: Transport
    nbd_tls: Optional[bool]         # the point's record of it (chain.Point.nbd_tls): pull over TCP only
    interrupted: Optional[str]      # the reason noted by interrupt() (a signal name, "cancelled"), if any
    warnings: List[str]             # said during the run; reported with the result
    transfer: Dict[str, Dict[str, Any]]   # per disk, how the copy went (pull: bytes read, written, zeroed; seconds)

    def preflight(self) -> None:
        """Refuse (raise) before anything changes when the copy cannot run now."""

    def start(self, plan: BackupPlan) -> None:
        """Begin the copy for `plan` (targets exist, empty, as the plan says)."""

    def wait(self) -> None:
        """Block until the copy ended; raise unless every target is complete."""

    def abort(self) -> bool:
        """Stop the copy; False when a job may still write into the targets."""

    def interrupt(self, signal_name: str) -> None:
        """Note a cancel (any thread) or a SIGINT/SIGTERM (the signal handler): wake the wait."""


def received(reason: str) -> str:
    """'SIGINT received' for a signal, 'cancelled' for a cancel (notices while stopping)."""
    return f"{reason} received" if reason.startswith("SIG") else observe.interruption(reason)


# --- libvirt backup jobs: what the push and pull runners share ------------------------------------
def job_gone(dom: libvirt.virDomain) -> bool:
    """No job runs on the domain any more (or the domain stopped)."""
    try:
        if not dom.isActive():
            return True
        return bool(dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False   # daemon unreachable for now; keep waiting for its answer


def job_writes_into(dom: libvirt.virDomain, points_dir: Path, prefix: Optional[str] = None) -> bool:
    """True when the domain's running backup job is one of ours: a push job writing into
    points_dir/*.partial, or (given the chain's checkpoint `prefix`) a pull job whose scratch
    files carry one of the chain's checkpoint names (pull.scratch_path)."""
    try:
        if job_gone(dom):
            return False
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False
    root = etree.fromstring(xml.encode())
    if root.get("mode") == "pull":
        return bool(prefix) and any(str(prefix) in Path(s.get("file") or "").name
                                    for s in root.iterfind("./disks/disk/scratch"))
    dirs = [Path(t.get("file") or "/").parent for t in root.iterfind("./disks/disk/target")]
    return any(d.parent == points_dir and d.name.endswith(PARTIAL_SUFFIX) for d in dirs)


def checkpoint_prefix(checkpoint: str) -> str:
    """The chain's checkpoint prefix (`virtbackup-<dir id>-`) of one of its checkpoint names."""
    return checkpoint[:len(checkpoint) - len(checkpoint.rsplit("-", 1)[-1])]


def abort_job(conn: libvirt.virConnect, dom: libvirt.virDomain, timeout: float = 60.0,
              watch: Optional[host.JobWatch] = None) -> bool:
    """Abort the domain's job and wait (bounded) until libvirt has ended it; False on timeout.

    `watch`: the caller's open JobWatch (a connection takes one close callback only)."""
    own = watch is None
    w = host.JobWatch(conn, dom) if watch is None else watch
    try:
        w.done.clear()
        log.debug("libvirt abortJob(%s)", dom.name())
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass
        return w.wait(lambda: job_gone(dom), check_every=0.5, timeout=timeout)
    finally:
        if own:
            w.close()


def completed_stats(dom: libvirt.virDomain, watch: host.JobWatch) -> Dict[str, Any]:
    """The ended job's statistics (libvirt keeps them for the last job); the watch's event
    parameters when libvirt has none (a job that ended before we asked)."""
    try:
        stats: Dict[str, Any] = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        stats = {}
    if not stats or stats.get("type") in (None, libvirt.VIR_DOMAIN_JOB_NONE):
        stats = dict(watch.params)
    return stats


def operation_name(op: Optional[int]) -> str:
    """libvirt's job operation number as words ('backup', 'migration in', ...)."""
    names = {getattr(libvirt, n): n[25:].lower().replace("_", " ")
             for n in dir(libvirt) if n.startswith("VIR_DOMAIN_JOB_OPERATION_")}
    return names.get(op, "unknown") if op is not None else "unknown"


def clear_leftover_job(conn: libvirt.virConnect, dom: libvirt.virDomain, points_dir: Path,
                       prefix: Optional[str], notify: Notify) -> None:
    """Before a job of ours starts: a backup job a killed run of this directory left (it writes
    into `points_dir`, or its checkpoints have `prefix`) is aborted, since nobody will read what
    it writes and it blocks ours; any other job (another tool's, a migration) refuses the run,
    untouched. Both push and pull jobs say it alike."""
    if job_gone(dom):
        return
    if job_writes_into(dom, points_dir, prefix):
        notify("aborting the backup job left by an interrupted run")
        if not abort_job(conn, dom):
            raise BackupFailed("the backup job left by an interrupted run did not end within 60 s")
        return
    try:
        op = dom.jobStats().get("operation")
    except libvirt.libvirtError:
        op = None
    raise BackupFailed(f"another job ({operation_name(op)}) is running on domain "
                       f"'{dom.name()}'; try again when it has ended")
