"""`virtbackup restore` (copy, instant, new domain, live) and `flatten`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Tuple

import typer

from virtbackup.cli._common import (
    AsJson,
    Disks,
    KeyFile,
    MaxSpeed,
    NoProgress,
    PointOpt,
    api,
    command,
    emit,
    human_size,
    options,
    read_key,
    say,
    usage,
)


@command()
def restore(ctx: typer.Context,
            backup_dir: Annotated[Optional[str], typer.Argument(metavar="[BACKUP_DIR]", show_default=False)] = None,
            output_dir: Annotated[Optional[str], typer.Argument(metavar="[OUTPUT_DIR]", show_default=False)] = None,
            point: PointOpt = None,
            disk: Disks = [],  # noqa: B006   (typer's list options: never mutated)
            instant: Annotated[bool, typer.Option(
                "--instant", help="no copy: qcow2 overlays on the backup images (see 'flatten')")] = False,
            define: Annotated[Optional[str], typer.Option(
                "--define", metavar="NAME", help="define a new domain NAME on the restored disks")] = None,
            start: Annotated[bool, typer.Option("--start", help="start the domain defined with --define")] = False,
            live: Annotated[bool, typer.Option(
                "--live", help="with --define: run the domain at once on instant overlays and copy the backup "
                "into them while it runs")] = False,
            resume_live: Annotated[Optional[str], typer.Option(
                "--resume-live", metavar="NAME",
                help="finish an interrupted live restore of domain NAME (no BACKUP_DIR/OUTPUT_DIR)")] = None,
            max_speed: MaxSpeed = None,
            no_progress: NoProgress = False,
            salvage: Annotated[bool, typer.Option(
                "--salvage", help="when images are damaged, restore the disks whose images are intact and say "
                "which are missing")] = False,
            key_file: KeyFile = None,
            encrypt: Annotated[bool, typer.Option(
                "--encrypt", help="keep the restored images encrypted (same key); default: decrypted")] = False,
            as_json: AsJson = False) -> None:
    """Restore a point as one standalone qcow2 per disk: OUTPUT_DIR/<disk>.qcow2."""
    uri = options(ctx).uri
    if resume_live is not None or live:
        if encrypt:
            raise usage("--encrypt doesn't apply to --live or --resume-live: a live restore's disks are plain "
                        "(the domain must run without the key); restore without --live to keep them encrypted")
        _live(uri, backup_dir=backup_dir, output_dir=output_dir, point=point, disk=disk, define=define,
              live=live, resume=resume_live, max_speed=max_speed, show_progress=not (no_progress or as_json),
              as_json=as_json, key_file=key_file)
        return
    if backup_dir is None or output_dir is None:
        raise usage("restore needs BACKUP_DIR and OUTPUT_DIR")
    if max_speed is not None:
        raise usage("--max-speed only applies to --live and --resume-live")

    from virtbackup.cli import progress
    key = read_key(key_file)
    with progress.observed("restore", progress.wanted(as_json, no_progress)) as bars:
        r = api.restore(backup_dir, output_dir, point, disk, instant=instant, define=define, start=start,
                        uri=uri, salvage=salvage, key=key, encrypt=encrypt, progress=bars)
    for note in r.notes:            # what is missing after --salvage is said on stderr also with --json
        say(f"note: {note}")
    if as_json:
        emit(r.to_json())
        return
    for name, path in sorted(r.images.items()):
        if r.instant:
            print(f"{name}: overlay {path} on point {r.point.id} (the backup images stay read-only)")
        else:
            print(f"restored {name} of point {r.point.id} to {path}")
    if r.domain:
        print(f"defined domain {r.domain} ({r.domain_uuid}){', started' if r.started else ''}")


class _LiveProgress:
    """Live-restore progress on stderr (fed by the restore's copy events): a line redrawn in place
    on a terminal, in a log a line every 10 % or 10 s."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.tty = sys.stderr.isatty()
        self.last_t = 0.0
        self.last_pct = -1.0
        self.disks: Dict[str, Tuple[int, int]] = {}

    def __call__(self, ev: Any) -> None:
        if not self.show or ev.disk is None or ev.phase != "copy":
            return
        self.disks[ev.disk] = (ev.done, ev.total)
        disks = self.disks
        done = sum(c for c, _e in disks.values())
        total = sum(e for _c, e in disks.values())
        pct = 100.0 * done / total if total else 0.0
        now = time.monotonic()
        if not self.tty and pct < self.last_pct + 10 and now < self.last_t + 10:
            return
        self.last_t, self.last_pct = now, pct
        line = f"copying {', '.join(sorted(disks))}: {pct:5.1f}% ({human_size(done)} of {human_size(total)})"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.tty and self.show:
            print(file=sys.stderr)


def _live(uri: Optional[str], *, backup_dir: Optional[str], output_dir: Optional[str], point: Optional[str],
          disk: List[str], define: Optional[str], live: bool, resume: Optional[str], max_speed: Optional[int],
          show_progress: bool, as_json: bool, key_file: Optional[str] = None) -> None:
    """restore --live / --resume-live: progress on stderr, the result on stdout."""
    if resume is not None:
        if live or backup_dir is not None or output_dir is not None or define or point or disk:
            raise usage("--resume-live NAME takes no BACKUP_DIR, OUTPUT_DIR, --live, --define, --point or --disk "
                        "(the domain records them)")
        if not resume.strip():
            raise usage("--resume-live needs a domain name")
    elif backup_dir is None or output_dir is None:
        raise usage("restore --live needs BACKUP_DIR and OUTPUT_DIR")
    elif not define:
        raise usage("--live needs --define NAME (the domain to run on the restored disks)")
    key = read_key(key_file)
    progress = _LiveProgress(show_progress)

    def on_running(name: str, seconds: float) -> None:
        if not as_json:
            print(f"domain {name} running after {seconds:.2f}s on overlays in {output_dir}; "
                  "copying the backup into them", flush=True)

    try:
        if resume is not None:
            r = api.resume_live(resume, uri, max_speed, progress, key=key)
        else:
            r = api.live_restore(Path(backup_dir or ""), Path(output_dir or ""), define or "", point=point,
                                 disks=disk, uri=uri, max_speed=max_speed, progress=progress, on_running=on_running,
                                 key=key)
    finally:
        progress.end()
    if as_json:
        emit(r.to_json())
        return
    for note in r.notes:
        say(f"note: {note}")
    how = " (shut off: flattened offline)" if r.offline else ""
    print(f"domain {r.domain} independent of {r.backup_dir} after {r.time_to_independent:.2f}s{how}: "
          f"{', '.join(f'{k}={v}' for k, v in sorted(r.images.items()))} have no backing file")


@command()
def flatten(image: Annotated[str, typer.Argument(help="a qcow2 overlay, e.g. from restore --instant",
                                                 show_default=False)],
            as_json: AsJson = False) -> None:
    """Copy an image's backing data into it and drop the backing link (it must not be in use)."""
    r = api.flatten(image)
    if as_json:
        emit(r.to_json())
    else:
        print(f"{r.image} is standalone")
