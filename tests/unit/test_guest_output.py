"""Hostile pass D12 and D13 without a guest: what the guest controls is escaped in human output
(`shown`, the render functions of `files` and `verify --boot`, every `say` line), and `files get`
keeps holes and refuses what would not fit (the copy and the size guard, fed a fake appliance)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import pytest

from virtbackup.cli._common import say, shown
from virtbackup.cli.files import render_fs, render_get, render_ls
from virtbackup.cli.verify import render_drill
from virtbackup.drill import DrillResult
from virtbackup.errors import NoSpace
from virtbackup.files import (
    Copied,
    Entry,
    Filesystem,
    FilesystemList,
    GetResult,
    GuestPath,
    Listing,
    ListResult,
    PointFiles,
    _Op,
    check_space,
    space_needed,
)

ESC = "\x1b"
HOSTILE = f"evil{ESC}]0;pwned\x07{ESC}[2J\rroot# \nfake line\u202egnp.exe"


def no_control(text: str) -> None:
    """Nothing in TEXT a terminal would act on: no C0/C1 control, DEL or bidi override."""
    bad = [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0x202A <= ord(c) <= 0x202E
           or 0x2066 <= ord(c) <= 0x2069]
    assert not bad, f"raw control characters {bad!r} in {text!r}"


# --- shown ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,expected", [
    ("plain name.txt", "plain name.txt"),
    ("é 漢字 ☃", "é 漢字 ☃"),                        # printable non-ASCII stays as it is
    ("a\x1b[31mred", "a\\x1b[31mred"),               # ESC: colours, cursor moves, titles
    ("line1\nline2", "line1\\nline2"),               # a forged second line
    ("over\rwrite", "over\\rwrite"),                 # back to the line's start
    ("tab\there", "tab\\there"),
    ("nul\x00bell\x07bs\x08", "nul\\x00bell\\x07bs\\x08"),
    ("del\x7f", "del\\x7f"),
    ("c1\x9b31m csi \x85 nel", "c1\\u009b31m csi \\u0085 nel"),  # 8-bit CSI and NEL
    ("\u202eexe.txt", "\\u202eexe.txt"),             # right-to-left override
    ("a\u202ab\u202bc\u202cd\u202de", "a\\u202ab\\u202bc\\u202cd\\u202de"),
    ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),  # isolates
    ("zero\u200bwidth", "zero\\u200bwidth"),          # other format characters
    ("line\u2028sep\u2029para", "line\\u2028sep\\u2029para"),
    ("nb\u00a0sp", "nb\\u00a0sp"),                   # a space that is not a space
    ("tag\U000e0041", "tag\\U000e0041"),
    ("back\\slash", "back\\\\slash"),                # doubled: an escape is always one
    ("\\x1b", "\\\\x1b"),                            # a name that *reads* like an escape
    ("bad\udcffbyte\udc80", "bad\\xffbyte\\x80"),    # surrogateescape'd non-UTF-8 bytes
    ("", ""),
])
def test_shown(raw, expected):
    assert shown(raw) == expected
    no_control(shown(raw))


def test_shown_is_unambiguous():
    """Different inputs that a terminal would show alike stay different."""
    inputs = ["\x1b", "\\x1b", "\\\x1b", "\x80", "\udc80", "\\x80", "\n", "\\n", "\u0085", "\\u0085"]
    assert len({shown(x) for x in inputs}) == len(inputs)


def test_shown_output_encodes_strictly():
    """Lone surrogates (a non-UTF-8 name) would make print() raise on a UTF-8 stdout; shown's don't."""
    shown("x\udcff\ud800y").encode("utf-8")


def test_say_escapes_and_stays_one_line(capsys):
    say(f"error: drill failed at check: check 'x' exited with 1: {HOSTILE}")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    no_control(err[:-1])
    assert "\\x1b]0;pwned\\x07" in err and "\\u202e" in err


# --- files: fs, ls, get --------------------------------------------------------------------------
def test_files_fs_rendering_escapes_the_label():
    fss = FilesystemList("0003", [Filesystem("vda1", "ext4", f"lab{ESC}[31mel\n", "u", 1 << 20, "vda", True),
                                  Filesystem("vda2", "crypto_LUKS", "", "", 1 << 20, "vda", False)])
    lines = render_fs(fss)
    assert len(lines) == 3
    for line in lines:
        no_control(line)
    assert "lab\\x1b[31mel\\n" in lines[1] and lines[2].endswith("encrypted")
    assert json.loads(json.dumps(fss.to_json()))["filesystems"][0]["label"] == f"lab{ESC}[31mel\n"  # JSON: raw


def test_files_ls_rendering_escapes_names_and_targets():
    listed = ListResult("0003", [
        Listing("vda:/srv", [Entry(HOSTILE, "file", 3, "0644", "2020-01-02T03:04:05+00:00"),
                             Entry("link", "symlink", 5, "0777", "2020-01-02T03:04:05+00:00", f"/x{ESC}[8m")]),
        Listing("vda:/etc", [Entry("ok.conf", "file", 1, "0644", "2020-01-02T03:04:05+00:00")]),
    ])
    lines = render_ls(listed)
    assert lines[0] == "vda:/srv:" and lines[3] == "" and lines[4] == "vda:/etc:"
    assert len(lines) == 6, lines           # one line per entry: a newline in a name forges none
    for line in lines:
        no_control(line)
    assert lines[1].endswith(shown(HOSTILE)) and lines[2].endswith("link -> /x\\x1b[8m")
    assert listed.to_json()["listings"][0]["entries"][0]["name"] == HOSTILE


def test_files_get_rendering_escapes_sources_dests_and_skipped():
    got = GetResult("0003", [Copied(f"vda:/{HOSTILE}", f"/tmp/out/{HOSTILE}", "file", files=1, bytes=3),
                             Copied("vda:/srv", "/tmp/out/srv", "directory", 2, 1, 0, 5000)],
                    [f"vda:/srv/fifo{ESC}[1A ({'fifo'})"])
    lines, notes = render_get(got)
    assert len(lines) == 2
    for line in lines:
        no_control(line)
    assert lines[0] == f"vda:/{shown(HOSTILE)} -> /tmp/out/{shown(HOSTILE)} (file)"
    assert "2 file(s), 1 dir(s), 0 symlink(s)" in lines[1]
    assert notes == [f"note: skipped vda:/srv/fifo{ESC}[1A (fifo): only files, directories and symlinks are copied"]


def test_files_get_cli_escapes_the_skipped_note(monkeypatch, capsys, tmp_path):
    """The whole command in human mode, the API replaced by a fake result."""
    from typer.testing import CliRunner

    from virtbackup.cli import app
    from virtbackup.cli import files as cli_files
    got = GetResult("0003", [Copied(f"vda:/a{ESC}[2J", str(tmp_path / "a"), "file", files=1, bytes=1)],
                    [f"vda:/f\n{ESC}[31m (fifo)"])
    monkeypatch.setattr(cli_files.api, "files_get", lambda *a, **k: got, raising=False)
    r = CliRunner().invoke(app, ["files", str(tmp_path), "get", "vda:/a", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    out = r.output
    no_control(out.replace("\n", ""))
    assert out.count("\n") == 2, out
    assert "vda:/a\\x1b[2J -> " in out and "skipped vda:/f\\n\\x1b[31m (fifo)" in out


# --- verify --boot -------------------------------------------------------------------------------
def test_drill_rendering_escapes_console_and_check_output(capsys):
    r = DrillResult("0003", "virtbackup-drill-1", False, stage="check",
                    message=f"check 'x' exited with 1: {ESC}[31mFAIL{ESC}[0m \u202e", start_seconds=1.0,
                    agent_seconds=2.0, check="x", check_exit=1, check_stdout=f"{ESC}[2J\n",
                    check_stderr=f"{ESC}[31mFAIL", console=f"Booting {ESC}[1;32mOK{ESC}[0m | \r\x9b2J")
    notes, lines = render_drill(r)
    assert notes == [f"console: {r.console}"]
    for line in lines:
        no_control(line)
    for note in notes:
        say(note)
    import typer

    from virtbackup.cli._common import fail
    with pytest.raises(typer.Exit):
        fail(False, r.to_json(), r.failure, "drill-failed")
    err = capsys.readouterr().err
    no_control(err.replace("\n", ""))
    assert err.count("\n") == 2
    assert "console: Booting \\x1b[1;32mOK\\x1b[0m | \\r\\u009b2J" in err
    assert "exited with 1: \\x1b[31mFAIL\\x1b[0m \\u202e" in err
    assert r.to_json()["check_stderr"] == f"{ESC}[31mFAIL"            # JSON keeps the raw bytes


def test_drill_rendering_passed_check_is_quoted():
    r = DrillResult("0003", "d", True, start_seconds=1.0, agent_seconds=2.0, check=f"echo {ESC}[2J", check_exit=0)
    notes, lines = render_drill(r)
    assert notes == [] and len(lines) == 1
    no_control(lines[0])
    assert "check 'echo \\x1b[2J' exited 0" in lines[0]


# --- files get: holes and the size guard (a fake appliance) -------------------------------------
class FakeGuest:
    """The libguestfs calls `get` makes, on files held in memory: {path: (stat, bytes)}."""

    def __init__(self, files: Dict[str, bytes], allocated: Dict[str, int]):
        self.files = files
        self.allocated = allocated
        self.preads = 0
        self.downloads = 0

    def lstatns(self, path: str) -> Dict[str, int]:
        return {"st_mode": 0o100644, "st_size": len(self.files[path]), "st_blocks": self.allocated[path] // 512,
                "st_atime_sec": 1, "st_atime_nsec": 0, "st_mtime_sec": 2, "st_mtime_nsec": 0}

    def pread(self, path: str, count: int, offset: int) -> bytes:
        assert count <= 4 << 20
        self.preads += 1
        return self.files[path][offset:offset + count]

    def download(self, path: str, dest: str) -> None:
        self.downloads += 1
        with open(dest, "wb") as f:
            f.write(self.files[path])


def fake_session(g: FakeGuest) -> PointFiles:
    pf = PointFiles.__new__(PointFiles)
    pf._g = g
    pf._mounted = "vda"
    pf.point = type("P", (), {"id": "0003"})()          # type: ignore[assignment]
    pf._resolve = lambda gp: (gp.path, g.lstatns(gp.path))   # type: ignore[method-assign]
    return pf


def test_get_writes_holes_as_holes(tmp_path):
    size = 64 << 20
    data = bytearray(size)
    data[5 << 20:(5 << 20) + 10] = b"0123456789"        # two small islands of data
    data[-3000:] = b"t" * 3000
    g = FakeGuest({"/big": bytes(data), "/dense": b"x" * 10000}, {"/big": 8192, "/dense": 12288})
    pf = fake_session(g)
    r = pf.get([(GuestPath("vda", "/big"), tmp_path / "big"), (GuestPath("vda", "/dense"), tmp_path / "dense")])
    assert [c.bytes for c in r.copied] == [size, 10000]
    st = os.stat(tmp_path / "big")
    assert st.st_size == size and (tmp_path / "big").read_bytes() == bytes(data)
    assert st.st_blocks * 512 <= 64 * 1024, f"{st.st_blocks * 512} bytes allocated for 2 blocks of data"
    assert (tmp_path / "dense").read_bytes() == b"x" * 10000 and g.downloads == 1    # not sparse: as before


def test_get_of_an_all_hole_file(tmp_path):
    g = FakeGuest({"/empty": bytes(8 << 20)}, {"/empty": 0})
    fake_session(g).get([(GuestPath("vda", "/empty"), tmp_path / "e")])
    st = os.stat(tmp_path / "e")
    assert st.st_size == 8 << 20 and st.st_blocks == 0


def ops(*items):
    return [_Op(kind, GuestPath("vda", "/x"), "/x", {"st_size": size, "st_blocks": blocks, "st_mode": 0},
                Path("/t")) for kind, size, blocks in items]


def test_space_needed_counts_sparse_files_by_their_data():
    # a 6 GiB file with 8 KiB allocated, a 10-byte file, a directory, a symlink
    need, inodes = space_needed(ops(("file", 6 << 30, 16), ("file", 10, 8), ("directory", 4096, 8),
                                    ("symlink", 11, 0)), 4096)
    assert need == 8192 + 4096 + 4096 and inodes == 4
    # allocated more than its length (preallocated): its length counts
    assert space_needed(ops(("file", 100, 64)), 4096)[0] == 4096


def test_check_space_refuses_what_does_not_fit(monkeypatch, tmp_path):
    class VFS:
        f_frsize = f_bsize = 4096
        f_bavail = 10           # 40 KiB free
        f_files = 1000
        f_favail = 3

    monkeypatch.setattr(os, "statvfs", lambda _p: VFS)
    check_space(ops(("file", 6 << 30, 16)), tmp_path)                   # 8 KiB of data: fits
    with pytest.raises(NoSpace) as ei:
        check_space(ops(("file", 1 << 20, 2048)), tmp_path)
    assert ei.value.exit_code == 2 and ei.value.kind == "no-space"
    assert "needs 1.0 MiB" in str(ei.value) and "has 40.0 KiB free; nothing was copied" in str(ei.value)
    with pytest.raises(NoSpace, match="4 files, directories and symlinks .* 3 free inodes"):
        check_space(ops(*[("file", 1, 8)] * 4), tmp_path)


def test_get_refused_by_the_guard_writes_nothing(monkeypatch, tmp_path):
    class VFS:
        f_frsize = f_bsize = 4096
        f_bavail = 1
        f_files = f_favail = 0

    monkeypatch.setattr(os, "statvfs", lambda _p: VFS)
    g = FakeGuest({"/a": b"x" * 9000}, {"/a": 12288})
    with pytest.raises(NoSpace):
        fake_session(g).get([(GuestPath("vda", "/a"), tmp_path / "a")])
    assert list(tmp_path.iterdir()) == [] and g.downloads == 0 and g.preads == 0
