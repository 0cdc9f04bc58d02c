"""The man page, --version and shell completion come from the CLI itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virtbackup import __version__

ROOT = Path(__file__).resolve().parent.parent.parent
CLI = [sys.executable, "-m", "virtbackup.cli"]


def commands() -> list:
    import click
    import typer

    from virtbackup.cli import app
    group = typer.main.get_command(app)
    out = []
    for n in group.list_commands(None):  # type: ignore[attr-defined]
        cmd = group.get_command(None, n)  # type: ignore[attr-defined]
        if cmd.hidden:
            continue
        if isinstance(cmd, click.Group):      # a group's sub-commands: "offsite push", ...
            out += [f"{n} {s}" for s in cmd.list_commands(None) if not cmd.get_command(None, s).hidden]
        else:
            out.append(n)
    return out


def test_man_page_is_what_the_cli_says():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gen-manpage.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
def test_man_renders_every_command_and_option():
    env = {k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"}
    env["MANWIDTH"] = "200"
    r = subprocess.run(["man", "-l", str(ROOT / "docs/virtbackup.1")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    text = r.stdout.replace("\u2010", "-")
    for name in commands():
        assert f"virtbackup {name} [OPTIONS]" in text, name
    for opt in ("--key-file FILE", "--keep-monthly N", "--resume-live NAME", "--boot", "--dry-run", "--connect"):
        assert opt in text, opt
    assert __version__ in text


def test_version():
    r = subprocess.run([*CLI, "--version"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"virtbackup {__version__}\n")


def test_shell_completion():
    env = dict(os.environ, _VIRTBACKUP_COMPLETE="bash_source")
    r = subprocess.run([*CLI], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "complete -o nosort -F _virtbackup_completion virtbackup" in r.stdout, r
    env = dict(os.environ, _VIRTBACKUP_COMPLETE="bash_complete", COMP_WORDS="virtbackup re", COMP_CWORD="1")
    r = subprocess.run([*CLI], capture_output=True, text=True, env=env)
    assert set(r.stdout.split()) == {"plain,restore", "plain,repair"}, r
    env.update(COMP_WORDS="virtbackup prune --keep-", COMP_CWORD="2")
    r = subprocess.run([*CLI], capture_output=True, text=True, env=env)
    assert {"plain,--keep-daily", "plain,--keep-monthly"} <= set(r.stdout.split()), r
