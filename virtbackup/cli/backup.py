"""`virtbackup backup`: one point of one domain."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from virtbackup.cli._common import (
    AsJson,
    BackupDirArg,
    Disks,
    Domain,
    KeyFile,
    MaxSpeed,
    NoProgress,
    api,
    command,
    emit,
    human_size,
    options,
    read_key,
    say,
    shown,
)


@command()
def backup(ctx: typer.Context, domain: Domain, backup_dir: BackupDirArg,
           level: Annotated[str, typer.Option("--level", "-l", metavar="[auto|full|inc|diff]",
                                              help="auto: inc when the chain can go on safely, else full (says why); "
                                                   "inc: since the last point; diff: since the chain's full")] = "auto",
           disk: Disks = [],  # noqa: B006   (typer's list options: never mutated)
           no_progress: NoProgress = False,
           reason: Annotated[Optional[str], typer.Option(
               "--reason", hidden=True, help="why this level; recorded with the point (used by run)")] = None,
           quiesce: Annotated[str, typer.Option(
               "--quiesce", metavar="[auto|require|off]",
               help="freeze the guest's filesystems through its agent for the job start: auto (default: when "
                    "the domain has an agent channel, else crash-consistent), require (fail if it can't; a "
                    "bare --quiesce means require), off")] = "auto",
           mode: Annotated[Optional[str], typer.Option(
               "--mode", metavar="[auto|push|pull]",
               help="pull (virtbackup reads the disks over NBD; the guest's writes are not slowed by the "
                    "backup target) | push (QEMU writes the backup dir) | auto (default: pull, or push where "
                    "pull cannot run: its scratch files may not fit or have no directory, or libnbd or "
                    "qemu-nbd is missing)")] = None,
           scratch_dir: Annotated[Optional[str], typer.Option(
               "--scratch-dir", metavar="DIR",
               help="pull: directory on the hypervisor for the scratch files (default: beside each disk "
                    "image)")] = None,
           max_speed: MaxSpeed = None,
           nbd_tls_dir: Annotated[Optional[str], typer.Option(
               "--nbd-tls-dir", metavar="DIR",
               help="pull from a remote URI: NBD over TLS with this client's certificate in DIR (ca-cert.pem, "
                    "client-cert.pem, client-key.pem; default $VIRTBACKUP_NBD_TLS_DIR, else "
                    "/etc/pki/virtbackup)")] = None,
           insecure_nbd: Annotated[bool, typer.Option(
               "--insecure-nbd",
               help="pull from a remote URI as plaintext NBD over TCP (no TLS): anyone who reaches the port "
                    "during the job reads the disks; warned about and recorded in the point")] = False,
           encrypt: Annotated[bool, typer.Option(
               "--encrypt", help="start an encrypted chain (LUKS qcow2); needs --key-file")] = False,
           key_file: KeyFile = None,
           compress: Annotated[Optional[str], typer.Option(
               "--compress", metavar="[zstd|zlib|none]",
               help="store the images as qcow2 compressed clusters (any qemu-img reads them); default: the "
                    "chain's setting, none for a new directory; another setting starts a new "
                    "chain")] = None,
           progress_fd: Annotated[Optional[int], typer.Option(
               "--progress-fd", hidden=True, metavar="FD",
               help="write progress events as JSON lines to this file descriptor (used by run)")] = None,
           as_json: AsJson = False) -> None:
    """Back up a domain, running or shut off: full, inc (since the last point) or diff (since the full)."""
    from virtbackup.cli import progress

    uri = options(ctx).uri
    key = read_key(key_file)             # read first: a refused key file changes nothing
    # the bars (or run's pipe) get the engine's progress events; signals cancel the job as always
    with progress.to_fd(progress_fd) as to_run, \
            progress.backup(domain, progress.wanted(as_json, no_progress) and to_run is None) as bar:
        r = api.backup(domain, backup_dir, level=level, disks=disk, uri=uri, notify=say, reason=reason,
                       quiesce=quiesce, mode=mode, scratch_dir=scratch_dir, max_speed=max_speed, encrypt=encrypt,
                       key=key, progress=to_run or bar, nbd_tls_dir=nbd_tls_dir, insecure_nbd=insecure_nbd,
                       compress=compress)
    if as_json:
        emit(r.to_json())
        return
    p = r.point
    size = human_size(sum(i.size for i in p.disks.values()))
    stored = f"{size} written" + (f" ({p.compression})" if p.compression else "")
    print(f"point {p.id}: {p.level} {p.transport} backup of {r.domain} ({', '.join(sorted(p.disks))}), "
          f"{stored} in {p.duration:.2f}s, checkpoint {p.checkpoint}")
    if p.consistency:
        frozen = f", guest frozen {p.frozen_seconds:.2f}s" if p.frozen_seconds is not None else ""
        print(f"point {p.id}: {p.consistency}-consistent ({shown(str(p.consistency_reason))}{frozen})")
    for name, img in sorted(p.disks.items()):
        if img.full_reason:
            print(f"  disk {name} copied whole ({human_size(img.size)}): {img.full_reason}")
