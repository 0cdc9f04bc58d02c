"""`virtbackup files`: browse and copy files out of a point through libguestfs (no host mounts)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional, Tuple

import typer

from virtbackup.cli._common import PointOpt, api, command, emit, human_size, say, shown, usage

if TYPE_CHECKING:
    from virtbackup.files import FilesystemList, GetResult, ListResult


class _Spinner:
    """A spinner on stderr while the appliance starts; only on a terminal (logs stay clean)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def __call__(self, msg: Optional[str]) -> None:
        if not self.tty:
            return
        self._end()
        if msg is None:
            return
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


# --- human output: what the guest controls (names, labels, link targets) goes through shown() ----
def render_fs(fss: "FilesystemList") -> List[str]:
    """The lines of `files fs`."""
    lines = [f"{'NAME':<16} {'TYPE':<12} {'LABEL':<16} {'SIZE':>10}  NOTE"]
    for f in fss.filesystems:
        note = "" if f.readable else ("encrypted" if "crypt" in f.type.lower() else "not readable")
        lines.append(f"{shown(f.name):<16} {shown(f.type):<12} {shown(f.label) or '-':<16} "
                     f"{human_size(f.size):>10}  {note}".rstrip())
    return lines


def render_ls(listed: "ListResult") -> List[str]:
    """The lines of `files ls` (a header per path when several were listed)."""
    lines: List[str] = []
    listings = listed.listings
    for i, lst in enumerate(listings):
        if len(listings) > 1:
            lines.extend(([""] if i else []) + [f"{shown(lst.path)}:"])
        for e in lst.entries:
            link = f" -> {shown(e.target)}" if e.target is not None else ""
            note = f"  ({e.note})" if e.note else ""
            if e.type == "unknown" and e.note:      # a name the binding can't stat: nothing is known
                lines.append(f"{e.type:<9} {'?':<4} {'?':>12} {'?':<25} {shown(e.name)}{note}")
            else:
                lines.append(f"{e.type:<9} {e.mode} {e.size:>12} {e.mtime:<25} {shown(e.name)}{link}{note}")
    return lines


def render_get(got: "GetResult") -> Tuple[List[str], List[str]]:
    """The lines of `files get` on stdout, and its notes for stderr (say() escapes those)."""
    lines = []
    for c in got.copied:
        what = (f"{c.files} file(s), {c.directories} dir(s), {c.symlinks} symlink(s), "
                f"{human_size(c.bytes)}" if c.type == "directory" else c.type)
        lines.append(f"{shown(c.source)} -> {shown(c.dest)} ({what})")
    notes = [f"note: skipped {sk}: libguestfs's Python binding can't read a name or link target that is not UTF-8"
             if sk.endswith("not UTF-8)") else f"note: skipped {sk}: only files, directories and symlinks are copied"
             for sk in got.skipped]
    return lines, notes


# action: (fewest, most) arguments, and what to say when the count is wrong
_ACTIONS = {"fs": (0, 0, "fs takes no paths"), "ls": (1, None, "ls needs FS:PATH..."),
            "get": (2, None, "get needs FS:PATH... DEST"), "cat": (1, None, "cat needs FS:PATH...")}


def _on_term(_s: int, _f: object) -> None:
    raise KeyboardInterrupt      # unwinds through the session: the appliance is shut down


@command(context_settings={"help_option_names": ["--help"]})
def files(backup_dir: Annotated[Path, typer.Argument(metavar="BACKUP_DIR", help="the backup directory",
                                                     show_default=False)],
          action: Annotated[str, typer.Argument(metavar="fs|ls|get|cat", help="what to do", show_default=False)],
          args: Annotated[Optional[List[str]], typer.Argument(
              metavar="[FS:PATH...] [DEST]", help="ls/cat: FS:PATH...; get: FS:PATH... DEST",
              show_default=False)] = None,
          point: PointOpt = None,
          as_json: Annotated[bool, typer.Option("--json", help="fs, ls, get: the result as JSON")] = False) -> None:
    """Browse and copy files out of a point without mounting anything on the host (libguestfs).

    fs: the filesystems (vda, vda1, vg/lv) with type, label, size. ls FS:PATH...: directory
    entries. get FS:PATH... DEST: copy files/trees out (mode, mtime, symlinks as links; never
    overwrites). cat FS:PATH...: file contents to stdout. Each call starts a libguestfs appliance
    (15-60 s under TCG; see docs/guide.md for LIBGUESTFS_BACKEND settings).
    """
    paths = list(args or [])
    spec = _ACTIONS.get(action)
    if spec is None:
        raise usage(f"unknown files action '{action}' (fs, ls, get or cat) (see 'virtbackup files --help')")
    lo, hi, problem = spec
    if len(paths) < lo or (hi is not None and len(paths) > hi):
        raise usage(f"{problem} (see 'virtbackup files --help')")
    if action == "cat" and as_json:
        raise usage("cat writes the files' bytes; it has no --json (see 'virtbackup files --help')")

    spinner = _Spinner()
    old = signal.signal(signal.SIGTERM, _on_term)
    try:
        if action == "fs":
            fss = api.files_filesystems(backup_dir, point, spinner)
            spinner(None)
            if as_json:
                emit(fss.to_json())
                return
            print("\n".join(render_fs(fss)))
        elif action == "ls":
            listed = api.files_ls(backup_dir, paths, point, spinner)
            spinner(None)
            if as_json:
                emit(listed.to_json())
                return
            for line in render_ls(listed):
                print(line)
        elif action == "get":
            got = api.files_get(backup_dir, paths[:-1], Path(paths[-1]), point, spinner)
            spinner(None)
            lines, notes = render_get(got)
            if as_json:
                emit(got.to_json())
            else:
                for line in lines:
                    print(line)
            for note in notes:
                say(note)
        else:
            sys.stdout.flush()
            api.files_cat(backup_dir, paths, sys.stdout.buffer, point, spinner)
    finally:
        spinner(None)
        signal.signal(signal.SIGTERM, old)
