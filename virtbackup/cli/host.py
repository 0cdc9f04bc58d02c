"""`virtbackup status`, `repair` and `thaw`: what a domain carries on the host, and fixing it."""

from __future__ import annotations

from typing import Annotated

import typer

from virtbackup.cli._common import AsJson, BackupDirArg, Domain, api, command, emit, fail, human_size, options


@command()
def status(ctx: typer.Context, domain: Domain, as_json: AsJson = False) -> None:
    """Show each disk's bitmaps (recording/busy/inconsistent, dirty bytes) and whose they are."""
    st = api.status(domain, options(ctx).uri).to_json()
    if as_json:
        emit(st)
        return
    print(f"domain {st['domain']} ({st['uuid']}), {'running' if st['active'] else 'shut off'}")
    for disk, info in st["disks"].items():
        print(f"disk {disk}: {info['source']}")
        if not info["bitmaps"]:
            print("  (no bitmaps)")
        for b in info["bitmaps"]:
            flags = [f for f in ("recording", "busy", "inconsistent") if b[f]]
            owner = (f"virtbackup dir {b['backup_dir'] or b['dir_id']}" if b["owner"] == "virtbackup"
                     else "foreign")
            dirty = human_size(b["count"]) if b["count"] >= 0 else "?"
            cp = "" if b["checkpoint"] else "  NO CHECKPOINT"
            print(f"  {b['name']:<32} {','.join(flags) or '-':<24} dirty {dirty:>10}  {owner}{cp}")
    for cp in st["checkpoints"]:
        where = cp["backup_dir"] or cp["dir_id"] or ""
        print(f"checkpoint {cp['name']} parent={cp['parent'] or '-'} {cp['owner']} {where}".rstrip())


@command()
def repair(ctx: typer.Context, domain: Domain, backup_dir: BackupDirArg,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be done")] = False,
           as_json: AsJson = False) -> None:
    """Clean up this backup dir's orphaned/broken bitmaps and checkpoints; redefine lost ones."""
    r = api.repair(domain, backup_dir, dry_run, options(ctx).uri)
    if not as_json:
        if not r.actions:
            print("nothing to repair")
        for a in r.actions:
            what = f"{a.kind} {a.name}" + (f" on {a.disk}" if a.disk else "")
            state = "would" if r.dry_run else ("done" if a.done else f"FAILED: {a.error}")
            print(f"{state}: {what}: {a.reason}")
    fail(as_json, r.to_json(), r.failure, "repair-failed")


@command()
def thaw(ctx: typer.Context, domain: Domain, as_json: AsJson = False) -> None:
    """Thaw a domain's filesystems through its guest agent (e.g. a run was killed while it was frozen)."""
    r = api.thaw(domain, options(ctx).uri)
    if as_json:
        emit(r.to_json())
        return
    print(f"thawed {r.filesystems} filesystem(s) of domain {r.domain}")
    if r.marker is not None:
        who = f"pid {r.marker.get('pid', '?')}, since {r.marker.get('since', '?')}"
        print(f"it had been frozen by a virtbackup run that did not finish ({who})"
              + ("" if r.marker_removed else "; that run is still going"))
