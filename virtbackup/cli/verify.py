"""`virtbackup verify`: images against their records, whole chains read, or a restore drill (--boot)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, List, Optional, Tuple

import typer

from virtbackup.cli._common import (
    AsJson,
    BackupDirArg,
    KeyFile,
    NoProgress,
    api,
    command,
    fail,
    options,
    read_key,
    say,
    usage,
)

if TYPE_CHECKING:
    from virtbackup.drill import DrillResult


@command()
def verify(ctx: typer.Context, backup_dir: BackupDirArg,
           point: Annotated[Optional[str], typer.Option(
               "--point", help="only this point's chain (id, 'latest' or an ISO 8601 time)")] = None,
           deep: Annotated[bool, typer.Option("--deep", help="also read every point's whole chain")] = False,
           no_progress: NoProgress = False,
           boot: Annotated[bool, typer.Option(
               "--boot", help="restore drill: boot the point (default latest) as a throwaway domain on overlays; "
               "passes when its guest agent answers")] = False,
           timeout: Annotated[float, typer.Option(
               "--timeout", metavar="S", help="--boot: seconds for the agent to answer (and for --check to finish)")]
           = 300,
           check: Annotated[Optional[str], typer.Option(
               "--check", metavar="CMD", help="--boot: a shell command run in the booted guest through its agent; "
               "must exit 0")] = None,
           key_file: KeyFile = None,
           as_json: AsJson = False) -> None:
    """Check every image: qemu-img check, backing links, content hashes recorded at backup time."""
    if boot:
        if deep:
            raise usage("--boot and --deep are separate runs")
        _drill(options(ctx).uri, backup_dir, point, timeout, check, as_json)
        return
    if check is not None:
        raise usage("--check needs --boot")

    from virtbackup.cli import progress
    key = read_key(key_file)
    with progress.observed("verify", progress.wanted(as_json, no_progress)) as bars:
        r = api.verify(backup_dir, point, deep=deep, key=key, progress=bars)
    if not as_json:
        for d in r.damage:
            say(f"damaged: point {d.point} disk {d.disk} image {d.image}: {d.problem}")
        if r.ok:
            print(f"ok: {len(r.points)} point(s), {r.images_checked} image(s) verified"
                  + (f", {r.chains_read} chain(s) read end to end" if r.deep else ""))
    fail(as_json, r.to_json(), r.failure, "verify-failed")


def render_drill(r: "DrillResult") -> Tuple[List[str], List[str]]:
    """A drill's human output: notes for stderr and lines for stdout. The console tail (and the
    check's output quoted in the failure) are the guest's: say() escapes them, the check command is
    shown as its repr (escaped too), and nothing else here comes from the guest."""
    notes, lines = [], []
    times = (f"running after {r.start_seconds:.2f}s" if r.start_seconds is not None else "did not start") + (
        f", guest agent answered after {r.agent_seconds:.2f}s" if r.agent_seconds is not None else "")
    if r.console:
        notes.append(f"console: {r.console}")
    if r.ok:
        what = f", check {r.check!r} exited 0" if r.check else ""
        lines.append(f"ok: point {r.point} boots: {times}{what} (throwaway domain {r.domain} removed)")
    else:
        lines.append(f"point {r.point}: {times} (throwaway domain {r.domain} removed)")
    return notes, lines


def _drill(uri: Optional[str], backup_dir: str, point: Optional[str], timeout: float, check: Optional[str],
           as_json: bool) -> None:
    r = api.drill(backup_dir, point, timeout, check, uri, say)
    if not as_json:
        notes, lines = render_drill(r)
        for note in notes:
            say(note)
        for line in lines:
            print(line)
    fail(as_json, r.to_json(), r.failure, "drill-failed")
