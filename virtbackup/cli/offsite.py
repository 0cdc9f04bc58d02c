"""`virtbackup offsite push|pull|list|verify|prune`: off-site copies on S3 object storage.

boto3 is imported only when one of these commands runs (virtbackup.offsite), never at start-up.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from virtbackup.cli import _common
from virtbackup.cli._common import AsJson, BackupDirArg, NoProgress, api, emit, fail, human_size, say

offsite_app = typer.Typer(no_args_is_help=True, help="Off-site copies on S3 object storage (Ceph RGW, any S3 "
                          "server): push, list, verify, pull, prune. Credentials the boto3 way (AWS_* environment, "
                          "~/.aws/config and credentials, --profile).")
_common.app.add_typer(offsite_app, name="offsite")

Url = Annotated[str, typer.Argument(metavar="s3://BUCKET/PREFIX", help="where the off-site copy lives",
                                    show_default=False)]
Endpoint = Annotated[Optional[str], typer.Option(
    "--endpoint-url", metavar="URL", help="the S3 server (Ceph RGW, MinIO...; default: boto3's: AWS_ENDPOINT_URL, "
    "the profile's endpoint_url, else AWS)")]
Profile = Annotated[Optional[str], typer.Option("--profile", metavar="NAME",
                                                help="credentials profile of ~/.aws/config (default: AWS_PROFILE)")]


def _command(name: str) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        offsite_app.command(name)(_common._boundary(fn))
        return fn
    return deco


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a push like Ctrl-C (one "interrupted" line, exit 1) instead of killing it
    silently: the parts in flight finish, no manifest is written, the next push resumes."""
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@_command("push")
def push(backup_dir: BackupDirArg, url: Url, endpoint_url: Endpoint = None, profile: Profile = None,
         lock_days: Annotated[Optional[int], typer.Option(
             "--lock-days", metavar="N", help="lock every uploaded object version for N days (S3 Object Lock, "
             "COMPLIANCE mode: nobody can delete it before; the bucket must have Object Lock enabled)")] = None,
         max_speed: Annotated[Optional[int], typer.Option("--max-speed", metavar="BYTES",
                                                          help="send at most BYTES per second")] = None,
         no_progress: NoProgress = False, as_json: AsJson = False) -> None:
    """Copy the points the remote does not hold yet: files first, the manifest last (resumes a killed push)."""
    from virtbackup.cli import progress
    with _sigterm_interrupts(), progress.observed("offsite push", progress.wanted(as_json, no_progress)) as bars:
        r = api.offsite_push(backup_dir, url, endpoint_url, profile, lock_days, max_speed, progress=bars)
    if as_json:
        emit(r.to_json())
        return
    for w in r.warnings:
        say(f"warning: {w}")
    lock = f", locked ({r.lock_mode}) until {r.retain_until}" if r.lock_mode else ""
    resumed = f", {r.parts_reused} part(s) resumed" if r.parts_reused else ""
    print(f"pushed {len(r.points_sent)} new point(s) to {r.url}: {r.objects_sent} object(s), "
          f"{human_size(r.bytes_sent)} sent{resumed}, {r.objects_skipped} already there; "
          f"the remote holds {len(r.points)} point(s){lock} ({r.seconds:.1f} s)")


@_command("list")
def list_remote(url: Url, endpoint_url: Endpoint = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """List the points of an off-site copy, oldest first."""
    r = api.offsite_list(url, endpoint_url, profile)
    if as_json:
        emit(r.to_json())
        return
    m, c = r.manifest, r.manifest.chain
    print(f"{r.url}: domain {c.domain_name} ({c.domain_uuid}), pushed {m.pushed}")
    if m.lock_mode:
        print(f"locked: {m.lock_mode}, {m.lock_days} day(s) from each push; earliest expiry {m.retain_until()}")
    if c.encryption is not None:
        print(f"encrypted: {c.encryption.format} {c.encryption.cipher}")
    print(f"{'ID':<6} {'LEVEL':<5} {'CREATED':<26} {'PARENT':<6} {'DISKS':<16} {'SIZE':>10}")
    for p in c.points:
        size = human_size(sum(i.size for i in p.disks.values()))
        print(f"{p.id:<6} {p.level:<5} {p.created:<26} {p.parent or '-':<6} {','.join(sorted(p.disks)):<16} {size:>10}")


@_command("verify")
def verify(url: Url, deep: Annotated[bool, typer.Option(
               "--deep", help="download every object and check it against the chain's BLAKE3 digests")] = False,
           endpoint_url: Endpoint = None, profile: Profile = None, no_progress: NoProgress = False,
           as_json: AsJson = False) -> None:
    """Check every object of an off-site copy: present at its version, size and ETag as recorded."""
    from virtbackup.cli import progress
    with progress.observed("offsite verify", progress.wanted(as_json, no_progress)) as bars:
        r = api.offsite_verify(url, deep, endpoint_url, profile, progress=bars)
    if not as_json:
        for d in r.damage:
            say(f"damaged: {d.object} (point {d.point}{', disk ' + d.disk if d.disk else ''}): {d.problem}")
        if r.ok:
            print(f"ok: {r.objects_checked} object(s) verified" + (f", {human_size(r.bytes_read)} read and hashed"
                                                                   if deep else ""))
    fail(as_json, r.to_json(), r.failure, "verify-failed")


@_command("pull")
def pull(url: Url, local_dir: Annotated[str, typer.Argument(metavar="LOCAL_DIR", help="a new or empty directory",
                                                            show_default=False)],
         point: Annotated[Optional[str], typer.Option(
             "--point", help="only this point (id, 'latest' or an ISO 8601 time) and the points it depends on")] = None,
         endpoint_url: Endpoint = None, profile: Profile = None, no_progress: NoProgress = False,
         as_json: AsJson = False) -> None:
    """Download an off-site copy into LOCAL_DIR (checked against its digests); then restore, verify, files."""
    from virtbackup.cli import progress
    with progress.observed("offsite pull", progress.wanted(as_json, no_progress)) as bars:
        r = api.offsite_pull(url, local_dir, point, endpoint_url, profile, progress=bars)
    if as_json:
        emit(r.to_json())
        return
    print(f"pulled {len(r.points)} point(s) ({', '.join(r.points)}) into {r.local_dir}: {r.objects} file(s), "
          f"{human_size(r.bytes)} ({r.seconds:.1f} s)")


@_command("prune")
def prune(url: Url, dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be deleted")]
          = False, endpoint_url: Endpoint = None, profile: Profile = None, as_json: AsJson = False) -> None:
    """Delete what the newest push no longer references (points pruned locally), once unlocked."""
    r = api.offsite_prune(url, dry_run, endpoint_url, profile)
    if not as_json:
        verb = "would delete" if dry_run else "deleted"
        for name in r.deleted:
            print(f"{verb} {name}")
        for name in r.locked:
            print(f"kept {name}: still locked")
        print(f"{len(r.deleted)} object version(s) {verb.split()[-1]}, {len(r.locked)} still locked, "
              f"{r.kept} in use")
    fail(as_json, r.to_json(), r.failure, "prune-failed")
