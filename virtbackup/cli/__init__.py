"""virsh-style command line: parses, calls virtbackup.api, renders text or JSON. No libvirt here.

One module per command or group (backup, restore, verify, chain: list/prune, host: status/repair/
thaw, run, files); what they share (the app, the error boundary, JSON, exit codes, options) is
_common.py. The API raises only VirtBackupError (errors.py); anything else is a bug and is
reported as one "internal error" line (VIRTBACKUP_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, List, NoReturn, Optional

# _common first: it imports typer with rich hidden (start-up time); then the command modules register
from virtbackup.cli._common import Options, app, emit, enable_debug, error_json, say  # isort: skip
from virtbackup.cli import backup, chain, files, host, offsite, restore, run, verify  # noqa: F401,E402  # isort: skip

import typer  # noqa: E402

from virtbackup import __version__  # noqa: E402

# the app and its boundary first; then every command module registers its commands on it
from virtbackup.errors import EXIT_FAILED, EXIT_USAGE  # noqa: E402
from virtbackup.options import QUIESCE_MODES  # noqa: E402

COMPLETE_VAR = "_VIRTBACKUP_COMPLETE"


def _version(value: bool) -> None:
    if value:
        print(f"virtbackup {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_opts(ctx: typer.Context,
              connect: Annotated[Optional[str], typer.Option(
                  "--connect", "-c", metavar="URI",
                  help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")] = None,
              debug: Annotated[bool, typer.Option(
                  "--debug", "-v", help="print every command run, QMP command and libvirt call (with its XML) and "
                  "timings on stderr")] = False,
              version: Annotated[bool, typer.Option(
                  "--version", is_eager=True, callback=_version, help="print the version and exit")] = False) -> None:
    if connect is not None and not connect.strip():
        # libvirt takes "" for its default URI: a silently different host than asked for
        say("error: --connect needs a URI, not an empty string")
        raise typer.Exit(EXIT_USAGE)
    ctx.obj = Options(uri=connect, debug=debug)
    if debug:
        enable_debug()


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


def _complete(instruction: str) -> int:
    """Shell completion, click's protocol: `eval "$(_VIRTBACKUP_COMPLETE=bash_source virtbackup)"`
    (zsh_source, fish_source). typer's own completion needs its --install-completion machinery."""
    from click.shell_completion import shell_complete
    return shell_complete(typer.main.get_command(app), {}, "virtbackup", COMPLETE_VAR, instruction)


def _main() -> None:
    os.umask(0o077)   # images, metadata and restored disks hold guest data: private from birth
    if os.environ.get(COMPLETE_VAR):
        sys.exit(_complete(os.environ[COMPLETE_VAR]))
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
            say(f"error: {msg}{hint}")
            if "--json" in sys.argv:
                emit(error_json("usage", msg, EXIT_USAGE))
            sys.exit(EXIT_USAGE)
        if _is(e, "Abort"):
            say("error: interrupted")
            sys.exit(EXIT_FAILED)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)

