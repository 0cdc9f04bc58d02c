"""Single-file restore through a real libguestfs appliance, from real offline backups.

One shut-off scratch domain for the module: vda is an ext4 made with `mkfs.ext4 -d`, vdb starts
blank. Between the offline backups libguestfs itself (a writable appliance on the domain's own
images, the domain off) changes files on vda, and before point 2 lays out vdb: two ext4
partitions, an LVM volume, a LUKS header and an empty partition. Points: 0001 full, 0002 inc,
0003 diff. Appliance launches are the cost (15-20 s each on an idle host, minutes under heavy
load), so there are five: two writable ones that make the points, and three readers started
together on the backup dir (the shared lock lets them): API sessions at 0001 and 0003 and one CLI
`get` at 0003, each doing several things. Everything refused before the appliance starts is
checked without one. Whatever happens, the module's end kills what its appliances left running
(found by their private temp dir) and removes its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tests.support.helpers import CLIResult, cli, guest_data_byte, one_error_line
from tests.support.schemas import validate, validate_output
from virtbackup.files import FilesystemList, ListResult

MiB = 1 << 20
T1 = 1577934245          # 2020-01-02T03:04:05Z
T2 = 1609459200          # 2021-01-01T00:00:00Z
VG = "vbvg"
BLOB1 = bytes(range(256)) * 1200 + b"tail-1"      # ~300 KiB, crosses many blocks
BLOB3 = b"\x00\xffv3" * 70000
# a sparse file in point 3 (hostile pass D13): 1 GiB long, a few KiB of data
SPARSE_SIZE = 1 << 30
SPARSE_DATA = ((123 * MiB + 17, b"island in the middle"), (SPARSE_SIZE - 5000, b"tail!" * 1000))


class FileModel:
    """What a point holds, per guest path: (kind, content or link target, mode, mtime)."""

    def __init__(self) -> None:
        self.items: Dict[str, Tuple[str, bytes, int, int]] = {}

    def copy(self) -> "FileModel":
        m = FileModel()
        m.items = dict(self.items)
        return m


def guestfs_env(tmp: Path) -> Dict[str, str]:
    """TCG settings (README) and private temp/socket dirs so leftovers can be seen."""
    (tmp / "gtmp").mkdir(exist_ok=True)
    (tmp / "grun").mkdir(exist_ok=True, mode=0o700)
    return {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
            "LIBGUESTFS_TMPDIR": str(tmp / "gtmp"), "XDG_RUNTIME_DIR": str(tmp / "grun")}


def writable_appliance(images: List[Path]):
    import guestfs
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        for img in images:
            g.add_drive_opts(str(img), format="qcow2")
        g.launch()
    except BaseException:
        g.close()
        raise
    return g


def luks_header() -> bytes:
    """A LUKS1 header (magic, version, cipher, uuid): blkid calls the partition crypto_LUKS.
    Not a usable LUKS volume (luksFormat costs ~25 s under TCG); the tool refuses either alike."""
    return (b"LUKS\xba\xbe" + struct.pack(">H", 1) + b"aes".ljust(32, b"\0") + b"xts-plain64".ljust(32, b"\0")
            + b"sha256".ljust(32, b"\0") + struct.pack(">II", 4096, 32) + b"\0" * 52 + struct.pack(">I", 1000)
            + b"3b6f2bb0-5a2d-4b43-9a0e-0d7a7f3e2a11".ljust(40, b"\0"))


def dir_state(path: Path) -> Dict[str, Tuple[str, int]]:
    """SHA-256 and mtime (ns) of every file of the backup dir but the lock."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".virtbackup.lock":
            out[str(p.relative_to(path))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def processes_mentioning(text: str) -> List[str]:
    """'pid: command line' of every process but this one whose command line contains `text`."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{d.name}: {cmd}")
    return found


def kill_leftovers(base: Path) -> List[str]:
    """SIGKILL what this module left running (appliance QEMUs name its disks or its private
    libguestfs temp dir on their command line; a CLI its backup dir), by pid; remove their
    libguestfs socket dirs (root's are always /tmp/libguestfsXXXXXX, named on QEMU's command line)
    and empty the private temp dirs. Returns what was killed, for the report."""
    import re
    import signal
    killed = processes_mentioning(str(base))
    for line in killed:
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
        for sockdir in re.findall(r"path=(/tmp/libguestfs[A-Za-z0-9]{6})/", line):
            shutil.rmtree(sockdir, ignore_errors=True)
    for sub in ("gtmp", "grun"):
        for p in (base / sub).glob("*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
    return killed


LIBVIRTD_GONE = ("client socket is closed", "Cannot recv data", "End of file while reading data",
                 "Failed to connect socket")


def take_backup(dom_name: str, bdir: Path, level: str) -> dict:
    """An offline `backup --json` that must succeed. Tried a second time only when libvirtd went
    away under it (other tests on a shared host restart libvirtd); a failed backup leaves the
    chain as it was, so the retry takes the same point."""
    for attempt in (1, 2):
        # compressed (issue 24): every files test reads a zstd chain; the reader is QEMU's either way
        r = cli("backup", dom_name, bdir, "--level", level, "--compress", "zstd", "--json")
        if r.rc != 0 and attempt == 1 and any(m in r.err for m in LIBVIRTD_GONE):
            print(f"\nlibvirtd went away during a backup, retrying once: {r.err.strip()}")
            time.sleep(5)
            continue
        assert r.rc == 0, r
        return r.json()
    raise AssertionError("unreachable")


class Setup:
    def __init__(self, base: Path, bdir: Path, name: str, models: Dict[str, Dict[str, FileModel]],
                 disk_images: Dict[str, Path]):
        self.base = base
        self.bdir = bdir
        self.name = name
        self.models = models          # point -> fs name -> model
        self.disk_images = disk_images
        self.launches: List[float] = []
        self.state_before: Dict[str, Tuple[str, int]] = {}


@pytest.fixture(scope="module")
def files_setup(tmp_path_factory) -> Iterator[Setup]:
    from tests.support import scratch
    from virtbackup.virt import host
    base = tmp_path_factory.mktemp("files")
    env = guestfs_env(base)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    conn = host.connect()
    d = scratch.ScratchDomain(conn, f"vbtest-files-{secrets.token_hex(3)}", base / "disks",
                              {"vda": 32 * MiB, "vdb": 128 * MiB})
    try:
        d.create(start=False)
        models: Dict[str, Dict[str, FileModel]] = {}

        # point 1: vda from a directory tree (mkfs.ext4 -d keeps modes and mtimes), vdb blank
        src = base / "src"
        (src / "etc").mkdir(parents=True)
        (src / "srv/data/sub").mkdir(parents=True)
        (src / "srv/data/locked").mkdir(parents=True)
        files = {"etc/app.conf": (b"version=1\n", 0o644), "srv/data/blob.bin": (BLOB1, 0o640),
                 "srv/data/run.sh": (b"#!/bin/sh\necho hi\n", 0o4755), "srv/data/sub/deep.txt": (b"deep\n", 0o600),
                 "srv/data/locked/inner.txt": (b"inner\n", 0o644), "srv/data/old.txt": (b"old\n", 0o644)}
        m1 = FileModel()
        for rel, (data, _mode) in files.items():
            (src / rel).write_bytes(data)
        os.symlink("/etc/passwd", src / "srv/data/passwd-link")     # absolute: never followed out
        os.symlink("sub/deep.txt", src / "srv/data/rel-link")
        os.symlink("/etc", src / "lnk-etc")
        os.mkfifo(src / "srv/data/fifo")
        # names the libguestfs binding can't decode (issue 22: one made its whole directory unreadable)
        (src / "odd").mkdir()
        (src / "odd/good.txt").write_bytes(b"good\n")
        with open(os.fsencode(src / "odd") + b"/bad-\xff\xfe.txt", "wb") as f:
            f.write(b"bad\n")
        os.symlink(b"/t\xfe", os.fsencode(src / "odd") + b"/ln-bad")
        for rel, (data, mode) in files.items():
            os.chmod(src / rel, mode)
            os.utime(src / rel, (T1, T1))
            m1.items["/" + rel] = ("file", data, mode, T1)
        for rel, target in (("srv/data/passwd-link", "/etc/passwd"), ("srv/data/rel-link", "sub/deep.txt")):
            os.utime(src / rel, (T1, T1), follow_symlinks=False)
            m1.items["/" + rel] = ("symlink", target.encode(), 0o777, T1)
        os.chmod(src / "srv/data/locked", 0o500)
        for rel in ("srv/data/sub", "srv/data/locked", "srv/data"):
            os.utime(src / rel, (T1, T1))
        m1.items["/srv/data/locked"] = ("directory", b"", 0o500, T1)
        m1.items["/srv/data/sub"] = ("directory", b"", 0o755, T1)
        raw = base / "vda.raw"
        with open(raw, "wb") as f:
            f.truncate(32 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", "-d", str(src), str(raw)], check=True)
        os.unlink(d.disk_path("vda"))
        subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(d.disk_path("vda"))], check=True)
        raw.unlink()
        models["0001"] = {"vda": m1}
        assert take_backup(d.name, base / "bk", "full")["point"]["id"] == "0001"

        # point 2: libguestfs writes into the shut-off domain's images: vda's files change, vdb is laid out
        images = [d.disk_path("vda"), d.disk_path("vdb")]
        t = time.monotonic()
        g = writable_appliance(images)
        launch_w1 = time.monotonic() - t
        try:
            g.mount("/dev/sda", "/")
            g.write("/etc/app.conf", b"version=2\n")
            g.rm("/srv/data/old.txt")
            g.write("/srv/new.txt", b"new in 2\n")
            g.umount_all()
            s = 2048
            g.part_init("/dev/sdb", "gpt")
            for start, end in ((s, 25 * s - 1), (25 * s, 49 * s - 1), (49 * s, 89 * s - 1), (89 * s, 97 * s - 1),
                               (97 * s, 105 * s - 1)):
                g.part_add("/dev/sdb", "p", start, end)
            g.mkfs("ext4", "/dev/sdb1", label="boot")
            g.mkfs("ext4", "/dev/sdb2", label="var")
            g.pvcreate("/dev/sdb3")
            g.vgcreate(VG, ["/dev/sdb3"])
            g.lvcreate("data", VG, 24)
            g.mkfs("ext4", f"/dev/{VG}/data", label="lvdata")
            g.pwrite_device("/dev/sdb4", luks_header(), 0)
            for dev, path, data in (("/dev/sdb1", "/boot.txt", b"boot partition\n"),
                                    ("/dev/sdb2", "/var.txt", b"var partition\n"),
                                    (f"/dev/{VG}/data", "/lv.txt", b"lv version 2\n")):
                g.mount(dev, "/")
                g.write(path, data)
                g.umount_all()
            g.shutdown()
        finally:
            g.close()
        assert take_backup(d.name, base / "bk", "inc")["point"]["level"] == "inc"

        # point 3: again, through libguestfs; a differential (copies what changed since the full)
        t = time.monotonic()
        g = writable_appliance(images)
        launch_w2 = time.monotonic() - t
        try:
            g.mount("/dev/sda", "/")
            g.write("/etc/app.conf", b"version=3, longer than before\n")
            g.utimens("/etc/app.conf", T2, 0, T2, 0)
            g.write("/srv/data/blob.bin", BLOB3)
            g.chmod(0o600, "/srv/data/blob.bin")
            g.utimens("/srv/data/blob.bin", T2, 0, T2, 500)
            g.utimens("/srv/data", T1, 0, T1, 0)        # keep the tree's own mtime known
            g.mkdir("/sparse")
            g.touch("/sparse/big.img")
            g.truncate_size("/sparse/big.img", SPARSE_SIZE)
            for off, chunk in SPARSE_DATA:
                g.pwrite("/sparse/big.img", chunk, off)
            g.umount_all()
            g.mount(f"/dev/{VG}/data", "/")
            g.write("/lv.txt", b"lv version 3\n")
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
        assert take_backup(d.name, base / "bk", "diff")["point"]["level"] == "diff"
        m3 = m1.copy()
        del m3.items["/srv/data/old.txt"]
        m3.items["/etc/app.conf"] = ("file", b"version=3, longer than before\n", 0o644, T2)
        m3.items["/srv/data/blob.bin"] = ("file", BLOB3, 0o600, T2)
        models["0003"] = {"vda": m3}

        setup = Setup(base, base / "bk", d.name, models, {"vda": images[0], "vdb": images[1]})
        setup.launches = [launch_w1, launch_w2]
        setup.state_before = dir_state(setup.bdir)
        yield setup
    finally:
        try:
            import libvirt
            d.remove()
            try:
                with host.connection(None) as c2:   # again on a fresh connection: libvirtd may have restarted
                    scratch.remove_domain(c2, d.name)
            except libvirt.libvirtError as e:
                print(f"\ncould not remove domain {d.name}: {e}")
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            left = kill_leftovers(base)
            if left:
                print(f"\nkilled processes left behind: {[x[:200] for x in left]}")
            shutil.rmtree(base, ignore_errors=True)     # disks, backups, copies: hundreds of MiB


class Reads:
    """The three appliance launches of the read tests, started together (they are the cost: each
    boots a TCG VM; on a busy 2-core host one takes minutes): the CLI `get` at point 0003 and one
    API session each at 0001 and 0003, all three on the backup dir at once (readers share its lock)."""

    def __init__(self) -> None:
        self.cli: Optional[subprocess.Popen] = None
        self.cli_out: Optional[Path] = None
        self.cli_started = 0.0
        self.sessions: Dict[str, object] = {}
        self.errors: Dict[str, BaseException] = {}


@pytest.fixture(scope="module")
def reads(files_setup) -> Iterator[Reads]:
    import sys
    import threading

    from virtbackup import api
    s = files_setup
    r = Reads()
    r.cli_out = s.base / "out3"
    r.cli_out.mkdir()
    cmd = [sys.executable, "-m", "virtbackup.cli", "files", str(s.bdir), "--point", "0003", "get",
           "vda:/etc/app.conf", "vda:/srv/data", "vdb1:/boot.txt", "vdb2:/var.txt", f"{VG}/data:/lv.txt",
           f"{VG}/data:/", str(r.cli_out), "--json"]
    r.cli_started = time.monotonic()
    r.cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))

    def open_session(point: str) -> None:
        t = time.monotonic()
        try:
            pf = api.open_point_files(s.bdir, point)
            pf.__enter__()
            r.sessions[point] = pf
        except BaseException as e:  # noqa: BLE001 - reported by the test that needs the session
            r.errors[point] = e
        s.launches.append(time.monotonic() - t)

    threads = [threading.Thread(target=open_session, args=(p,)) for p in ("0001", "0003")]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
        yield r
    finally:
        for pf in r.sessions.values():
            pf.close()          # type: ignore[attr-defined]
        if r.cli.poll() is None:
            # SIGTERM: the CLI shuts its appliance down, but only once a running launch has
            # returned (the signal is handled between Python bytecodes); then SIGKILL, and the
            # module's end kills what libguestfs left
            r.cli.terminate()
            try:
                r.cli.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                r.cli.kill()
                r.cli.communicate()


def session(reads: Reads, point: str):
    """The open session of `point`; closed when the test ends, passed or failed."""
    if point in reads.errors:
        raise reads.errors[point]
    return reads.sessions[point]


@pytest.fixture
def session1(reads) -> Iterator[object]:
    yield session(reads, "0001")
    reads.sessions.pop("0001").close()       # type: ignore[attr-defined]


@pytest.fixture
def session3(reads) -> Iterator[object]:
    yield session(reads, "0003")
    reads.sessions.pop("0003").close()       # type: ignore[attr-defined]


def assert_copy(target: Path, model: FileModel, guest_dir: str, expect_dir_mode: Optional[int] = None) -> None:
    """A copied tree (or file) matches the model: bytes, mode (setuid dropped), mtime, links as links."""
    if not guest_dir.endswith("/") and guest_dir in model.items:
        paths = {guest_dir: target}
    else:
        prefix = guest_dir.rstrip("/") + "/"
        paths = {p: target / p[len(prefix):] for p in model.items if p.startswith(prefix)}
    assert paths
    for gpath, local in paths.items():
        kind, data, mode, mtime = model.items[gpath]
        st = os.lstat(local)
        if kind == "symlink":
            assert stat.S_ISLNK(st.st_mode), gpath
            assert os.readlink(local).encode() == data, gpath
        elif kind == "directory":
            assert stat.S_ISDIR(st.st_mode), gpath
            assert stat.S_IMODE(st.st_mode) == mode, gpath
        else:
            assert stat.S_ISREG(st.st_mode), gpath
            assert local.read_bytes() == data, f"{gpath}: content differs"
            assert stat.S_IMODE(st.st_mode) == mode & 0o1777, f"{gpath}: mode {oct(st.st_mode)}"
        assert int(st.st_mtime) == mtime, f"{gpath}: mtime {st.st_mtime} != {mtime}"


def test_point_1_has_its_own_files_listed_and_copied(files_setup, session1):
    """One appliance at point 0001 (API): fs, ls, get of a tree and a file, cat; vdb was blank then."""
    from virtbackup.errors import FilesystemNotFound
    s = files_setup
    out = s.base / "out1"
    out.mkdir()
    pf = session1
    fss = {f.name: f for f in pf.filesystems()}
    assert fss["vda"].type == "ext4" and fss["vda"].label == "data" and fss["vda"].size == 32 * MiB
    assert fss["vda"].disk == "vda" and fss["vda"].readable
    validate("files-fs", FilesystemList("0001", pf.filesystems()).to_json())
    assert not any(n.startswith("vdb") and n != "vdb" for n in fss), fss   # no partitions yet
    from virtbackup.files import parse_guest_path as gp
    listed = ListResult("0001", [pf.ls(gp("vda:/")), pf.ls(gp("vda:/srv/data")), pf.ls(gp("vda:/srv/data/rel-link"))])
    validate("files-ls", json.loads(json.dumps(listed.to_json())))
    assert [e.name for e in listed.listings[2].entries] == ["rel-link"]
    root = {e.name: e for e in pf.ls(gp("vda:/")).entries}
    assert {"etc", "srv", "lnk-etc", "lost+found"} <= set(root)
    assert root["lnk-etc"].type == "symlink" and root["lnk-etc"].target == "/etc"
    data = {e.name: e for e in pf.ls(gp("vda:/srv/data")).entries}
    assert "old.txt" in data                                 # deleted before point 2
    assert data["blob.bin"].size == len(BLOB1) and data["blob.bin"].mode == "0640"
    assert data["blob.bin"].mtime == "2020-01-02T03:04:05+00:00"
    assert data["run.sh"].mode == "4755"                    # ls shows the guest's mode as is
    assert data["passwd-link"].target == "/etc/passwd" and data["fifo"].type == "fifo"
    with pytest.raises(Exception) as ei:
        pf.ls(gp("vda:/srv/new.txt"))                       # only from point 2 on
    assert ei.value.exit_code == 2 and "no such file" in str(ei.value)
    with pytest.raises(FilesystemNotFound):
        pf.ls(gp("vdb1:/"))
    r = pf.get([(gp("vda:/srv/data"), out / "data"), (gp("vda:/etc/app.conf"), out / "app.conf")])
    assert r.skipped == ["vda:/srv/data/fifo (fifo)"]
    got = validate("files-get", r.to_json())
    assert [(c["type"], c["files"], c["symlinks"]) for c in got["copied"]] == [("directory", 5, 2), ("file", 1, 0)]
    tmpf = out / "cat.out"
    with open(tmpf, "wb") as f:
        assert pf.cat(gp("vda:/srv/data/sub/deep.txt"), f) == 5
    assert tmpf.read_bytes() == b"deep\n"
    assert_copy(out / "data", s.models["0001"]["vda"], "/srv/data")
    assert_copy(out / "app.conf", s.models["0001"]["vda"], "/etc/app.conf")
    assert not (out / "data/fifo").exists()

    # a name that is not UTF-8 (and a link target): the rest of the directory is still listed and
    # copied; the JSON keeps the bytes (surrogateescape), get skips what it can't read, with a note
    odd = pf.ls(gp("vda:/odd"))
    text = json.dumps(ListResult("0001", [odd]).to_json())
    assert text.isascii()
    validate("files-ls", json.loads(text))
    by = {os.fsencode(e.name): e for e in odd.entries}
    assert set(by) == {b"good.txt", b"bad-\xff\xfe.txt", b"ln-bad"}, by
    assert by[b"good.txt"].type == "file" and by[b"good.txt"].size == 5
    assert by[b"bad-\xff\xfe.txt"].type == "unknown" and "not UTF-8" in (by[b"bad-\xff\xfe.txt"].note or "")
    assert by[b"ln-bad"].type == "symlink" and by[b"ln-bad"].target is None
    r = pf.get([(gp("vda:/odd"), out / "odd")])
    assert sorted(r.skipped) == ["vda:/odd/bad-\udcff\udcfe.txt (name not UTF-8)",
                                 "vda:/odd/ln-bad (link target not UTF-8)"], r.skipped
    assert [p.name for p in (out / "odd").iterdir()] == ["good.txt"]
    assert (out / "odd/good.txt").read_bytes() == b"good\n"


def test_point_3_get_through_the_cli_several_paths_partitions_and_lvm(files_setup, reads):
    """One `files get` at point 0003: vda's changed files, both partitions, the LVM volume."""
    s = files_setup
    out = reads.cli_out
    assert reads.cli is not None and out is not None
    stdout, stderr = reads.cli.communicate(timeout=1800)
    s.launches.append(time.monotonic() - reads.cli_started)
    r = CLIResult(subprocess.CompletedProcess(reads.cli.args, reads.cli.returncode, stdout, stderr))
    assert r.rc == 0, r
    assert "\r" not in r.err                                    # no spinner without a terminal
    res = validate_output("files-get", r.out, r.rc)
    assert res["point"] == "0003" and [c["dest"] for c in res["copied"]] == [
        str(out / n) for n in ("app.conf", "data", "boot.txt", "var.txt", "lv.txt", f"{VG}-data")]
    m3 = s.models["0003"]["vda"]
    assert_copy(out / "app.conf", m3, "/etc/app.conf")
    assert_copy(out / "data", m3, "/srv/data")
    assert not (out / "data/old.txt").exists()
    assert (out / "boot.txt").read_bytes() == b"boot partition\n"
    assert (out / "var.txt").read_bytes() == b"var partition\n"
    assert (out / "lv.txt").read_bytes() == b"lv version 3\n"
    assert (out / f"{VG}-data/lv.txt").read_bytes() == b"lv version 3\n"
    assert (out / f"{VG}-data/lost+found").is_dir()
    # and the same path at point 1 read differently: compare with the model of 0001
    assert s.models["0001"]["vda"].items["/etc/app.conf"][1] != (out / "app.conf").read_bytes()


def test_point_3_sparse_file_stays_sparse_and_what_does_not_fit_is_refused(files_setup, reads, tmp_path):
    """Hostile pass D13: a 1 GiB file holding a few KiB is copied with its holes (a few KiB
    allocated on the host, the same bytes), also into a 256 KiB tmpfs; a file whose data does not
    fit that tmpfs is refused before anything is written (exit 2), not run into ENOSPC."""
    from virtbackup.errors import NoSpace
    from virtbackup.files import parse_guest_path as gp
    pf = session(reads, "0003")             # shared with the next test, which closes it
    ref = tmp_path / "ref.img"
    with open(ref, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for off, chunk in SPARSE_DATA:
            f.seek(off)
            f.write(chunk)
    out = tmp_path / "out"
    out.mkdir()
    t = time.monotonic()
    r = pf.get([(gp("vda:/sparse/big.img"), out / "big.img")])
    took = time.monotonic() - t
    assert [(c.type, c.bytes) for c in r.copied] == [("file", SPARSE_SIZE)]
    st = os.stat(out / "big.img")
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 <= 64 * 1024, f"{st.st_blocks * 512} bytes allocated for a file of ~5 KiB data"
    assert subprocess.run(["cmp", str(ref), str(out / "big.img")]).returncode == 0
    print(f"\nsparse 1 GiB file copied in {took:.1f}s")

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "vbtest-tiny", str(tiny)], check=True)
    try:
        pf.get([(gp("vda:/sparse/big.img"), tiny / "big.img")])   # 1 GiB long, fits a 256 KiB tmpfs
        assert os.stat(tiny / "big.img").st_size == SPARSE_SIZE
        assert subprocess.run(["cmp", str(ref), str(tiny / "big.img")]).returncode == 0
        os.unlink(tiny / "big.img")
        with pytest.raises(NoSpace) as ei:                          # ~280 KB of data: does not fit
            pf.get([(gp("vda:/etc/app.conf"), tiny / "app.conf"), (gp("vda:/srv/data"), tiny / "data")])
        assert ei.value.exit_code == 2 and "nothing was copied" in str(ei.value), str(ei.value)
        assert os.listdir(tiny) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=False)


def test_point_3_listing_cat_and_refusals_in_one_appliance(files_setup, session3):
    from virtbackup.errors import FilesystemNotFound, FilesystemUnreadable, GuestPathError
    from virtbackup.files import parse_guest_path as gp
    s = files_setup
    out = s.base / "out3b"
    out.mkdir()
    pf = session3
    fss = {f.name: (f.type, f.label, f.disk, f.readable) for f in pf.filesystems()}
    validate("files-fs", FilesystemList("0003", pf.filesystems()).to_json())
    assert fss == {"vda": ("ext4", "data", "vda", True), "vdb1": ("ext4", "boot", "vdb", True),
                   "vdb2": ("ext4", "var", "vdb", True), "vdb4": ("crypto_LUKS", "", "vdb", False),
                   "vdb5": ("unknown", "", "vdb", False), f"{VG}/data": ("ext4", "lvdata", None, True)}
    assert {f.name: f.size for f in pf.filesystems()}[f"{VG}/data"] == 24 * MiB
    assert [e.name for e in pf.ls(gp("vdb1:/")).entries] == ["boot.txt", "lost+found"]
    validate("files-ls", ListResult("0003", [pf.ls(gp(f"{VG}/data:/")), pf.ls(gp("vda:/lnk-etc/"))]).to_json())
    lv = {e.name: e for e in pf.ls(gp(f"{VG}/data:/")).entries}
    assert lv["lv.txt"].size == len(b"lv version 3\n")
    data = {e.name for e in pf.ls(gp("vda:/srv/data")).entries}
    assert "old.txt" not in data and "blob.bin" in data
    # a directory symlink in the path is resolved inside the guest: /lnk-etc -> /etc of the guest
    assert [e.name for e in pf.ls(gp("vda:/lnk-etc/")).entries] == ["app.conf"]

    def cat(spec: str) -> bytes:
        with open(out / "c", "wb") as f:
            pf.cat(gp(spec), f)
        return (out / "c").read_bytes()

    assert cat("vda:/srv/data/blob.bin") == BLOB3
    assert cat(f"{VG}/data:/lv.txt") == b"lv version 3\n"
    assert cat("vda:/srv/data/rel-link") == b"deep\n"          # followed inside the guest
    assert cat("vda:/lnk-etc/app.conf") == b"version=3, longer than before\n"

    def refused(spec: str, cls, text: str, fn=None) -> None:
        with pytest.raises(cls) as ei:
            (fn or (lambda p: pf.ls(gp(p))))(spec)
        assert ei.value.exit_code == 2 and text in str(ei.value), str(ei.value)

    # an absolute link to a file the guest lacks: not the appliance's or the host's /etc/passwd
    refused("vda:/srv/data/passwd-link", GuestPathError, "no such file", lambda p: cat(p))
    refused("vda:/etc/missing.conf", GuestPathError, "vda:/etc/missing.conf: no such file")
    refused("vda:/etc/app.conf/x", GuestPathError, "no such file")
    refused("nosuch/lv:/", FilesystemNotFound, "no filesystem 'nosuch/lv'")
    refused("vdb3:/", FilesystemNotFound, "no filesystem 'vdb3'")        # the LVM PV itself
    refused("vdb4:/", FilesystemUnreadable, "encrypted (crypto_LUKS)")
    refused("vdb5:/", FilesystemUnreadable, "holds no filesystem virtbackup can read (type unknown)")
    refused("vda:/srv", GuestPathError, "is a directory, not a file", lambda p: cat(p))
    refused("vda:/srv/data/fifo", GuestPathError, "is a fifo",
            lambda p: pf.get([(gp(p), out / "fifo")]))
    assert not (out / "fifo").exists()
    # after refusals the session still works; cat appends at the file's own offset (libguestfs
    # alone would reopen the descriptor's file with O_TRUNC: `cat a b >> log` kept only b)
    assert cat("vdb2:/var.txt") == b"var partition\n"
    (out / "log").write_bytes(b"mine\n")
    with open(out / "log", "ab") as f:
        assert pf.cat(gp("vdb1:/boot.txt"), f) + pf.cat(gp("vdb2:/var.txt"), f) == 29
    assert (out / "log").read_bytes() == b"mine\nboot partition\nvar partition\n"


def test_refused_before_the_appliance_starts(files_setup, tmp_path):
    """Bad input exits 2 at once (no appliance), with one error line, and writes nothing."""
    s = files_setup
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "app.conf").write_bytes(b"mine")
    cases = [
        (["get", "vda:/etc/../etc/app.conf", dest], "contains '..'"),
        (["get", "vda:/../../etc/shadow", dest], "contains '..'"),
        (["cat", "vda:etc/../../x"], "contains '..'"),
        (["get", "vda:/etc/app.conf", dest], f"{dest}/app.conf exists; not overwriting it"),
        (["get", "vda:/etc/app.conf", "vda:/srv", dest / "app.conf"], "is not an existing directory"),
        (["get", "vda:/etc/app.conf", s.bdir / "x.conf"], "inside the backup directory"),
        (["get", "vda:/etc/app.conf", "vdb1:/etc/app.conf", dest / "sub"], "is not an existing directory"),
        (["get", "vda:/a/x", "vdb1:/b/x", dest], "would both be copied to"),
        (["ls", "vdz1:/"], "point 0003 has no disk 'vdz'"),
        (["ls", "nocolon"], "is not FS:PATH"),
        (["ls", ":/etc"], "is not FS:PATH"),
        (["get", "vda:/x"], "get needs FS:PATH... DEST"),
    ]
    for args, text in cases:
        t = time.monotonic()
        r = cli("files", s.bdir, *args)
        assert r.rc == 2, (args, r)
        assert text in one_error_line(r), (args, r)
        assert time.monotonic() - t < 10, "refused only after starting the appliance"
    r = cli("files", s.bdir, "--point", "0042", "fs", "--json")
    assert r.rc == 2 and r.json()["error"]["kind"] == "point-not-found"
    r = cli("files", s.base / "no-such-dir", "fs")
    assert r.rc == 2 and "does not exist" in one_error_line(r)
    assert not (s.base / "no-such-dir").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["app.conf"]
    assert (dest / "app.conf").read_bytes() == b"mine"
    assert not (s.bdir / "x.conf").exists()


def test_damaged_point_exit_1(files_setup, tmp_path):
    """A copy of the backup dir with the full's image damaged (in point 0003's chain): a size
    change and a same-size flipped byte are both refused before the appliance starts."""
    s = files_setup
    copy = tmp_path / "bk-copy"
    shutil.copytree(s.bdir, copy)
    img = copy / "points/0001/vda.qcow2"      # in the chain of 0003 (a diff on the full)
    original = img.read_bytes()
    with open(img, "ab") as f:
        f.write(b"\0" * 512)
    r = cli("files", copy, "--point", "0003", "ls", "vda:/", "--json")
    assert r.rc == 1, r
    line = one_error_line(r)
    assert "points/0001/vda.qcow2" in line and "were recorded" in line
    assert r.json()["error"]["kind"] == "point-damaged"

    # a byte of guest data (an allocated cluster of this image): qemu-img check can't see it
    where = guest_data_byte(img)
    data = bytearray(original)
    data[where] ^= 0xFF
    img.write_bytes(bytes(data))
    out = tmp_path / "out"
    t = time.monotonic()
    r = cli("files", copy, "--point", "0003", "get", "vda:/etc/app.conf", out)
    assert r.rc == 1, r
    assert time.monotonic() - t < 10, "the damage was found only after starting the appliance"
    line = one_error_line(r)
    assert "point 0003 is damaged" in line and "points/0001/vda.qcow2" in line
    assert "content hash" in line and "differs" in line
    assert not out.exists()


def test_zz_backup_dir_untouched_verify_passes_nothing_left(files_setup):
    """After every read: the backup dir is byte for byte and mtime for mtime as before, verify
    passes, and no appliance, overlay, socket or temp file of libguestfs is left."""
    s = files_setup
    assert dir_state(s.bdir) == s.state_before
    assert not any(p.name.endswith(".partial") for p in (s.bdir / "points").iterdir())
    r = cli("verify", s.bdir)
    assert r.rc == 0, r
    assert list((s.base / "gtmp").iterdir()) == []
    assert list((s.base / "grun").iterdir()) == []
    assert processes_mentioning(str(s.base)) == []      # no appliance QEMU, no CLI
    print(f"\nappliance launches (s): {', '.join(f'{x:.1f}' for x in s.launches)}")
