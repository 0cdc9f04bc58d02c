"""`virtbackup run`: every domain a job file selects (then prune), `parallel` at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from virtbackup.cli._common import AsJson, NoProgress, api, command, emit, human_size, options, say
from virtbackup.errors import EXIT_FAILED


@command("run")
def run_job(ctx: typer.Context,
            job_file: Annotated[Path, typer.Argument(metavar="JOBFILE", show_default=False,
                                                     help="job file (TOML), e.g. /etc/virtbackup/nightly.toml")],
            domain: Annotated[List[str], typer.Option(
                "--domain", metavar="NAME", help="only this domain of the job (repeatable)")] = [],  # noqa: B006
            dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would be done and why")] = False,
            no_progress: NoProgress = False,
            as_json: AsJson = False) -> None:
    """Back up every domain a job file selects (then prune), `parallel` at a time; exit 1 if any failed."""
    from virtbackup.cli import progress

    uri = options(ctx).uri
    job = api.load_job(job_file)
    if dry_run:
        out = api.plan_job(job, uri, domain)
        if as_json:
            emit(out.to_json())
            return
        for p in out.domains:
            if p.action == "backup":
                drops = f"; prune would drop {', '.join(p.prune_drops)}" if p.prune_drops else ""
                print(f"{p.domain}: would back up into {p.backup_dir}, level {p.level}: {p.why}{drops}")
            else:
                print(f"{p.domain}: would {'FAIL' if p.action == 'fail' else 'skip'}: {p.error}")
        print(f"dry run of job {out.job.name}: nothing was changed")
        return
    if not progress.wanted(as_json, no_progress):
        r = api.run_job(job, uri, domain)
    else:
        with progress.RunDisplay() as display:
            r = api.run_job(job, uri, domain, display.watch, progress=display.progress)
    if as_json:
        emit(r.to_json())
    else:
        print(f"{'DOMAIN':<24} {'STATUS':<8} {'LEVEL':<5} {'POINT':<6} {'BYTES':>10} {'SECONDS':>8}  ERROR")
        for d in r.domains:
            print(f"{d.domain:<24} {d.status:<8} {d.level or '-':<5} {d.point or '-':<6} "
                  f"{human_size(d.bytes):>10} {d.seconds:>8.1f}  {d.error or ''}".rstrip())
        for d in r.domains:
            if d.status == "skipped" and not r.interrupted:
                say(f"note: {d.domain} skipped: {d.error}")
    failed = [d for d in r.domains if d.status == "failed"]
    if r.interrupted:
        say(f"error: run of job {r.job} stopped by {r.interrupted}: running backups were aborted "
            f"and rolled back, queued domains skipped")
    elif failed:
        say(f"error: {len(failed)} of {len(r.domains)} domain(s) failed: "
            + "; ".join(f"{d.domain}: {d.error}" for d in failed))
    if r.error:
        say(f"error: {r.error}")
    if not r.ok:
        raise typer.Exit(EXIT_FAILED)
