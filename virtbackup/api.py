"""The public Python API (what the CLI and management stacks call).

Every public function raises only `virtbackup.errors.VirtBackupError` subclasses: libvirt and OS
errors that get this far are wrapped here, at the boundary (`HostError`, exit 1), with the
original kept as `__cause__`. The error's `exit_code` and one-line message are what the CLI
prints. Every result object has a `to_json()` giving the `--json` output of its command.

Logging: modules log to `logging.getLogger("virtbackup.<module>")`; DEBUG shows every argv,
QMP command and libvirt call (with its XML) and timings. Backup and prune also leave a run log
in BACKUP_DIR/logs/ (see runlog.py).

Embedding (a host agent running operations in its own worker threads): every long operation
takes two keyword arguments, both per call, never process-wide, so operations in different
threads of one process never see each other's:
- `cancel`: an `observe.Cancel`; `cancel.cancel()` from any thread stops the operation the way
  SIGINT does the CLI's (a backup's job is aborted and rolled back, nothing is recorded) and
  it raises `errors.Interrupted` (exit code 1). In the main thread SIGINT/SIGTERM still work
  as before: where an operation takes them (a backup's job, a live restore's pulls) they
  cancel it with the signal's name as the reason.
- `progress`: called with an `observe.ProgressEvent` (operation, phase, disk, done, total,
  unit, domain) from the operation's threads, one call at a time, a few a second per disk:
  per disk and phase `total` stays the same, `done` never goes down and the last event of a
  phase that ended well has done == total. Keep it short; if it raises, the events stop and the
  operation goes on.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar, Union, cast

from virtbackup.errors import HostError, Interrupted, OperationFailed, VirtBackupError
from virtbackup.qemu.keys import Key

# Only what `list` needs is imported here: every operation imports its module (and libvirt,
# lxml, tenacity, libguestfs) when it is called, so a command pays only for what it runs
# (`list` does not load libvirt at all). The result types are importable from here as before,
# loaded on first access (see __getattr__ at the end).
from virtbackup.store.chain import (
    BackupDir,
    Chain,
    Point,
    data_ratio,
    dir_lock,
    domain_lock,
    point_json,
    user_path,
)
from virtbackup.store.crypto import ChainEncryption

if TYPE_CHECKING:
    import libvirt

    from virtbackup.backup import BackupResult
    from virtbackup.drill import DrillResult
    from virtbackup.files import FilesystemList, GetResult, ListResult, PointFiles, Status
    from virtbackup.health import RepairReport, StatusReport
    from virtbackup.jobs import Job, JobPlan, RunResult, Watcher
    from virtbackup.liverestore import LiveResult
    from virtbackup.observe import Cancel, Progress, ProgressEvent
    from virtbackup.offsite import PullResult as OffsitePull
    from virtbackup.offsite import PushResult as OffsitePush
    from virtbackup.offsite import RemoteList as OffsiteList
    from virtbackup.offsite import RemotePrune as OffsitePrune
    from virtbackup.offsite import RemoteVerify as OffsiteVerify
    from virtbackup.options import RequestedLevel
    from virtbackup.restore import FlattenResult, RestoreResult
    from virtbackup.runners.base import Notify
    from virtbackup.store.retention import PruneResult
    from virtbackup.store.verify import VerifyResult
    from virtbackup.virt.quiesce import ThawResult

# Paths as the caller has them: str or any os.PathLike (an empty string is a usage error, not ".")
PathArg = Union[str, "os.PathLike[str]"]

__all__ = [
    # operations
    "backup", "list_points", "restore", "verify", "prune", "flatten",
    "status", "repair", "load_job", "run_job", "plan_job", "thaw", "drill", "live_restore", "resume_live",
    "files_filesystems", "files_ls", "files_get", "files_cat", "open_point_files",
    "offsite_push", "offsite_pull", "offsite_list", "offsite_verify", "offsite_prune",
    # results and helpers
    "BackupResult", "PointList", "RestoreResult", "VerifyResult", "PruneResult", "FlattenResult", "LiveResult",
    "StatusReport", "RepairReport", "ThawResult", "DrillResult", "Notify", "RequestedLevel", "point_json", "chain_json",
    "FilesystemList", "ListResult", "GetResult", "PointFiles",
    "OffsitePush", "OffsitePull", "OffsiteList", "OffsiteVerify", "OffsitePrune",
    # encrypted backups
    "read_key", "Key",
    # embedding: cancellation and progress events
    "Cancel", "ProgressEvent", "Progress",
]

F = TypeVar("F", bound=Callable[..., Any])


def _boundary(fn: F) -> F:
    """Turn what escaped from libvirt or the OS into VirtBackupError (cause kept)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VirtBackupError:
            raise
        except KeyboardInterrupt as e:
            obs = sys.modules.get("virtbackup.observe")    # not imported: nothing was cancelled
            if obs is not None and isinstance(e, obs.Cancelled):   # a cancellation point after cancel()
                raise Interrupted(str(e)) from None
            raise
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            raise OperationFailed(f"{e.strerror or e}{':' if where else ''}{where}") from e
        except Exception as e:
            lv = sys.modules.get("libvirt")     # not imported: no libvirtError can have been raised
            if lv is not None and isinstance(e, lv.libvirtError):
                from virtbackup.virt import host
                raise HostError(f"libvirt: {host.libvirt_message(e)}") from e
            raise
    return cast(F, wrapper)


@contextmanager
def _operation(name: str, cancel: Optional[Cancel], progress: Optional[Progress],
               domain: Optional[str] = None) -> Iterator[None]:
    """The operation's own progress callback and cancel handle (observe.scope), for this call
    and the threads it starts; a handle cancelled before the start stops it at once."""
    from virtbackup import observe
    with observe.scope(name, progress, cancel, domain):
        observe.check()
        yield


@dataclass
class PointList:
    """The restore points of a backup directory, oldest first (`list`)."""

    domain: str
    uuid: str
    points: List[Point]
    encryption: Optional[ChainEncryption] = None

    def to_json(self) -> Dict[str, Any]:
        """{"domain", "uuid", "encryption": null | {"format", "cipher", "iter_time_ms"},
        "points": [{"id", "level", "created", "checkpoint", "parent", "disks": {...}, ...,
        "encryption", "compression", "size"}], "stored_bytes", "compression_ratio"} (the `list
        --json` output; never the key check value)."""
        enc = self.encryption
        return {"domain": self.domain, "uuid": self.uuid,
                "encryption": ({"format": enc.format, "cipher": enc.cipher, "iter_time_ms": enc.iter_time_ms}
                               if enc is not None else None),
                "points": [point_json(p) for p in self.points],
                "stored_bytes": self.stored_bytes, "compression_ratio": self.compression_ratio}

    @property
    def stored_bytes(self) -> int:
        return sum(i.size for p in self.points for i in p.disks.values())

    @property
    def compression_ratio(self) -> Optional[float]:
        """Guest data per stored byte (chain.data_ratio) over every recorded image."""
        return data_ratio([i for p in self.points for i in p.disks.values()])


def chain_json(chain: Chain) -> Dict[str, Any]:
    """A chain as `list --json` prints it."""
    return PointList(chain.domain_name, chain.domain_uuid, chain.points, chain.encryption).to_json()


@_boundary
def read_key(spec: str) -> Key:
    """The passphrase of an encrypted backup from a key file (`-`: stdin, never a terminal);
    UsageError (exit 2) for a symlink, a file others can read, empty or binary content."""
    from virtbackup.store.crypto import read_key as _read_key
    return _read_key(spec)


@_boundary
def backup(domain: str, backup_dir: PathArg, level: str = "auto", disks: Sequence[str] = (),
           uri: Optional[str] = None, notify: Optional[Notify] = None,
           reason: Optional[str] = None, quiesce: str = "auto", mode: Optional[str] = None,
           scratch_dir: Optional[str] = None, max_speed: Optional[int] = None, encrypt: bool = False,
           key: Optional[Key] = None, *, cancel: Optional[Cancel] = None,
           progress: Optional[Progress] = None, nbd_tls_dir: Optional[str] = None,
           insecure_nbd: bool = False, compress: Optional[str] = None) -> BackupResult:
    """Take one backup of DOMAIN (name or UUID; running or shut off) into BACKUP_DIR.

    `level`: auto | full | inc | diff (see plan.plan_backup); `disks`: only these targets;
    `notify` receives the notices the CLI prints on stderr; `reason`: why the caller chose this
    level (e.g. a job's max_chain), recorded with the point. `quiesce`: auto (freeze the guest's
    filesystems through its agent when it has an agent channel, else crash-consistent),
    require (fail, nothing recorded, when the guest can't be frozen), off (see quiesce.py).
    `mode`: auto | push | pull (None: auto, pull unless a local domain's pull cannot run here,
    then push: see backup.Engine.fallback; the result's transport_reason says which and why); `scratch_dir`:
    where a pull backup's scratch files go on the hypervisor (default: beside each disk image).
    `max_speed`: bytes/s per disk (push and offline: QEMU's copy job; pull: our NBD reads).
    `encrypt` with `key` starts an encrypted chain (LUKS qcow2); every later point of an
    encrypted directory needs that `key` (every mode: push, pull, offline).
    A pull from a remote URI reads NBD over TLS with the client certificate in `nbd_tls_dir`
    (default $VIRTBACKUP_NBD_TLS_DIR, else /etc/pki/virtbackup: ca-cert.pem, client-cert.pem,
    client-key.pem); `insecure_nbd`: plaintext instead (warned about, recorded as nbd_tls false).
    `compress`: zstd | zlib | none, how the images store the data (qcow2 compressed clusters);
    None: the chain's setting (a new unencrypted directory: options.DEFAULT_COMPRESSION). Another
    setting than the chain's starts a new chain (auto takes a full; inc/diff are refused).
    `cancel`: stops the backup from any thread while it runs: its job is aborted, its checkpoint
    deleted, its partial images removed, nothing is recorded (raises Interrupted); during the
    metadata commit a cancel is only noted (the point is complete, a warning says so).
    `progress`: events "copy" (per disk, of its virtual size, while the job runs), "hash" (per
    disk, the image sealed) and "commit" (see the module doc).
    """
    from virtbackup.backup import backup as _backup
    with _operation("backup", cancel, progress, domain):
        return _backup(uri, domain, user_path(backup_dir, "BACKUP_DIR"), level, disks, notify, reason, quiesce,
                       mode, scratch_dir, max_speed, encrypt=encrypt, key=key, nbd_tls_dir=nbd_tls_dir,
                       insecure_nbd=insecure_nbd, compress=compress)


@_boundary
def list_points(backup_dir: PathArg) -> PointList:
    """The restore points recorded in BACKUP_DIR."""
    chain = BackupDir(user_path(backup_dir, "BACKUP_DIR")).load()
    return PointList(chain.domain_name, chain.domain_uuid, chain.points, chain.encryption)


@_boundary
def restore(backup_dir: PathArg, output_dir: PathArg, point: Optional[str] = None, disks: Sequence[str] = (),
            instant: bool = False, define: Optional[str] = None, start: bool = False,
            uri: Optional[str] = None, salvage: bool = False, key: Optional[Key] = None,
            encrypt: bool = False, *, cancel: Optional[Cancel] = None,
            progress: Optional[Progress] = None) -> RestoreResult:
    """Restore a point as standalone OUTPUT_DIR/<disk>.qcow2; or `instant` (overlays on the backup
    images, no copy); `define` NAME: a new domain on the restored disks (new UUID and MACs), `start` it.

    `point` is an id, `latest`, or an ISO 8601 time (the newest point at or before it).
    `salvage`: when images are damaged, restore the disks whose images are intact (the result's
    `missing` says which are not) instead of refusing.
    An encrypted backup needs its `key`; the images come out decrypted unless `encrypt`
    (LUKS, same key). `instant`, and `define` with `encrypt`, are refused for encrypted backups
    (the domain would need the key stored in libvirt).
    `cancel`: stops the copies (qemu-img is ended; nothing is placed, no domain defined; raises
    Interrupted). `progress`: a "copy" event stream per disk (qemu-img's own progress, in bytes
    of the disk's virtual size); none for `instant`.
    """
    from virtbackup.restore import restore as _restore
    with _operation("restore", cancel, progress):
        return _restore(user_path(backup_dir, "BACKUP_DIR"), user_path(output_dir, "OUTPUT_DIR"), point, disks,
                        instant=instant, define=define, start=start, uri=uri, salvage=salvage, key=key,
                        encrypt=encrypt)


@_boundary
def verify(backup_dir: PathArg, point: Optional[str] = None, deep: bool = False,
           key: Optional[Key] = None, *, cancel: Optional[Cancel] = None,
           progress: Optional[Progress] = None) -> VerifyResult:
    """Check every image (or one point's chain): qemu-img check, backing links, hashes; `deep` also
    reads every point's whole chain through qemu. Damage is reported in the result (`ok`, `damage`),
    not raised. `key`: of an encrypted backup. `cancel`: stops it after the image (or chain)
    being checked (raises Interrupted). `progress`: "verify" events (images checked of all,
    unit images) and with `deep` "read" events (chains read, unit chains)."""
    from virtbackup.store.verify import verify as _verify
    with _operation("verify", cancel, progress):
        return _verify(user_path(backup_dir, "BACKUP_DIR"), point, deep=deep, key=key)


@_boundary
def prune(backup_dir: PathArg, keep: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
          dry_run: bool = False, keep_monthly: int = 0, key: Optional[Key] = None, *,
          cancel: Optional[Cancel] = None, progress: Optional[Progress] = None) -> PruneResult:
    """Drop the points the policy does not keep, merging them into kept points that depend on them.
    An encrypted backup needs its `key` (unless `dry_run`); rewritten images stay encrypted.
    `cancel`: a prune is crash-safe but not cut short: a cancel before it starts stops it
    (Interrupted), one while it merges lets it finish. `progress`: no events yet (accepted so
    every long operation takes the same arguments)."""
    from virtbackup.liverestore import domains_using
    from virtbackup.store.retention import Policy
    from virtbackup.store.retention import prune as _prune
    with _operation("prune", cancel, progress):
        path = user_path(backup_dir, "BACKUP_DIR")
        # what a defined domain is layered on (an unfinished instant or live restore) stays
        users, warning = domains_using(path) if path.is_dir() else ({}, None)
        result = _prune(path, Policy(keep, keep_daily, keep_weekly, keep_monthly), dry_run, key, users)
        if warning:
            result.warnings.append(warning)
        return result


@_boundary
def flatten(image: PathArg) -> FlattenResult:
    """Copy an overlay's backing data into it and drop the backing link (e.g. after --instant)."""
    from virtbackup.restore import flatten as _flatten
    return _flatten(user_path(image, "IMAGE"))


@_boundary
def status(domain: str, uri: Optional[str] = None) -> StatusReport:
    """Each disk's bitmaps (flags, dirty bytes, owner) and every checkpoint of DOMAIN."""
    from virtbackup import health
    from virtbackup.virt import host
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, domain)
        _refuse_remote_inactive(uri, dom, "status")
        return health.status(dom)


@_boundary
def repair(domain: str, backup_dir: PathArg, dry_run: bool = False, uri: Optional[str] = None) -> RepairReport:
    """Make this backup dir's libvirt state clean (only its own checkpoints and bitmaps):
    delete unneeded or broken checkpoints, remove orphaned bitmaps, redefine lost checkpoints.
    Failed actions are reported in the result (`ok`, `failure`), not raised."""
    from virtbackup import health
    from virtbackup.health import RepairReport
    from virtbackup.virt import host
    from virtbackup.virt.domain import LibvirtDomain
    bdir = BackupDir(user_path(backup_dir, "BACKUP_DIR"))
    chain = bdir.load()
    with host.connection(uri) as conn:
        dom = host.lookup_domain(conn, domain)
        bdir.check_owner(chain, dom.name(), dom.UUIDString())
        _refuse_remote_inactive(uri, dom, "repair")
        report = RepairReport(dom.name(), dry_run=dry_run)
        with domain_lock(dom.UUIDString()), dir_lock(bdir):   # same order as backup
            report.actions = health.plan_repair(LibvirtDomain(dom), chain, bdir=bdir)
            if not dry_run:
                health.apply_repair(dom, bdir, chain, report.actions)
        return report


# --- whole-host jobs (virtbackup/jobs.py) -------------------------------------------------------
@_boundary
def load_job(job_file: PathArg) -> "Job":
    """Read and validate a job file (TOML); `jobs.JobFileError` (exit 2) names file, line and key."""
    from virtbackup.jobs import load_job as _load
    return _load(Path(job_file))


@_boundary
def run_job(job: "Job", uri: Optional[str] = None, domains: Sequence[str] = (),
            watch: Optional["Watcher"] = None, *, cancel: Optional[Cancel] = None,
            progress: Optional[Progress] = None) -> "RunResult":
    """Back up (then prune) every domain the job selects, `parallel` at a time; `domains` narrows
    the selection. One domain's failure never stops another; the result says what each did.
    `cancel`: the running backups are aborted and rolled back (their child processes get
    SIGTERM), queued domains are skipped; the result's `interrupted` is the reason (raised as
    Interrupted only when the handle was cancelled before the call).
    `progress`: each backup's events, with `domain` set to the domain's name."""
    from virtbackup.jobs import run as _run
    with _operation("run", cancel, progress):
        return _run(job, uri, domains, watch)


@_boundary
def plan_job(job: "Job", uri: Optional[str] = None, domains: Sequence[str] = ()) -> "JobPlan":
    """What `run_job` would do for each domain and why (level, points a prune would drop); reads only."""
    from virtbackup.jobs import dry_run as _dry
    return _dry(job, uri, domains)

@_boundary
def thaw(domain: str, uri: Optional[str] = None) -> ThawResult:
    """Thaw DOMAIN's filesystems through its guest agent (e.g. a run was killed while it was
    frozen); removes the frozen marker such a run left, unless a run holds the domain now."""
    from virtbackup.virt.quiesce import thaw as _thaw
    return _thaw(uri, domain)


@_boundary
def drill(backup_dir: PathArg, point: Optional[str] = None, timeout: float = 300, check: Optional[str] = None,
          uri: Optional[str] = None, notify: Optional[Notify] = None, *, cancel: Optional[Cancel] = None,
          progress: Optional[Progress] = None) -> DrillResult:
    """Boot a point as a throwaway domain on overlays (`verify --boot`): it passes when the guest
    agent answers within `timeout` s and `check` (a shell command run in the guest) exits 0.
    A failed drill is reported in the result (`ok`, `stage`, `failure`), not raised; bad input
    (e.g. the point's domain has no agent channel) raises (exit 2). `cancel`: the throwaway
    domain is destroyed and its overlays removed within a second (raises Interrupted).
    `progress`: "verify" events while the point's images are checked before the boot."""
    from virtbackup.drill import drill as _drill
    with _operation("drill", cancel, progress):
        return _drill(user_path(backup_dir, "BACKUP_DIR"), point, timeout, check, uri, notify)


# --- single-file restore (libguestfs; virtbackup.files) ----------------------------------------


@_boundary
def files_filesystems(backup_dir: PathArg, point: Optional[str] = None,
                      status: Optional[Status] = None) -> FilesystemList:
    """The filesystems in a point's disks (vda, vda1, vg/lv): (point id, filesystems), with to_json()."""
    from virtbackup import files as _files
    return _files.filesystems(Path(backup_dir), point, status)


@_boundary
def files_ls(backup_dir: PathArg, paths: Sequence[str], point: Optional[str] = None,
             status: Optional[Status] = None) -> ListResult:
    """List FS:PATH directories (or files) of a point, symlinks not followed: (point id, listings),
    with to_json()."""
    from virtbackup import files as _files
    return _files.ls(Path(backup_dir), paths, point, status)


@_boundary
def files_get(backup_dir: PathArg, paths: Sequence[str], dest: PathArg, point: Optional[str] = None,
              status: Optional[Status] = None) -> GetResult:
    """Copy FS:PATH files/trees out of a point (mode and mtime kept, symlinks as links, no overwrite)."""
    from virtbackup import files as _files
    return _files.get(Path(backup_dir), paths, Path(dest), point, status)


@_boundary
def files_cat(backup_dir: PathArg, paths: Sequence[str], out: Any, point: Optional[str] = None,
              status: Optional[Status] = None) -> int:
    """Write FS:PATH files of a point to the binary file object `out`."""
    from virtbackup import files as _files
    return _files.cat(Path(backup_dir), paths, out, point, status)


@_boundary
def open_point_files(backup_dir: PathArg, point: Optional[str] = None, status: Optional[Status] = None) -> PointFiles:
    """One appliance for many operations: `with open_point_files(d, "0003") as pf: pf.ls(...)`."""
    from virtbackup.files import PointFiles
    return PointFiles(Path(backup_dir), point, status)


# --- live restore ------------------------------------------------------------------------------
@_boundary
def live_restore(backup_dir: PathArg, output_dir: PathArg, define: str, point: Optional[str] = None,
                 disks: Sequence[str] = (), uri: Optional[str] = None, max_speed: Optional[int] = None,
                 progress: Optional[Progress] = None,
                 on_running: Optional[Any] = None, *, cancel: Optional[Cancel] = None,
                 key: Optional[Key] = None) -> LiveResult:
    """Define and start NAME on instant overlays, then pull the backup's data into them while it
    runs; returns when no disk depends on the backup. `max_speed`: bytes/s per disk. `key`: an
    encrypted backup's (a libvirt secret while this runs; the restored disks are plain).
    `progress`: a "copy" event stream per disk (the block pull's position). `cancel`: the pulls
    are aborted; the domain keeps running on valid overlays and the error (Interrupted) names
    the command that resumes (`resume_live`)."""
    from virtbackup.liverestore import live_restore as _live_restore
    with _operation("live-restore", cancel, progress):
        return _live_restore(Path(backup_dir), Path(output_dir), define, point, disks, uri, max_speed, on_running,
                             key=key)


@_boundary
def resume_live(name: str, uri: Optional[str] = None, max_speed: Optional[int] = None,
                progress: Optional[Progress] = None, *, cancel: Optional[Cancel] = None,
                key: Optional[Key] = None) -> LiveResult:
    """Finish an interrupted live restore of domain NAME (running: pull; shut off: flatten);
    `progress` and `cancel` as for `live_restore`; `key`: needed for an encrypted backup's."""
    from virtbackup.liverestore import resume_live as _resume_live
    with _operation("live-restore", cancel, progress):
        return _resume_live(name, uri, max_speed, key=key)


# --- off-site copies on S3 object storage (virtbackup.offsite; boto3, the `s3` extra) -----------
# Credentials and endpoint the boto3 way (environment, ~/.aws/config and credentials, `profile`);
# `endpoint_url` for Ceph RGW and other S3 servers. Unreachable or refusing servers raise
# offsite.RemoteError (exit 1); no boto3, no credentials, no such bucket raise UsageError (exit 2).
@_boundary
def offsite_push(backup_dir: PathArg, url: str, endpoint_url: Optional[str] = None, profile: Optional[str] = None,
                 lock_days: Optional[int] = None, max_speed: Optional[int] = None, *,
                 cancel: Optional[Cancel] = None, progress: Optional[Progress] = None) -> "OffsitePush":
    """Copy the points of BACKUP_DIR that s3://BUCKET/PREFIX does not hold yet (files first, the
    manifest last: the remote always holds a consistent chain); a killed push's uploaded parts are
    resumed. `lock_days`: lock every object version (S3 Object Lock, COMPLIANCE) for that long
    (the bucket must have Object Lock, else UsageError). `max_speed`: bytes/s over the whole push.
    `progress`: "upload" events (bytes of all files to send)."""
    from virtbackup.offsite import push
    with _operation("offsite-push", cancel, progress):
        return push(user_path(backup_dir, "BACKUP_DIR"), url, endpoint_url, profile, lock_days, max_speed)


@_boundary
def offsite_pull(url: str, local_dir: PathArg, point: Optional[str] = None, endpoint_url: Optional[str] = None,
                 profile: Optional[str] = None, *, cancel: Optional[Cancel] = None,
                 progress: Optional[Progress] = None) -> "OffsitePull":
    """Download the off-site chain (or `point` and the points it depends on) into a new or empty
    LOCAL_DIR, every file checked against the chain's digests (a damaged or missing object raises
    DamageFound, and what was downloaded is removed); then restore, verify, files work on it.
    `progress`: "download" events (bytes)."""
    from virtbackup.offsite import pull
    with _operation("offsite-pull", cancel, progress):
        return pull(url, user_path(local_dir, "LOCAL_DIR"), point, endpoint_url, profile)


@_boundary
def offsite_list(url: str, endpoint_url: Optional[str] = None, profile: Optional[str] = None) -> "OffsiteList":
    """The points of the off-site copy at s3://BUCKET/PREFIX (its manifest, validated)."""
    from virtbackup.offsite import list_remote
    return list_remote(url, endpoint_url, profile)


@_boundary
def offsite_verify(url: str, deep: bool = False, endpoint_url: Optional[str] = None, profile: Optional[str] = None,
                   *, cancel: Optional[Cancel] = None, progress: Optional[Progress] = None) -> "OffsiteVerify":
    """Every object of the off-site copy present at its recorded version, size and ETag; `deep`:
    downloaded and hashed against the chain's BLAKE3/SHA-256 digests. Damage is in the result."""
    from virtbackup.offsite import verify_remote
    with _operation("offsite-verify", cancel, progress):
        return verify_remote(url, deep, endpoint_url, profile)


@_boundary
def offsite_prune(url: str, dry_run: bool = False, endpoint_url: Optional[str] = None,
                  profile: Optional[str] = None) -> "OffsitePrune":
    """Delete object versions the newest manifest no longer references (points the local prune
    dropped, older manifests) once their lock expired; locked ones are kept and listed."""
    from virtbackup.offsite import prune_remote
    return prune_remote(url, dry_run, endpoint_url, profile)


def _refuse_remote_inactive(uri: Optional[str], dom: "libvirt.virDomain", what: str) -> None:
    """A shut-off domain's bitmaps are only in its image headers, on the hypervisor: a remote
    one's can't be read from here (QMP answers only for a running domain)."""
    from virtbackup.virt import host
    if host.is_remote(uri) and not dom.isActive():
        from virtbackup.runners.pull import refuse_remote
        refuse_remote(uri, f"{what} of a shut-off domain")


# The result types and helpers of __all__ (and a few more the files API returns), importable
# from here as before; each module is imported on first access.
_LAZY = {
    "BackupResult": "backup", "RestoreResult": "restore", "FlattenResult": "restore",
    "VerifyResult": "store.verify", "PruneResult": "store.retention", "Policy": "store.retention",
    "LiveResult": "liverestore", "StatusReport": "health", "RepairReport": "health",
    "ThawResult": "virt.quiesce", "DrillResult": "drill", "Notify": "runners.base", "RequestedLevel": "options",
    "Filesystem": "files", "FilesystemList": "files", "GetResult": "files", "Listing": "files",
    "ListResult": "files", "PointFiles": "files", "Status": "files",
    "Cancel": "observe", "ProgressEvent": "observe", "Progress": "observe",
}
# result types whose name here differs from their module's
_RENAMED = {"OffsitePush": ("offsite", "PushResult"), "OffsitePull": ("offsite", "PullResult"),
            "OffsiteList": ("offsite", "RemoteList"), "OffsiteVerify": ("offsite", "RemoteVerify"),
            "OffsitePrune": ("offsite", "RemotePrune")}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        where, real = _RENAMED[name]
        found = getattr(importlib.import_module(f".{where}", __package__), real)
        globals()[name] = found
        return found
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __package__), name)
    globals()[name] = value
    return value
