"""Pure logic of `virtbackup files`: FS:PATH parsing, where `get` puts things, the spinner."""

from __future__ import annotations

import os
import pty
import sys
import time

import pytest

from virtbackup.errors import GuestPathError, OutputExists, UsageError
from virtbackup.files import GuestPath, parse_guest_path, plan_get


@pytest.mark.parametrize("spec,fs,path", [
    ("vda:/etc/fstab", "vda", "/etc/fstab"),
    ("vda1:etc//fstab/", "vda1", "/etc/fstab"),
    ("vg0/root:/./var/log", "vg0/root", "/var/log"),
    ("vda:", "vda", "/"),
    ("vda:/", "vda", "/"),
    ("vdb2:/a:b", "vdb2", "/a:b"),              # only the first colon separates
])
def test_parse(spec, fs, path):
    assert parse_guest_path(spec) == GuestPath(fs, path)


@pytest.mark.parametrize("spec,text", [
    ("vda", "is not FS:PATH"), (":/etc", "is not FS:PATH"),
    ("vda:/../etc", "contains '..'"), ("vda:/etc/..", "contains '..'"), ("vda:a/../../b", "contains '..'"),
    ("../x:/a", "is not a filesystem name"), ("vg/lv/x:/a", "is not a filesystem name"),
    ("/dev/sda:/a", "is not a filesystem name"), ("vda:/a\0b", "NUL"),
])
def test_parse_refused(spec, text):
    with pytest.raises(GuestPathError) as ei:
        parse_guest_path(spec)
    assert ei.value.exit_code == 2 and text in str(ei.value)


def test_basename_of_a_root_is_the_filesystem():
    assert parse_guest_path("vg0/root:/").basename == "vg0-root"
    assert parse_guest_path("vda1:/etc").basename == "etc"


def test_plan_get(tmp_path):
    bdir = tmp_path / "bk"
    bdir.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    assert plan_get(["vda:/etc/a", "vdb1:/"], dest, bdir) == [
        (GuestPath("vda", "/etc/a"), dest / "a"), (GuestPath("vdb1", "/"), dest / "vdb1")]
    assert plan_get(["vda:/etc/a"], dest / "new", bdir) == [(GuestPath("vda", "/etc/a"), dest / "new")]
    (dest / "a").write_text("x")
    with pytest.raises(OutputExists):
        plan_get(["vda:/etc/a"], dest, bdir)
    os.symlink("/nonexistent", dest / "dangling")
    with pytest.raises(OutputExists):              # a dangling symlink is there too: never written through
        plan_get(["vda:/x"], dest / "dangling", bdir)
    with pytest.raises(UsageError, match="not an existing directory"):
        plan_get(["vda:/x", "vda:/y"], dest / "nope", bdir)
    with pytest.raises(UsageError, match="inside the backup directory"):
        plan_get(["vda:/x"], bdir, bdir)
    os.symlink(bdir, tmp_path / "via-link")
    with pytest.raises(UsageError, match="inside the backup directory"):
        plan_get(["vda:/x"], tmp_path / "via-link" / "points", bdir)
    with pytest.raises(UsageError, match="would both be copied"):
        plan_get(["vda:/x", "vdb:/y/x"], dest, bdir)
    with pytest.raises(UsageError, match="is not an existing directory"):
        plan_get(["vda:/x"], tmp_path / "no" / "such", bdir)


def test_spinner_only_on_a_terminal(monkeypatch):
    from virtbackup import cli
    r, w = os.pipe()
    monkeypatch.setattr(sys, "stderr", os.fdopen(w, "w"))
    sp = cli._Spinner()
    sp("starting")
    time.sleep(0.3)
    sp(None)
    sys.stderr.close()
    assert os.read(r, 1000) == b""
    os.close(r)

    master, slave = pty.openpty()
    monkeypatch.setattr(sys, "stderr", os.fdopen(slave, "w"))
    sp = cli._Spinner()
    sp("starting the appliance")
    time.sleep(0.3)
    sp(None)
    sys.stderr.flush()
    import select
    out = b""
    while select.select([master], [], [], 1.0)[0]:
        out += os.read(master, 4096)
    assert b"starting the appliance" in out and out.endswith(b"\r\x1b[K")
    sys.stderr.close()
    os.close(master)
