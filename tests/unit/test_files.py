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
    os.symlink(tmp_path / "missing", dest / "dangling")   # not /nonexistent: a host may have one
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
    from virtbackup.cli import files as cli
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


def test_results_to_json_match_their_schemas():
    """Every files result renders with to_json() to what its schema (schemas/files-*.schema.json)
    describes; `fs` and `ls` results still unpack as (point, items)."""
    import json

    from tests.support.schemas import validate
    from virtbackup.files import Copied, Entry, Filesystem, FilesystemList, GetResult, Listing, ListResult
    fss = FilesystemList("0003", [Filesystem("vda1", "ext4", "boot", "u-1", 1 << 20, "vda", True),
                                  Filesystem("vg/lv", "crypto_LUKS", "", "", 0, None, False)])
    point, items = fss
    assert point == "0003" and items[1].disk is None
    out = validate("files-fs", json.loads(json.dumps(fss.to_json())))
    assert out["filesystems"][0] == {"name": "vda1", "type": "ext4", "label": "boot", "uuid": "u-1",
                                     "size": 1 << 20, "disk": "vda", "readable": True}
    ls = ListResult("0001", [Listing("vda:/etc", [Entry("a", "file", 3, "0644", "2020-01-02T03:04:05+00:00"),
                                                  Entry("l", "symlink", 4, "0777", "2020-01-02T03:04:05.5+00:00",
                                                        "/etc")])])
    out = validate("files-ls", json.loads(json.dumps(ls.to_json())))
    assert out["listings"][0]["entries"][0]["target"] is None and out["listings"][0]["entries"][1]["target"] == "/etc"
    got = GetResult("0001", [Copied("vda:/srv", "/tmp/x/srv", "directory", 2, 1, 1, 10)], ["vda:/srv/f (fifo)"])
    out = validate("files-get", json.loads(json.dumps(got.to_json())))
    assert out["copied"][0]["bytes"] == 10 and out["skipped"] == ["vda:/srv/f (fifo)"]


# --- names that are not UTF-8 (issue 22: one such name made its whole directory unreadable) ------
class FakeGuestfs:
    """What the libguestfs binding does with a directory holding names that are not UTF-8 (seen
    on the real one): `ls`, `readdir` and `readlinklist` decode strictly and raise; `ls0` writes
    the raw names; the calls that take names crash the process on one that is not UTF-8 (here:
    an assertion)."""

    def __init__(self, entries):
        self.entries = entries          # raw name -> (st_mode, raw symlink target or None)

    @staticmethod
    def _check(*names):
        for n in names:
            n.encode("utf-8")          # a surrogate here segfaulted the real binding

    def ls(self, path):
        return sorted(n.decode() for n in self.entries)

    def ls0(self, path, out):
        with open(out, "wb") as f:
            f.write(b"\0".join(self.entries) + b"\0")

    def lstatnslist(self, path, names):
        self._check(path, *names)
        return [{"st_mode": self.entries[n.encode()][0], "st_size": 7, "st_mtime_sec": 0, "st_mtime_nsec": 0}
                for n in names]

    def readlinklist(self, path, names):
        self._check(path, *names)
        return [(self.entries[n.encode()][1] or b"").decode() for n in names]

    def readlink(self, path):
        self._check(path)
        return self.entries[path.rsplit("/", 1)[1].encode()][1].decode()


def test_a_name_that_is_not_utf8_leaves_the_rest_of_its_directory_listed(tmp_path, monkeypatch):
    import json
    import stat as st

    from tests.support.schemas import validate
    from virtbackup.cli.files import render_get, render_ls
    from virtbackup.files import GetResult, Listing, ListResult, PointFiles, _entry

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    pf = PointFiles.__new__(PointFiles)
    pf._g = FakeGuestfs({b"good": (st.S_IFREG | 0o644, None), b"\xffbad\x1b[2J": (st.S_IFREG | 0o600, None),
                         b"ln": (st.S_IFLNK | 0o777, b"/t\xfe"), b"ok-ln": (st.S_IFLNK | 0o777, b"/etc")})
    entries = {n: _entry(n, s, t) for n, s, t in pf._entries("/d")}
    assert sorted(entries) == sorted(["good", "\udcffbad\x1b[2J", "ln", "ok-ln"])
    assert entries["good"].type == "file" and entries["ok-ln"].target == "/etc"
    bad = entries["\udcffbad\x1b[2J"]
    assert bad.type == "unknown" and "not UTF-8" in (bad.note or "")
    ln = entries["ln"]
    assert ln.type == "symlink" and ln.target is None and "target is not UTF-8" in (ln.note or "")
    assert list(tmp_path.iterdir()) == [], "ls0's temp dir is removed"
    # JSON: ASCII text, valid against the schema, the guest's bytes recoverable
    listed = ListResult("0001", [Listing("vda:/d", list(entries.values()))])
    text = json.dumps(listed.to_json())
    assert text.isascii()
    names = [e["name"] for e in validate("files-ls", json.loads(text))["listings"][0]["entries"]]
    assert os.fsencode("\udcffbad\x1b[2J") in [os.fsencode(n) for n in names]
    assert "note" not in json.loads(text)["listings"][0]["entries"][names.index("good")]
    # human output: escaped, never raw bytes or ESC
    lines = render_ls(listed)
    assert any("\\xffbad\\x1b[2J" in ln for ln in lines) and not any("\x1b" in ln for ln in lines)
    "\n".join(lines).encode("utf-8")        # printable to a UTF-8 terminal
    _lines, notes = render_get(GetResult("0001", [], ["vda:/d/\udcffbad (name not UTF-8)"]))
    assert "not UTF-8" in notes[0]


def test_a_path_that_is_not_utf8_is_refused_before_the_appliance():
    with pytest.raises(GuestPathError, match="not UTF-8"):
        parse_guest_path("vda:/etc/\udcffx")
