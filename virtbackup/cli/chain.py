"""`virtbackup list` and `prune`: what a backup directory holds, and dropping old points."""

from __future__ import annotations

from typing import Annotated

import typer

from virtbackup.cli._common import AsJson, BackupDirArg, KeyFile, api, command, emit, human_size, read_key, say


@command("list")
def list_points(backup_dir: BackupDirArg, as_json: AsJson = False) -> None:
    """List the restore points of a backup directory, oldest first."""
    chain = api.list_points(backup_dir)
    if as_json:
        emit(chain.to_json())
        return
    print(f"domain {chain.domain} ({chain.uuid})")
    if chain.encryption is not None:
        print(f"encrypted: {chain.encryption.format} {chain.encryption.cipher} (restore, verify, prune "
              "and further backups need --key-file)")
    print(f"{'ID':<6} {'LEVEL':<5} {'CREATED':<26} {'PARENT':<6} {'DISKS':<16} {'SIZE':>10}  "
          f"{'CONSISTENCY':<11}  NOTE")
    for p in chain.points:
        size = human_size(sum(i.size for i in p.disks.values()))
        # consistency: application | crash | - (recorded before virtbackup knew); why: list --json
        note = "; ".join([p.reason or ""][:1 if p.reason else 0]
                         + [f"{n} copied whole: {i.full_reason}" for n, i in sorted(p.disks.items())
                            if i.full_reason])
        print(f"{p.id:<6} {p.level:<5} {p.created:<26} {p.parent or '-':<6} "
              f"{','.join(sorted(p.disks)):<16} {size:>10}  {p.consistency or '-':<11}  {note}".rstrip())
    if chain.points:        # the total after the table: what the directory's images hold
        kinds = sorted({p.compression or "uncompressed" for p in chain.points})
        ratio = chain.compression_ratio
        print(f"stored: {human_size(chain.stored_bytes)} ({', '.join(kinds)}"
              + (f"; compression ratio {ratio:.2f}" if ratio is not None else "") + ")")


@command()
def prune(backup_dir: BackupDirArg,
          keep: Annotated[int, typer.Option("--keep", metavar="N", help="keep the newest N points")] = 0,
          keep_daily: Annotated[int, typer.Option(
              "--keep-daily", metavar="N",
              help="keep the newest point of each of the last N days with points (UTC)")] = 0,
          keep_weekly: Annotated[int, typer.Option(
              "--keep-weekly", metavar="N",
              help="keep the newest point of each of the last N ISO weeks with points")] = 0,
          keep_monthly: Annotated[int, typer.Option(
              "--keep-monthly", metavar="N",
              help="keep the newest point of each of the last N months with points (UTC)")] = 0,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be kept, dropped and merged")]
          = False,
          key_file: KeyFile = None,
          as_json: AsJson = False) -> None:
    """Drop old points; kept points that depend on dropped ones are merged so they restore unchanged."""
    r = api.prune(backup_dir, keep=keep, keep_daily=keep_daily, keep_weekly=keep_weekly, dry_run=dry_run,
                  keep_monthly=keep_monthly, key=read_key(key_file))
    plan = r.plan
    if as_json:
        emit(r.to_json())
        return
    for d in plan.decisions:
        print(f"{'keep' if d.keep else 'drop'} {d.point}: {'; '.join(d.reasons)}")
    verb = "would" if r.dry_run else "done"
    for note in plan.notes:
        print(f"{verb}: {note}")
    for rel in r.leftovers:
        print(f"{'would remove' if r.dry_run else 'removed'} {rel} (left by an interrupted prune)")
    print(f"{'dry run: ' if r.dry_run else ''}{len(plan.keep)} point(s) kept, {len(plan.drop)} dropped")
    for w in r.warnings:
        say(f"warning: {w}")
