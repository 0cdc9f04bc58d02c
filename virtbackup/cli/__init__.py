"""virsh-style command line. Parses, calls virtbackup.api, renders text or JSON. No libvirt here.

The API raises only VirtBackupError (errors.py); anything else reaching `_run` is a bug and is
reported as one "internal error" line (VIRTBACKUP_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional


def _import_typer_without_rich() -> None:
    """typer imports rich (~0.1 s) at start-up when it is installed, only to format help.

    rich is installed for the progress bars, which import it lazily on a TTY; hide it while
    typer loads so `--help`, `list` and usage errors stay fast (typer then formats help the
    plain click way, as before rich was a dependency)."""
    hidden = "rich" not in sys.modules
    if hidden:
        sys.modules["rich"] = None  # type: ignore[assignment]   # `import rich` -> ImportError
    try:
        import typer  # noqa: F401
    finally:
        if hidden:
            del sys.modules["rich"]


_import_typer_without_rich()
import typer  # noqa: E402

from virtbackup.errors import EXIT_FAILED, VirtBackupError  # noqa: E402
from virtbackup.options import QUIESCE_MODES  # noqa: E402


class _LazyAPI:
    """virtbackup.api (libvirt, lxml, tenacity) imported on first use: `--help` and usage errors
    stay fast, and every command saves the imports it does not need."""

    def __getattr__(self, name: str) -> Any:
        from virtbackup import api as real
        return getattr(real, name)


api = _LazyAPI()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Full, incremental and differential backups of libvirt/QEMU domains.")
_state: Dict[str, Any] = {"uri": None, "debug": False}


class _Elapsed(logging.Formatter):
    """Debug lines on stderr, each with the seconds since the command started."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        return (f"virtbackup: debug: {time.monotonic() - self.t0:7.3f}s {record.name.removeprefix('virtbackup.')}: "
                f"{record.getMessage()}")


def _enable_debug() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Elapsed())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger("virtbackup")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("virtbackup.cli").debug("argv %s", sys.argv)


def _err(msg: str) -> None:
    print(f"virtbackup: {msg}", file=sys.stderr, flush=True)


def _run(as_json: bool, fn: Callable[[], Any], render: Callable[[Any], None]) -> None:
    try:
        result = fn()
    except VirtBackupError as e:
        _err(f"error: {e}")
        if as_json:
            print(json.dumps({"error": {"kind": e.kind, "message": str(e), "exit_code": e.exit_code}}))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _err("error: interrupted")
        if as_json:
            print(json.dumps({"error": {"kind": "interrupted", "message": "interrupted", "exit_code": EXIT_FAILED}}))
        raise typer.Exit(EXIT_FAILED) from None
    except Exception as e:
        # A bug (the API raises only VirtBackupError): still one line, exit 1, no traceback
        # unless VIRTBACKUP_DEBUG=1 or --debug asks for it.
        if os.environ.get("VIRTBACKUP_DEBUG") or _state["debug"]:
            raise
        msg = " ".join(f"internal error: {type(e).__name__}: {e} (VIRTBACKUP_DEBUG=1 shows where)".split())
        _err(f"error: {msg}")
        if as_json:
            print(json.dumps({"error": {"kind": "internal", "message": msg, "exit_code": EXIT_FAILED}}))
        raise typer.Exit(EXIT_FAILED) from None
    render(result)


def _fail(as_json: bool, out: Dict[str, Any], message: Optional[str], kind: str) -> None:
    """Print a result that carries its own failure (verify damage, a failed repair action):
    the JSON with an "error" member, then the one error line and exit 1."""
    if as_json:
        if message:
            out = {**out, "error": {"kind": kind, "message": message, "exit_code": EXIT_FAILED}}
        print(json.dumps(out))
    if message:
        _err(f"error: {message}")
        raise typer.Exit(EXIT_FAILED)


def _key(spec: Optional[str]) -> Any:
    """The key from --key-file, read before anything else happens (None: no --key-file)."""
    return api.read_key(spec) if spec is not None else None


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.callback()
def main_opts(connect: Optional[str] = typer.Option(
        None, "--connect", "-c", help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)"),
        debug: bool = typer.Option(False, "--debug", "-v", help="print every command run, QMP command and "
                                   "libvirt call (with its XML) and timings on stderr")) -> None:
    if connect is not None and not connect.strip():
        # libvirt takes "" for its default URI: a silently different host than asked for
        _err("error: --connect needs a URI, not an empty string")
        raise typer.Exit(2)
    _state["uri"] = connect
    _state["debug"] = debug
    if debug:
        _enable_debug()


@app.command()
def status(domain: str = typer.Argument(..., help="domain name or UUID"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Show each disk's bitmaps (recording/busy/inconsistent, dirty bytes) and whose they are."""
    def render(report: Any) -> None:
        st = report.to_json()
        if as_json:
            print(json.dumps(st))
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
                dirty = _human_size(b["count"]) if b["count"] >= 0 else "?"
                cp = "" if b["checkpoint"] else "  NO CHECKPOINT"
                print(f"  {b['name']:<32} {','.join(flags) or '-':<24} dirty {dirty:>10}  {owner}{cp}")
        for cp in st["checkpoints"]:
            where = cp["backup_dir"] or cp["dir_id"] or ""
            print(f"checkpoint {cp['name']} parent={cp['parent'] or '-'} {cp['owner']} {where}".rstrip())

    _run(as_json, lambda: api.status(domain, _state["uri"]), render)


@app.command()
def repair(domain: str = typer.Argument(..., help="domain name or UUID"),
           backup_dir: str = typer.Argument(...),
           dry_run: bool = typer.Option(False, "--dry-run", help="only show what would be done"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Clean up this backup dir's orphaned/broken bitmaps and checkpoints; redefine lost ones."""
    def render(r: Any) -> None:
        if not as_json:
            if not r.actions:
                print("nothing to repair")
            for a in r.actions:
                what = f"{a.kind} {a.name}" + (f" on {a.disk}" if a.disk else "")
                state = "would" if r.dry_run else ("done" if a.done else f"FAILED: {a.error}")
                print(f"{state}: {what}: {a.reason}")
        _fail(as_json, r.to_json(), r.failure, "repair-failed")

    _run(as_json, lambda: api.repair(domain, backup_dir, dry_run, _state["uri"]), render)


@app.command()
def backup(domain: str = typer.Argument(..., help="domain name or UUID"),
           backup_dir: str = typer.Argument(..., help="directory holding this domain's backups"),
           level: str = typer.Option("auto", "--level", "-l", help="auto | full | inc | diff"),
           disk: List[str] = typer.Option([], "--disk", help="only these disks (target names, e.g. vda)"),
           no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar on a terminal"),
           reason: Optional[str] = typer.Option(None, "--reason", hidden=True,
                                                help="why this level; recorded with the point (used by run)"),
           quiesce: str = typer.Option(
               "auto", "--quiesce", metavar="[auto|require|off]",
               help="freeze the guest's filesystems through its agent for the job start: auto (default: when "
                    "the domain has an agent channel, else crash-consistent), require (fail if it can't; a "
                    "bare --quiesce means require), off"),
           mode: Optional[str] = typer.Option(
               None, "--mode", help="push (QEMU writes the backup dir) | pull (virtbackup reads the disks "
               "over NBD); default: push for a local libvirtd, pull for a remote URI"),
           scratch_dir: Optional[str] = typer.Option(
               None, "--scratch-dir", help="pull: directory on the hypervisor for the scratch files "
               "(default: beside each disk image)"),
           max_speed: Optional[int] = typer.Option(None, "--max-speed", metavar="BYTES",
                                                   help="copy at most BYTES per second per disk"),
           encrypt: bool = typer.Option(False, "--encrypt", help="start an encrypted chain (LUKS qcow2); "
                                        "needs --key-file; push mode only"),
           key_file: Optional[str] = typer.Option(None, "--key-file", metavar="FILE",
                                                  help="passphrase of the encrypted chain ('-': stdin)"),
           as_json: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Back up a domain, running or shut off: full, inc (since the last point) or diff (since the full)."""
    def notify(msg: str) -> None:
        _err(msg)

    def render(r: Any) -> None:
        if as_json:
            print(json.dumps(r.to_json()))
            return
        p = r.point
        size = _human_size(sum(i.size for i in p.disks.values()))
        print(f"point {p.id}: {p.level} {p.transport} backup of {r.domain} ({', '.join(sorted(p.disks))}), "
              f"{size} written in {p.duration:.2f}s, checkpoint {p.checkpoint}")
        if p.consistency:
            frozen = f", guest frozen {p.frozen_seconds:.2f}s" if p.frozen_seconds is not None else ""
            print(f"point {p.id}: {p.consistency}-consistent ({p.consistency_reason}{frozen})")
        for name, img in sorted(p.disks.items()):
            if img.full_reason:
                print(f"  disk {name} copied whole ({_human_size(img.size)}): {img.full_reason}")

    def call() -> Any:
        from virtbackup.cli import progress
        key = _key(key_file)             # read first: a refused key file changes nothing
        with progress.backup(_state["uri"], domain, progress.wanted(as_json, no_progress)):
            return api.backup(domain, backup_dir, level, disk, _state["uri"], notify, reason=reason, quiesce=quiesce,
                              mode=mode, scratch_dir=scratch_dir, max_speed=max_speed, encrypt=encrypt, key=key)

    _run(as_json, call, render)


@app.command("list")
def list_cmd(backup_dir: str = typer.Argument(...),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """List the restore points of a backup directory, oldest first."""
    def render(chain: Any) -> None:
        if as_json:
            print(json.dumps(chain.to_json()))
            return
        print(f"domain {chain.domain} ({chain.uuid})")
        if chain.encryption is not None:
            print(f"encrypted: {chain.encryption.format} {chain.encryption.cipher} (restore, verify, prune "
                  "and further backups need --key-file)")
        print(f"{'ID':<6} {'LEVEL':<5} {'CREATED':<26} {'PARENT':<6} {'DISKS':<16} {'SIZE':>10}  "
              f"{'CONSISTENCY':<11}  NOTE")
        for p in chain.points:
            size = _human_size(sum(i.size for i in p.disks.values()))
            # consistency: application | crash | - (recorded before virtbackup knew); why: list --json
            note = "; ".join([p.reason or ""][:1 if p.reason else 0]
                             + [f"{n} copied whole: {i.full_reason}" for n, i in sorted(p.disks.items())
                                if i.full_reason])
            print(f"{p.id:<6} {p.level:<5} {p.created:<26} {p.parent or '-':<6} "
                  f"{','.join(sorted(p.disks)):<16} {size:>10}  {p.consistency or '-':<11}  {note}".rstrip())

    _run(as_json, lambda: api.list_points(backup_dir), render)


@app.command()
def restore(backup_dir: Optional[str] = typer.Argument(None, show_default=False),
            output_dir: Optional[str] = typer.Argument(None, show_default=False),
            point: Optional[str] = typer.Option(
                None, "--point", help="point id, 'latest' (default), or an ISO 8601 time: "
                "the newest point at or before it (no offset = UTC)"),
            disk: List[str] = typer.Option([], "--disk", help="only these disks"),
            instant: bool = typer.Option(False, "--instant", help="no copy: qcow2 overlays on the backup "
                                         "images (see 'flatten')"),
            define: Optional[str] = typer.Option(None, "--define", metavar="NAME",
                                                 help="define a new domain NAME on the restored disks"),
            start: bool = typer.Option(False, "--start", help="start the domain defined with --define"),
            live: bool = typer.Option(False, "--live", help="with --define: run the domain at once on "
                                      "instant overlays and copy the backup into them while it runs"),
            resume_live: Optional[str] = typer.Option(
                None, "--resume-live", metavar="NAME", help="finish an interrupted live restore of domain "
                "NAME (no BACKUP_DIR/OUTPUT_DIR)"),
            max_speed: Optional[int] = typer.Option(None, "--max-speed", metavar="BYTES",
                                                    help="live restore: copy at most BYTES per second per disk"),
            no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars on a terminal"),
            salvage: bool = typer.Option(False, "--salvage", help="when images are damaged, restore the disks "
                                         "whose images are intact and say which are missing"),
            key_file: Optional[str] = typer.Option(None, "--key-file", metavar="FILE",
                                                   help="passphrase of an encrypted backup ('-': stdin)"),
            encrypt: bool = typer.Option(False, "--encrypt", help="keep the restored images encrypted "
                                         "(same key); default: decrypted"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Restore a point as one standalone qcow2 per disk: OUTPUT_DIR/<disk>.qcow2."""
    if resume_live is not None or live:
        if key_file is not None or encrypt:
            _usage(as_json, "--key-file/--encrypt don't apply to --live or --resume-live: an encrypted backup "
                            "can't be restored live; restore it without --live (with --key-file FILE)")
        _live(backup_dir, output_dir, point, disk, define, live, resume_live, max_speed,
              not (no_progress or as_json), as_json)
        return
    if backup_dir is None or output_dir is None:
        _usage(as_json, "restore needs BACKUP_DIR and OUTPUT_DIR")
    if max_speed is not None:
        _usage(as_json, "--max-speed only applies to --live and --resume-live")

    def render(r: Any) -> None:
        if as_json:
            for note in r.notes:        # what is missing after --salvage is said on stderr too
                _err(f"note: {note}")
            print(json.dumps(r.to_json()))
            return
        for name, path in sorted(r.images.items()):
            if r.instant:
                print(f"{name}: overlay {path} on point {r.point.id} (the backup images stay read-only)")
            else:
                print(f"restored {name} of point {r.point.id} to {path}")
        for note in r.notes:
            _err(f"note: {note}")
        if r.domain:
            print(f"defined domain {r.domain} ({r.domain_uuid}){', started' if r.started else ''}")

    def call() -> Any:
        from virtbackup.cli import progress
        key = _key(key_file)
        with progress.observed("restore", progress.wanted(as_json, no_progress)):
            return api.restore(backup_dir, output_dir, point, disk, instant, define, start, _state["uri"],
                                     salvage, key=key, encrypt=encrypt)

    _run(as_json, call, render)


def _usage(as_json: bool, msg: str) -> None:
    """A usage error found after parsing: one line, exit 2, like click's own."""
    _err(f"error: {msg}")
    if as_json:
        print(json.dumps({"error": {"kind": "usage", "message": msg, "exit_code": 2}}))
    raise typer.Exit(2)


def _live(backup_dir: Optional[str], output_dir: Optional[str], point: Optional[str], disk: List[str],
          define: Optional[str], live: bool, resume: Optional[str], max_speed: Optional[int],
          show_progress: bool, as_json: bool) -> None:
    """restore --live / --resume-live: progress on stderr, the result on stdout."""
    import time

    if resume is not None:
        if live or backup_dir is not None or output_dir is not None or define or point or disk:
            _usage(as_json, "--resume-live NAME takes no BACKUP_DIR, OUTPUT_DIR, --live, --define, "
                            "--point or --disk (the domain records them)")
        if not resume.strip():
            _usage(as_json, "--resume-live needs a domain name")
    elif backup_dir is None or output_dir is None:
        _usage(as_json, "restore --live needs BACKUP_DIR and OUTPUT_DIR")
    elif not define:
        _usage(as_json, "--live needs --define NAME (the domain to run on the restored disks)")
    tty = sys.stderr.isatty()
    last: Dict[str, float] = {"t": 0.0, "pct": -1.0}

    def progress(disks: Dict[str, Any]) -> None:
        if not show_progress or not disks:
            return
        done = sum(c for c, _e in disks.values())
        total = sum(e for _c, e in disks.values())
        pct = 100.0 * done / total if total else 0.0
        now = time.monotonic()
        # a terminal gets a line redrawn in place; a log gets a line every 10 % or 10 s
        if not tty and pct < last["pct"] + 10 and now < last["t"] + 10:
            return
        last["t"], last["pct"] = now, pct
        line = (f"copying {', '.join(sorted(disks))}: {pct:5.1f}% "
                f"({_human_size(done)} of {_human_size(total)})")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    def on_running(name: str, seconds: float) -> None:
        if not as_json:
            print(f"domain {name} running after {seconds:.2f}s on overlays in {output_dir}; "
                  "copying the backup into them", flush=True)

    def render(r: Any) -> None:
        if tty and show_progress:
            print(file=sys.stderr)
        if as_json:
            print(json.dumps(r.to_json()))
            return
        for note in r.notes:
            _err(f"note: {note}")
        how = " (shut off: flattened offline)" if r.offline else ""
        print(f"domain {r.domain} independent of {r.backup_dir} after {r.time_to_independent:.2f}s{how}: "
              f"{', '.join(f'{k}={v}' for k, v in sorted(r.images.items()))} have no backing file")

    if resume is not None:
        _run(as_json, lambda: api.resume_live(resume, _state["uri"], max_speed, progress), render)
    else:
        _run(as_json, lambda: api.live_restore(Path(backup_dir or ""), Path(output_dir or ""), define or "", point,
                                               disk, _state["uri"],
                                               max_speed, progress, on_running), render)


@app.command()
def verify(backup_dir: str = typer.Argument(...),
           point: Optional[str] = typer.Option(None, "--point", help="only this point's chain (id, 'latest' "
                                               "or an ISO 8601 time)"),
           deep: bool = typer.Option(False, "--deep", help="also read every point's whole chain"),
           no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars on a terminal"),
           boot: bool = typer.Option(False, "--boot", help="restore drill: boot the point (default latest) as a "
                                     "throwaway domain on overlays; passes when its guest agent answers"),
           timeout: float = typer.Option(300, "--timeout", metavar="S", help="--boot: seconds for the agent to "
                                         "answer (and for --check to finish)"),
           check: Optional[str] = typer.Option(None, "--check", metavar="CMD", help="--boot: a shell command run "
                                               "in the booted guest through its agent; must exit 0"),
           key_file: Optional[str] = typer.Option(None, "--key-file", metavar="FILE",
                                                  help="passphrase of an encrypted backup ('-': stdin)"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Check every image: qemu-img check, backing links, content hashes recorded at backup time."""
    if boot:
        if deep:
            raise typer.BadParameter("--boot and --deep are separate runs", param_hint="--deep")
        return _drill(backup_dir, point, timeout, check, as_json)
    if check is not None:
        raise typer.BadParameter("--check needs --boot", param_hint="--check")

    def render(r: Any) -> None:
        if not as_json:
            for d in r.damage:
                _err(f"damaged: point {d.point} disk {d.disk} image {d.image}: {d.problem}")
            if r.ok:
                print(f"ok: {len(r.points)} point(s), {r.images_checked} image(s) verified"
                      + (f", {r.chains_read} chain(s) read end to end" if r.deep else ""))
        _fail(as_json, r.to_json(), r.failure, "verify-failed")

    def call() -> Any:
        from virtbackup.cli import progress
        key = _key(key_file)
        with progress.observed("verify", progress.wanted(as_json, no_progress)):
            return api.verify(backup_dir, point, deep, key=key)

    _run(as_json, call, render)


def _drill(backup_dir: str, point: Optional[str], timeout: float, check: Optional[str], as_json: bool) -> None:
    def render(r: Any) -> None:
        if not as_json:
            times = (f"running after {r.start_seconds:.2f}s" if r.start_seconds is not None else "did not start") + (
                f", guest agent answered after {r.agent_seconds:.2f}s" if r.agent_seconds is not None else "")
            if r.console:
                _err(f"console: {r.console}")
            if r.ok:
                what = f", check {r.check!r} exited 0" if r.check else ""
                print(f"ok: point {r.point} boots: {times}{what} (throwaway domain {r.domain} removed)")
            else:
                print(f"point {r.point}: {times} (throwaway domain {r.domain} removed)")
        _fail(as_json, r.to_json(), r.failure, "drill-failed")

    _run(as_json, lambda: api.drill(backup_dir, point, timeout, check, _state["uri"], _err), render)


@app.command()
def thaw(domain: str = typer.Argument(..., help="domain name or UUID"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Thaw a domain's filesystems through its guest agent (e.g. a run was killed while it was frozen)."""
    def render(r: Any) -> None:
        if as_json:
            print(json.dumps(r.to_json()))
            return
        print(f"thawed {r.filesystems} filesystem(s) of domain {r.domain}")
        if r.marker is not None:
            who = f"pid {r.marker.get('pid', '?')}, since {r.marker.get('since', '?')}"
            print(f"it had been frozen by a virtbackup run that did not finish ({who})"
                  + ("" if r.marker_removed else "; that run is still going"))

    _run(as_json, lambda: api.thaw(domain, _state["uri"]), render)


@app.command()
def prune(backup_dir: str = typer.Argument(...),
          keep: int = typer.Option(0, "--keep", metavar="N", help="keep the newest N points"),
          keep_daily: int = typer.Option(0, "--keep-daily", metavar="N",
                                         help="keep the newest point of each of the last N days with points (UTC)"),
          keep_weekly: int = typer.Option(0, "--keep-weekly", metavar="N",
                                          help="keep the newest point of each of the last N ISO weeks with points"),
          keep_monthly: int = typer.Option(0, "--keep-monthly", metavar="N",
                                           help="keep the newest point of each of the last N months with points (UTC)"),
          dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be kept, dropped and merged"),
          key_file: Optional[str] = typer.Option(None, "--key-file", metavar="FILE",
                                                 help="passphrase of an encrypted backup ('-': stdin)"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Drop old points; kept points that depend on dropped ones are merged so they restore unchanged."""
    def render(r: Any) -> None:
        plan = r.plan
        if as_json:
            print(json.dumps(r.to_json()))
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
            _err(f"warning: {w}")

    _run(as_json, lambda: api.prune(backup_dir, keep, keep_daily, keep_weekly, dry_run,
                                    keep_monthly=keep_monthly, key=_key(key_file)), render)


@app.command()
def flatten(image: str = typer.Argument(..., help="a qcow2 overlay, e.g. from restore --instant"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Copy an image's backing data into it and drop the backing link (it must not be in use)."""
    def render(r: Any) -> None:
        if as_json:
            print(json.dumps(r.to_json()))
        else:
            print(f"{r.image} is standalone")

    _run(as_json, lambda: api.flatten(image), render)


@app.command("run")
def run_cmd(job_file: Path = typer.Argument(..., metavar="JOBFILE",
                                            help="job file (TOML), e.g. /etc/virtbackup/nightly.toml"),
            domain: List[str] = typer.Option([], "--domain", metavar="NAME",
                                             help="only this domain of the job (repeatable)"),
            dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be done and why"),
            no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars on a terminal"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Back up every domain a job file selects (then prune), `parallel` at a time; exit 1 if any failed."""
    def render_plan(out: Any) -> None:
        job, planned = out.job, out.domains
        if as_json:
            print(json.dumps(out.to_json()))
            return
        for p in planned:
            if p.action == "backup":
                drops = f"; prune would drop {', '.join(p.prune_drops)}" if p.prune_drops else ""
                print(f"{p.domain}: would back up into {p.backup_dir}, level {p.level}: {p.why}{drops}")
            else:
                print(f"{p.domain}: would {'FAIL' if p.action == 'fail' else 'skip'}: {p.error}")
        print(f"dry run of job {job.name}: nothing was changed")

    def render(r: Any) -> None:
        if as_json:
            print(json.dumps(r.to_json()))
        else:
            print(f"{'DOMAIN':<24} {'STATUS':<8} {'LEVEL':<5} {'POINT':<6} {'BYTES':>10} {'SECONDS':>8}  ERROR")
            for d in r.domains:
                print(f"{d.domain:<24} {d.status:<8} {d.level or '-':<5} {d.point or '-':<6} "
                      f"{_human_size(d.bytes):>10} {d.seconds:>8.1f}  {d.error or ''}".rstrip())
        failed = [d for d in r.domains if d.status == "failed"]
        if not as_json:
            for d in r.domains:
                if d.status == "skipped" and not r.interrupted:
                    _err(f"note: {d.domain} skipped: {d.error}")
        if r.interrupted:
            _err(f"error: run of job {r.job} stopped by {r.interrupted}: running backups were aborted "
                 f"and rolled back, queued domains skipped")
        elif failed:
            _err(f"error: {len(failed)} of {len(r.domains)} domain(s) failed: "
                 + "; ".join(f"{d.domain}: {d.error}" for d in failed))
        if r.error:
            _err(f"error: {r.error}")
        if not r.ok:
            raise typer.Exit(EXIT_FAILED)

    def call() -> Any:
        from virtbackup.cli import progress
        job = api.load_job(job_file)
        if dry_run:
            return api.plan_job(job, _state["uri"], domain)
        if not progress.wanted(as_json, no_progress):
            return api.run_job(job, _state["uri"], domain)
        with progress.RunDisplay(_state["uri"]) as display:
            return api.run_job(job, _state["uri"], domain, display.watch)

    _run(as_json, call, render_plan if dry_run else render)

# --- files: single-file restore through libguestfs -----------------------------------------------
class _Spinner:
    """A spinner on stderr while the appliance starts; only on a terminal (logs stay clean)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._stop: Optional[Any] = None
        self._thread: Optional[Any] = None

    def __call__(self, msg: Optional[str]) -> None:
        if not self.tty:
            return
        self._end()
        if msg is None:
            return
        import threading
        import time
        stop = self._stop = threading.Event()

        def spin() -> None:
            start = time.monotonic()
            for ch in "|/-\\" * 100000:
                sys.stderr.write(f"\r{ch} {msg} {time.monotonic() - start:.0f}s ")
                sys.stderr.flush()
                if stop.wait(0.2):
                    break
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

        self._thread = threading.Thread(target=spin, daemon=True)
        self._thread.start()

    def _end(self) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._stop = self._thread = None


_FILES_ACTIONS = {"fs": (0, 0), "ls": (1, None), "get": (2, None), "cat": (1, None)}


@app.command(context_settings={"help_option_names": ["--help"]})
def files(backup_dir: Path = typer.Argument(..., help="the backup directory"),
          action: str = typer.Argument(..., metavar="fs|ls|get|cat", help="what to do"),
          args: List[str] = typer.Argument(None, metavar="[FS:PATH...] [DEST]",
                                           help="ls/cat: FS:PATH...; get: FS:PATH... DEST"),
          point: Optional[str] = typer.Option(None, "--point", help="point id, 'latest' (default), or an ISO "
                                              "8601 time: the newest point at or before it"),
          as_json: bool = typer.Option(False, "--json", help="fs, ls, get: the result as JSON")) -> None:
    """Browse and copy files out of a point without mounting anything on the host (libguestfs).

    fs: the filesystems (vda, vda1, vg/lv) with type, label, size. ls FS:PATH...: directory
    entries. get FS:PATH... DEST: copy files/trees out (mode, mtime, symlinks as links; never
    overwrites). cat FS:PATH...: file contents to stdout. Each call starts a libguestfs appliance
    (15-60 s under TCG; see README for LIBGUESTFS_BACKEND settings).
    """
    import signal
    args = list(args or [])
    lo_hi = _FILES_ACTIONS.get(action)
    problem = None
    if lo_hi is None:
        problem = f"unknown files action '{action}' (fs, ls, get or cat)"
    elif len(args) < lo_hi[0] or (lo_hi[1] is not None and len(args) > lo_hi[1]):
        problem = {"fs": "fs takes no paths", "ls": "ls needs FS:PATH...", "cat": "cat needs FS:PATH...",
                   "get": "get needs FS:PATH... DEST"}[action]
    elif action == "cat" and as_json:
        problem = "cat writes the files' bytes; it has no --json"
    if problem:
        _err(f"error: {problem} (see 'virtbackup files --help')")
        if as_json:
            print(json.dumps({"error": {"kind": "usage", "message": problem, "exit_code": 2}}))
        raise typer.Exit(2)

    def render(r: Any) -> None:
        if action == "fs":
            pid, fss = r
            if as_json:
                print(json.dumps(r.to_json()))
                return
            print(f"{'NAME':<16} {'TYPE':<12} {'LABEL':<16} {'SIZE':>10}  NOTE")
            for f in fss:
                note = "" if f.readable else ("encrypted" if "crypt" in f.type.lower() else "not readable")
                print(f"{f.name:<16} {f.type:<12} {f.label or '-':<16} {_human_size(f.size):>10}  {note}".rstrip())
        elif action == "ls":
            pid, listings = r
            if as_json:
                print(json.dumps(r.to_json()))
                return
            for i, lst in enumerate(listings):
                if len(listings) > 1:
                    print(("\n" if i else "") + f"{lst.path}:")
                for e in lst.entries:
                    link = f" -> {e.target}" if e.target is not None else ""
                    print(f"{e.type:<9} {e.mode} {e.size:>12} {e.mtime:<25} {e.name}{link}")
        elif action == "get":
            if as_json:
                print(json.dumps(r.to_json()))
            else:
                for c in r.copied:
                    what = (f"{c.files} file(s), {c.directories} dir(s), {c.symlinks} symlink(s), "
                            f"{_human_size(c.bytes)}" if c.type == "directory" else c.type)
                    print(f"{c.source} -> {c.dest} ({what})")
            for sk in r.skipped:
                _err(f"note: skipped {sk}: only files, directories and symlinks are copied")

    def call() -> Any:
        if action == "fs":
            return api.files_filesystems(backup_dir, point, spinner)
        if action == "ls":
            return api.files_ls(backup_dir, args, point, spinner)
        if action == "get":
            return api.files_get(backup_dir, args[:-1], Path(args[-1]), point, spinner)
        sys.stdout.flush()
        return api.files_cat(backup_dir, args, sys.stdout.buffer, point, spinner)

    def on_term(_s: int, _f: object) -> None:
        raise KeyboardInterrupt      # unwinds through the session: the appliance is shut down

    spinner = _Spinner()
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        _run(as_json, call, render)
    finally:
        spinner(None)
        signal.signal(signal.SIGTERM, old)


def _is(exc: BaseException, name: str) -> bool:
    """Match click's exceptions by class name: typer ships click itself or a vendored copy."""
    return any(c.__name__ == name for c in type(exc).__mro__)


def optional_quiesce_value(argv: List[str]) -> List[str]:
    """`backup ... --quiesce` alone means `--quiesce=require` (click has no optional option values).

    `--quiesce MODE` and `--quiesce=MODE` pass through; after `--` nothing is rewritten.
    """
    out = list(argv)
    if "backup" not in out:
        return out
    for i in range(out.index("backup") + 1, len(out)):
        if out[i] == "--":
            break
        if out[i] == "--quiesce" and (i + 1 >= len(out) or out[i + 1] not in QUIESCE_MODES):
            out[i] = "--quiesce=require"
    return out


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown: finalizing libvirt, lxml and typer's
    objects took ~40 ms of every command here, after the work was done. Nothing of ours runs at
    exit (no atexit handlers; files, locks and executors are closed by their `with` blocks), so
    flushing the output and the log handlers is all the teardown we need."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # e.g. stdout piped into `head`: the pipe is gone
            pass
    logging.shutdown()
    os._exit(code)


def main() -> None:
    """The `virtbackup` command. Exits the process (fast, see _exit_now): not for in-process use."""
    try:
        _main()
    except SystemExit as e:
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        _exit_now(code)
    _exit_now(0)


def _main() -> None:
    os.umask(0o077)   # images, metadata and restored disks hold guest data: private from birth
    try:
        rc = app(args=optional_quiesce_value(sys.argv[1:]), prog_name="virtbackup", standalone_mode=False)
    except Exception as e:
        ctx = getattr(e, "ctx", None)
        if _is(e, "NoArgsIsHelpError"):           # plain `virtbackup`: the help text
            print(ctx.get_help() if ctx else "")
            sys.exit(0)
        if _is(e, "UsageError"):
            # virsh-style: one line (the full usage is in --help), exit 2
            msg = " ".join(e.format_message().split())  # type: ignore[attr-defined]
            hint = f" (see '{ctx.command_path} --help')" if ctx else ""
            _err(f"error: {msg}{hint}")
            if "--json" in sys.argv:
                print(json.dumps({"error": {"kind": "usage", "message": msg, "exit_code": 2}}))
            sys.exit(2)
        if _is(e, "Abort"):
            _err("error: interrupted")
            sys.exit(EXIT_FAILED)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
