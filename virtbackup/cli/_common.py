"""What every command shares: the app, the error boundary, JSON and exit codes, shared options.

One decorator (`command`) registers a command and gives it the boundary borgbackup's archiver
gives its commands: every `VirtBackupError` becomes one `virtbackup: error: ...` line on stderr,
with `--json` also an `{"error": {...}}` object on stdout, and the error's exit code; Ctrl-C is
"interrupted" (exit 1); anything else is a bug, reported as one "internal error" line (the
traceback with --debug or VIRTBACKUP_DEBUG=1). Usage errors found after parsing are raised as
`errors.UsageError` like every other error, so they take the same path (exit 2).

No libvirt here, and no virtbackup.api at import time: `--help`, `--version` and usage errors stay
fast; the API is imported on the first call that needs it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar


def _import_typer_without_rich() -> None:
    """typer imports rich (~0.1 s) at start-up when it is installed, only to format help.

    rich is installed for the progress bars, which import it lazily on a TTY; hide it while
    typer loads so `--help`, `list` and usage errors stay fast (typer then formats help the
    plain click way)."""
    hidden = "rich" not in sys.modules
    if hidden:
        sys.modules["rich"] = None  # type: ignore[assignment]   # `import rich` -> ImportError
    try:
        import typer  # noqa: F401
    finally:
        if hidden:
            del sys.modules["rich"]


_import_typer_without_rich()
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from virtbackup.errors import EXIT_FAILED, EXIT_USAGE, UsageError, VirtBackupError  # noqa: E402

log = logging.getLogger("virtbackup.cli")


class _LazyAPI:
    """virtbackup.api (libvirt, lxml, tenacity) imported on first use."""

    def __getattr__(self, name: str) -> Any:
        from virtbackup import api as real
        return getattr(real, name)


if TYPE_CHECKING:       # the checker sees the real module and its signatures
    from virtbackup import api
else:
    api = _LazyAPI()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Full, incremental and differential backups of libvirt/QEMU domains.",
                  context_settings={"help_option_names": ["-h", "--help"]})


@dataclass
class Options:
    """The global options (before the command), handed to every command through click's context."""

    uri: Optional[str] = None
    debug: bool = False


def options(ctx: typer.Context) -> Options:
    obj = ctx.find_object(Options)
    return obj if obj is not None else Options()


# --- shared option definitions (one help text each) -----------------------------------------------
AsJson = Annotated[bool, typer.Option("--json", help="print the result as JSON (schemas/ has its schema)")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bars on a terminal")]
KeyFile = Annotated[Optional[str], typer.Option("--key-file", metavar="FILE",
                                                help="passphrase of an encrypted backup ('-': stdin)")]
PointOpt = Annotated[Optional[str], typer.Option(
    "--point", help="point id, 'latest' (default), or an ISO 8601 time: the newest point at or before it "
    "(no offset = UTC)")]
Disks = Annotated[List[str], typer.Option("--disk", metavar="DISK",
                                          help="only this disk (target name, e.g. vda; repeatable)")]
Domain = Annotated[str, typer.Argument(help="domain name or UUID", show_default=False)]
BackupDirArg = Annotated[str, typer.Argument(metavar="BACKUP_DIR", help="directory holding one domain's backups",
                                             show_default=False)]
MaxSpeed = Annotated[Optional[int], typer.Option("--max-speed", metavar="BYTES",
                                                 help="copy at most BYTES per second per disk")]


# --- output ------------------------------------------------------------------------------------
_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: str) -> str:
    """TEXT made safe for a terminal: what a guest (or anyone) controls, escaped for human output.

    File names, labels, console and check output come from the guest; printed raw, an ESC or a
    newline in them would drive the user's terminal (colours, cursor moves, a forged line). Every
    character Python does not call printable becomes a visible escape: `\\n`, `\\r`, `\\t`,
    `\\xNN` for the other C0 controls and DEL, `\\uNNNN` (or `\\UNNNNNNNN`) for C1 controls,
    bidi overrides (U+202A-U+202E, U+2066-U+2069), other format characters and non-space
    separators; a byte that was not UTF-8 (decoded with surrogateescape, U+DC80-U+DCFF) is
    `\\xNN` with NN >= 80, so it never looks like U+00NN. A backslash is doubled, so an escape is
    always one. The space stays a space. JSON output keeps the raw value (JSON escapes itself)."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif 0xDC80 <= o <= 0xDCFF:          # surrogateescape: the raw byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def say(msg: str) -> None:
    """A line for the user on stderr: `virtbackup: MSG` (errors, warnings, notes). MSG goes through
    `shown`: it may quote what a guest controls (a file name, an agent's or a check's message), and
    it stays one line."""
    try:
        print(f"virtbackup: {shown(msg)}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        # stderr on a full device, a closed pipe (the `run` that started us was killed): the
        # operation goes on (a frozen guest is thawed, a job finishes or rolls back); the run log has it
        pass


def emit(data: Dict[str, Any]) -> None:
    """The one JSON object of a --json command, on stdout."""
    print(json.dumps(data), flush=True)


def error_json(kind: str, message: str, exit_code: int) -> Dict[str, Any]:
    return {"error": {"kind": kind, "message": message, "exit_code": exit_code}}


def fail(as_json: bool, out: Dict[str, Any], message: Optional[str], kind: str) -> None:
    """Print a result that carries its own failure (verify damage, a failed drill or repair):
    the JSON with an "error" member, then the one error line and exit 1. No failure: the JSON only."""
    if as_json:
        emit({**out, **error_json(kind, message, EXIT_FAILED)} if message else out)
    if message:
        say(f"error: {message}")
        raise typer.Exit(EXIT_FAILED)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def read_key(spec: Optional[str]) -> Any:
    """The key from --key-file, read before anything else happens (None: no --key-file)."""
    return api.read_key(spec) if spec is not None else None


# --- the error boundary ------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., None])


def _boundary(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = bool(kwargs.get("as_json"))
        try:
            fn(*args, **kwargs)
        except VirtBackupError as e:
            say(f"error: {e}")
            if as_json:
                emit(error_json(e.kind, str(e), e.exit_code))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            say("error: interrupted")
            if as_json:
                emit(error_json("interrupted", "interrupted", EXIT_FAILED))
            raise typer.Exit(EXIT_FAILED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            # A bug (the API raises only VirtBackupError): still one line, exit 1, no traceback
            # unless VIRTBACKUP_DEBUG=1 or --debug asks for it.
            if os.environ.get("VIRTBACKUP_DEBUG") or logging.getLogger("virtbackup").isEnabledFor(logging.DEBUG):
                raise
            msg = " ".join(f"internal error: {type(e).__name__}: {e} (VIRTBACKUP_DEBUG=1 shows where)".split())
            say(f"error: {msg}")
            if as_json:
                emit(error_json("internal", msg, EXIT_FAILED))
            raise typer.Exit(EXIT_FAILED) from None
    return wrapper  # type: ignore[return-value]


def command(name: Optional[str] = None, **settings: Any) -> Callable[[F], F]:
    """Register a command with the error boundary around it."""
    def deco(fn: F) -> F:
        app.command(name, **settings)(_boundary(fn))
        return fn
    return deco


def usage(msg: str) -> UsageError:
    """A usage error found after parsing (raise it): one line, exit 2, like click's own."""
    return UsageError(msg)


# --- --debug -----------------------------------------------------------------------------------
class _Elapsed(logging.Formatter):
    """Debug lines on stderr, each with the seconds since the command started."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        return (f"virtbackup: debug: {time.monotonic() - self.t0:7.3f}s {record.name.removeprefix('virtbackup.')}: "
                f"{record.getMessage()}")


def enable_debug() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Elapsed())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger("virtbackup")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    log.debug("argv %s", sys.argv)


__all__ = ["EXIT_USAGE", "AsJson", "BackupDirArg", "Disks", "Domain", "KeyFile", "MaxSpeed", "NoProgress",
           "Options", "PointOpt", "api", "app", "command", "emit", "enable_debug", "error_json", "fail",
           "human_size", "options", "read_key", "say", "shown", "usage"]
