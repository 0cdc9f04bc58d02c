"""Single-file restore: list, read and copy files out of a restore point through libguestfs.

Guest filesystems are untrusted input, so they are parsed only by the kernel inside libguestfs's
own appliance VM, never by the host kernel. The point's images are added read-only: libguestfs
puts a throwaway overlay (in its temp dir, removed on close) on top of each, and QEMU follows the
qcow2 backing chain down to the full, so nothing is written into the backup directory. The
directory lock is held from loading the chain to closing the appliance, so no backup or prune
rewrites the chain underneath.

Filesystem names: `vda` (a filesystem on a whole disk), `vda1` (a partition), `vg/lv` (LVM).
Inside the appliance the disks are /dev/sda, /dev/sdb... in the order they were added, which is
the point's disk names sorted; that is how /dev/sdX maps back to the domain's names.

The appliance's start (15-60 s under TCG) is the cost of every invocation, so the API takes
several paths at once and everything that can be checked before the start is checked first.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

from virtbackup import env
from virtbackup.errors import (
    FilesystemNotFound,
    FilesystemUnreadable,
    GuestPathError,
    HostError,
    NoSpace,
    OutputExists,
    PointDamaged,
    UnsafePath,
    UsageError,
    VirtBackupError,
)
from virtbackup.store.chain import BackupDir, Chain, Point, shared_lock

log = logging.getLogger("virtbackup.files")

Status = Callable[[Optional[str]], None]
"""Called with a message when a slow step starts and with None when it is over (a spinner)."""

ENCRYPTED_TYPES = ("crypto_LUKS", "BitLocker", "VeraCrypt", "TrueCrypt")
# vfs types that are block device containers or not filesystems at all: nothing to mount
NOT_FILESYSTEMS = ("unknown", "swap", "LVM2_member", "linux_raid_member", "")
_BATCH = 500        # names per lstatnslist/readlinklist call (the protocol caps a message at 4 MiB)
_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
# what `get` keeps of a guest mode: permission bits and sticky, never setuid/setgid (a guest's
# setuid file must not become a root-owned setuid file on the host)
_KEEP_MODE = 0o1777
_CHUNK = 2 << 20    # bytes per pread of a sparse file (the protocol caps a message at 4 MiB)
LS0_DIR_PREFIX = "virtbackup-ls0-"   # a private temp dir for the raw names of one directory
_BLOCK = 4096       # the unit holes are found in: an all-zero block of a sparse file is not written


def _read_lock(bdir: BackupDir) -> ContextManager[Any]:
    """The shared lock readers hold on BACKUP_DIR while they read the chain's images: writers
    (backup, prune) wait, other readers (restore, verify, files) don't."""
    return shared_lock(bdir)


# --- input: FS:PATH ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GuestPath:
    fs: str
    path: str           # absolute, normalised, no `..`
    follow: bool = field(default=False, compare=False)   # given with a trailing '/': a symlink to a
    #                                                      directory means the directory (as in ls)

    def __str__(self) -> str:
        return f"{self.fs}:{self.path}"

    @property
    def basename(self) -> str:
        """The name a copy gets: the last component, or the filesystem's name for its root."""
        name = PurePosixPath(self.path).name
        return name or self.fs.replace("/", "-")


_FS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9._+-]+)?$")


def parse_guest_path(spec: str) -> GuestPath:
    """`FS:PATH` → GuestPath. The path is taken from the filesystem's root; `..` is refused
    outright (inside the appliance it could not leave the guest anyway, but a path that says it
    does is a mistake or an attack, and either way the answer would surprise)."""
    fs, sep, path = spec.partition(":")
    if not sep or not fs:
        raise GuestPathError(f"'{spec}' is not FS:PATH (e.g. vda1:/etc/fstab; 'virtbackup files DIR fs' "
                             "lists the filesystems)")
    if not _FS_NAME.match(fs):
        raise GuestPathError(f"'{fs}' is not a filesystem name (vda, vda1 or vg/lv)")
    if "\0" in path:
        raise GuestPathError(f"path in '{spec}' contains a NUL byte")
    if not utf8(path):      # the binding can take only UTF-8 (it crashed the process on others)
        raise GuestPathError(f"path {path.encode('utf-8', 'surrogateescape')!r} is not UTF-8: libguestfs's Python "
                             "binding can't open it; get or list its directory instead")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise GuestPathError(f"path '{path}' contains '..'; give the path from the root of {fs}")
    return GuestPath(fs, "/" + "/".join(parts), follow=path.endswith("/") and bool(parts))


# --- results -----------------------------------------------------------------------------------
# Every result has to_json(): the `files ... --json` output (schemas/files-fs, files-ls, files-get).
@dataclass
class Filesystem:
    name: str               # vda, vda1, vg/lv
    type: str               # ext4, xfs, ..., crypto_LUKS, unknown
    label: str
    uuid: str
    size: int               # bytes of the device or volume
    disk: Optional[str]     # the domain disk it is on (None for LVM and other stacked volumes)
    readable: bool          # virtbackup can mount it (not encrypted, swap or unknown)

    def to_json(self) -> Dict[str, Any]:
        """{"name", "type", "label", "uuid", "size", "disk", "readable"}."""
        return asdict(self)


@dataclass
class Entry:
    name: str
    type: str               # file, directory, symlink, char, block, fifo, socket
    size: int
    mode: str               # octal permission bits, e.g. "0644"
    mtime: str              # ISO 8601, UTC
    target: Optional[str] = None    # a symlink's target, as stored in the guest
    note: Optional[str] = None      # why something is not known (a name or target that is not UTF-8)

    def to_json(self) -> Dict[str, Any]:
        """{"name", "type", "size", "mode", "mtime", "target"} (target: null unless a symlink), and
        "note" when something could not be read. A name (or target) that is not UTF-8 has each
        byte that is not as a lone surrogate U+DC80+byte (Python's surrogateescape: `\\udcff` in
        the JSON text, os.fsencode(name) gives the guest's bytes)."""
        out = asdict(self)
        if self.note is None:
            del out["note"]
        return out


@dataclass
class Listing:
    path: str               # FS:PATH as given (normalised)
    entries: List[Entry]

    def to_json(self) -> Dict[str, Any]:
        """{"path", "entries": [Entry.to_json()]}."""
        return {"path": self.path, "entries": [e.to_json() for e in self.entries]}


class FilesystemList(NamedTuple):
    """What `fs` found (a tuple, so `point, filesystems = files_filesystems(...)` works)."""
    point: str
    filesystems: List[Filesystem]

    def to_json(self) -> Dict[str, Any]:
        """{"point", "filesystems": [Filesystem.to_json()]} (the `files fs --json` output)."""
        return {"point": self.point, "filesystems": [f.to_json() for f in self.filesystems]}


class ListResult(NamedTuple):
    """What `ls` listed (a tuple, so `point, listings = files_ls(...)` works)."""
    point: str
    listings: List[Listing]

    def to_json(self) -> Dict[str, Any]:
        """{"point", "listings": [Listing.to_json()]} (the `files ls --json` output)."""
        return {"point": self.point, "listings": [x.to_json() for x in self.listings]}


@dataclass
class Copied:
    source: str             # FS:PATH
    dest: str
    type: str
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0

    def to_json(self) -> Dict[str, Any]:
        """{"source", "dest", "type", "files", "directories", "symlinks", "bytes"}."""
        return asdict(self)


@dataclass
class GetResult:
    point: str
    copied: List[Copied] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)     # special files in a tree, not copied

    def to_json(self) -> Dict[str, Any]:
        """{"point", "copied": [Copied.to_json()], "skipped": ["FS:PATH (kind)"]} (the `files get
        --json` output)."""
        return {"point": self.point, "copied": [c.to_json() for c in self.copied], "skipped": list(self.skipped)}


def _mode_type(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), "unknown")


def _iso(sec: int, nsec: int) -> str:
    t = datetime.fromtimestamp(sec + nsec / 1e9, tz=timezone.utc)
    return t.isoformat(timespec="seconds" if nsec == 0 else "microseconds")


NOT_UTF8 = "its name is not UTF-8: libguestfs's Python binding can't look at it"
LINK_NOT_UTF8 = "its target is not UTF-8: libguestfs's Python binding can't read it"


def utf8(name: str) -> bool:
    """Can the binding take this name (no byte that was not UTF-8)?"""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _entry(name: str, st: Optional[Dict[str, int]], target: Optional[str]) -> Entry:
    if st is None:       # nothing can be asked about a name that is not UTF-8
        return Entry(name, "unknown", 0, "0000", _iso(0, 0), None, note=NOT_UTF8)
    kind = _mode_type(st["st_mode"])
    if kind == "symlink" and target is None:
        return Entry(name, kind, st["st_size"], f"{stat.S_IMODE(st['st_mode']):04o}",
                     _iso(st["st_mtime_sec"], st["st_mtime_nsec"]), None, note=LINK_NOT_UTF8)
    return Entry(name, kind, st["st_size"], f"{stat.S_IMODE(st['st_mode']):04o}",
                 _iso(st["st_mtime_sec"], st["st_mtime_nsec"]), target if kind == "symlink" else None)


# --- get: where each source goes, decided before the appliance starts --------------------------
def plan_get(sources: Sequence[str], dest: Path, backup_dir: Path) -> List[Tuple[GuestPath, Path]]:
    """Where each source will be copied, refusing (exit 2) anything that would overwrite.

    One source and a DEST that does not exist: DEST is the copy's name. Otherwise DEST must be an
    existing directory and each source lands in it under its own name. Nothing may go into the
    backup directory, nor into a directory that is not root's or ours or that other users can
    write to (unless sticky: /tmp is fine), exit 2.
    """
    if not sources:
        raise UsageError("get needs at least one FS:PATH and a DEST")
    paths = [parse_guest_path(s) for s in sources]
    dest = Path(os.path.abspath(dest))
    if dest.is_dir():
        targets = [dest / gp.basename for gp in paths]
    elif len(paths) > 1:
        raise UsageError(f"{dest} is not an existing directory (needed to get several paths)")
    elif os.path.lexists(dest):
        raise OutputExists(f"{dest} exists; not overwriting it")
    elif not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not an existing directory")
    else:
        targets = [dest]
    dest_dir = targets[0].parent
    problem = env.unsafe_dir(os.stat(dest_dir))
    if problem:
        # the copy works by name below it: another user could swap a directory we made for a
        # symlink, and root would then write, chmod and utime through it
        raise UnsafePath(f"not copying into {dest_dir}: {problem}")
    seen: Dict[Path, GuestPath] = {}
    bd = os.path.realpath(backup_dir)
    for gp, target in zip(paths, targets, strict=True):
        if target in seen:
            raise UsageError(f"{seen[target]} and {gp} would both be copied to {target}")
        seen[target] = gp
        if os.path.lexists(target):
            raise OutputExists(f"{target} exists; not overwriting it")
        where = os.path.realpath(target.parent)
        if where == bd or where.startswith(bd + os.sep):
            raise UsageError(f"{target} is inside the backup directory; nothing is written there")
    return list(zip(paths, targets, strict=True))


# --- the session -------------------------------------------------------------------------------
class PointFiles:
    """One point's filesystems through one libguestfs appliance (a context manager).

    Entering loads the chain, takes the directory lock, checks the point's images (sizes,
    `qemu-img check`, backing links, content hashes) and starts the appliance; leaving shuts it down
    (its overlays go with it) and releases the lock.
    """

    def __init__(self, backup_dir: Path, point: Optional[str] = None, status: Optional[Status] = None):
        self.bdir = BackupDir(Path(backup_dir))
        self.point_spec = point
        self.status: Status = status or (lambda _msg: None)
        self.chain: Optional[Chain] = None
        self.point: Optional[Point] = None
        self.disks: List[str] = []
        self._lock: Optional[ContextManager[Any]] = None
        self._g: Any = None
        self._fs: Dict[str, Filesystem] = {}
        self._mountable: Dict[str, str] = {}    # name -> appliance device or LV path
        self._mounted: Optional[str] = None
        self._devices: List[str] = []           # appliance devices, in the order the disks were added

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "PointFiles":
        self.bdir.load()                        # a missing or foreign dir: exit 2 before the lock creates anything
        lock = _read_lock(self.bdir)
        lock.__enter__()
        self._lock = lock
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Shut the appliance down (libguestfs removes its overlays and sockets) and unlock."""
        g, self._g = self._g, None
        try:
            if g is not None:
                try:
                    g.shutdown()
                except RuntimeError:
                    pass
                g.close()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.__exit__(None, None, None)

    def _open(self) -> None:
        chain = self.chain = self.bdir.load()      # again, under the lock: what we read is current
        if chain.encryption is not None:
            raise UsageError(f"{self.bdir.path} is encrypted; 'files' cannot read encrypted backups yet: restore "
                             f"a decrypted copy first (virtbackup restore {self.bdir.path} OUTPUT_DIR --key-file FILE)")
        point = self.point = chain.point(self.point_spec)
        self.disks = sorted(point.disks)
        tops = [self._check_sizes(chain, point, disk) for disk in self.disks]
        try:
            import guestfs  # type: ignore[import-untyped, import-not-found, unused-ignore]
        except ImportError:
            raise HostError("the libguestfs Python binding is missing: install python3-guestfs "
                            "(scripts/setup-host.sh does)") from None
        # before QEMU parses anything: the images must be the ones written at backup time
        self.status("checking the point's images")
        try:
            self._check_hashes(point)
        finally:
            self.status(None)
        g = self._g = guestfs.GuestFS(python_return_dict=True)
        self.status("starting the libguestfs appliance (15-60 s)")
        try:
            for top in tops:
                log.debug("add_drive_opts %s readonly=1 format=qcow2", top)
                g.add_drive_opts(str(top), readonly=1, format="qcow2")
            t0 = time.monotonic()
            g.launch()
            log.debug("appliance started in %.1fs (backend %s)", time.monotonic() - t0, g.get_backend())
        except RuntimeError as e:
            raise HostError(f"the libguestfs appliance did not start: {' '.join(str(e).split())} (without "
                            "working KVM, set LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg; "
                            "see docs/guide.md)") from None
        finally:
            self.status(None)
        self._scan()

    def _check_sizes(self, chain: Chain, point: Point, disk: str) -> Path:
        """Cheap checks before the appliance starts: every image of the chain is there and has the
        recorded size. Returns the disk's top image (absolute: libguestfs's overlay names it)."""
        by_image = {d.image: d for p in chain.points for d in p.disks.values()}
        for rel in chain.image_chain(point, disk):
            path = self.bdir.resolve(rel)
            try:
                size = os.stat(path).st_size if path.is_file() else None
            except OSError:
                size = None
            if size is None:
                raise PointDamaged(f"point {point.id} disk {disk}: image {rel} is missing")
            if size != by_image[rel].size:
                raise PointDamaged(f"point {point.id} disk {disk}: image {rel} is {size} bytes, "
                                   f"{by_image[rel].size} were recorded")
        return self.bdir.resolve(point.disks[disk].image)

    def _check_hashes(self, point: Point) -> None:
        """verify's checks of the point's chain (qemu-img check, backing links, content hashes), before the
        appliance starts: a damaged image is reported at once instead of after a 15-60 s start, and
        the host's QEMU never parses an image that differs from the one the backup wrote."""
        from virtbackup.store.verify import verify
        result = verify(self.bdir.path, point.id)
        if result.damage:
            d = result.damage[0]
            more = f"; {len(result.damage) - 1} more damaged image(s)" if len(result.damage) > 1 else ""
            raise PointDamaged(f"point {point.id} is damaged: {d.image} (point {d.point}, disk {d.disk}): "
                               f"{d.problem}{more}")

    # -- filesystems ---------------------------------------------------------------------------
    def _name_of(self, device: str) -> Tuple[str, Optional[str]]:
        """Appliance device → (filesystem name, disk): /dev/sdb2 → vdb2, /dev/vg/lv → vg/lv."""
        by_dev = dict(zip(self._devices, self.disks, strict=True))
        if device in by_dev:
            return by_dev[device], by_dev[device]
        m = re.match(r"^(/dev/[a-z]+?)(\d+)$", device)
        if m and m.group(1) in by_dev:
            return by_dev[m.group(1)] + m.group(2), by_dev[m.group(1)]
        rest = device[len("/dev/"):] if device.startswith("/dev/") else device
        return rest, None

    def _scan(self) -> None:
        g = self._g
        self._devices = list(g.list_devices())
        found: Dict[str, str] = dict(g.list_filesystems())
        # list_filesystems leaves encrypted volumes out: show them, they are what users look for
        for dev in [*g.list_devices(), *g.list_partitions()]:
            if dev not in found:
                try:
                    vtype = g.vfs_type(dev)
                except RuntimeError:
                    continue
                if vtype in ENCRYPTED_TYPES:
                    found[dev] = vtype
        for dev, vtype in found.items():
            if dev.startswith("btrfsvol:"):
                continue        # btrfs subvolumes: the device itself is listed (default subvolume)
            name, disk = self._name_of(dev)
            label = uuid = ""
            try:
                label = g.vfs_label(dev)
                uuid = g.vfs_uuid(dev)
            except RuntimeError:
                pass
            try:
                size = g.blockdev_getsize64(dev)
            except RuntimeError:
                size = 0
            readable = vtype not in ENCRYPTED_TYPES and vtype not in NOT_FILESYSTEMS
            self._fs[name] = Filesystem(name, vtype, label, uuid, size, disk, readable)
            self._mountable[name] = dev

    def filesystems(self) -> List[Filesystem]:
        return sorted(self._fs.values(), key=lambda f: (f.disk is None, f.name))

    def _mount(self, fs: str) -> None:
        """Mount FS read-only at the appliance's root (one at a time)."""
        if self._mounted == fs:
            return
        assert self.point is not None
        info = self._fs.get(fs)
        if info is None:
            names = ", ".join(f.name for f in self.filesystems()) or "none"
            raise FilesystemNotFound(f"point {self.point.id} has no filesystem '{fs}' (filesystems: {names})")
        if info.type in ENCRYPTED_TYPES:
            raise FilesystemUnreadable(f"filesystem {fs} of point {self.point.id} is encrypted ({info.type}); "
                                       "virtbackup cannot read it")
        if not info.readable:
            raise FilesystemUnreadable(f"{fs} of point {self.point.id} holds no filesystem virtbackup can "
                                       f"read (type {info.type or 'none'})")
        g = self._g
        if self._mounted is not None:
            g.umount_all()
            self._mounted = None
        log.debug("mount_ro %s (%s) /", self._mountable[fs], fs)
        try:
            g.mount_ro(self._mountable[fs], "/")
        except RuntimeError as e:
            msg = " ".join(str(e).split())
            if "unknown filesystem type" in msg:
                raise FilesystemUnreadable(f"{fs} of point {self.point.id}: the appliance cannot mount "
                                           f"{info.type} filesystems") from None
            raise HostError(f"cannot mount {fs} of point {self.point.id} read-only: {msg}") from None
        self._mounted = fs

    def _resolve(self, gp: GuestPath) -> Tuple[str, Dict[str, int]]:
        """The path with its directories' symlinks resolved inside the guest (guestfsd resolves
        `realpath` chrooted into the guest's root, so an absolute link stays in the guest tree;
        later calls then never cross a symlink, not even into the appliance's own root), and the
        lstat of its last component."""
        self._mount(gp.fs)
        g = self._g
        pp = PurePosixPath(gp.path)
        try:
            parent = g.realpath(str(pp.parent)) if gp.path != "/" else "/"
            path = str(PurePosixPath(parent) / pp.name) if pp.name else parent
            st = g.lstatns(path)
        except RuntimeError as e:
            raise self._path_error(gp, e) from None
        if gp.follow and stat.S_ISLNK(st["st_mode"]):
            try:
                path = g.realpath(path)
                st = g.lstatns(path)
            except RuntimeError as e:
                raise self._path_error(gp, e) from None
        if not path.startswith("/"):
            raise GuestPathError(f"{gp}: resolves outside the filesystem")
        return path, st

    def _path_error(self, gp: GuestPath, e: RuntimeError) -> VirtBackupError:
        msg = str(e)
        assert self.point is not None
        if "No such file or directory" in msg or "Not a directory" in msg:
            return GuestPathError(f"{gp}: no such file or directory in point {self.point.id}")
        if "Too many levels of symbolic links" in msg:
            return GuestPathError(f"{gp}: a symlink loop in point {self.point.id}")
        return HostError(f"{gp}: {' '.join(msg.split())}")

    def _names(self, path: str) -> List[str]:
        """A guest directory's names. The binding's `ls` decodes them strictly, so one name that is
        not UTF-8 made the whole directory unreadable; then `ls0` (raw names into a host file in a
        private temp dir) gives them, decoded with surrogateescape (os.fsencode gives the bytes)."""
        try:
            return list(self._g.ls(path))
        except UnicodeDecodeError:
            pass
        env.remove_dead_tempdirs(LS0_DIR_PREFIX)
        d = env.owned_tempdir(LS0_DIR_PREFIX)
        try:
            self._g.ls0(path, str(d / "names"))
            raw = (d / "names").read_bytes()
        finally:
            import shutil
            shutil.rmtree(d, ignore_errors=True)
        return [n.decode("utf-8", "surrogateescape") for n in sorted(n for n in raw.split(b"\0") if n)]

    def _entries(self, path: str) -> List[Tuple[str, Optional[Dict[str, int]], Optional[str]]]:
        """(name, lstat, symlink target or '') of every entry of a guest directory, in batches.

        A name that is not UTF-8 gets no lstat (None): the binding can take only UTF-8 names (it
        crashed the process on others), so nothing about it can be asked. A symlink target that
        is not UTF-8 is None."""
        g = self._g
        names = self._names(path)
        good = [n for n in names if utf8(n)]
        found: Dict[str, Tuple[Dict[str, int], Optional[str]]] = {}
        for i in range(0, len(good), _BATCH):
            chunk = good[i:i + _BATCH]
            stats = g.lstatnslist(path, chunk)
            try:
                links: List[Optional[str]] = list(g.readlinklist(path, chunk))
            except UnicodeDecodeError:      # a target that is not UTF-8: ask one by one
                links = [self._readlink(str(PurePosixPath(path) / n)) if stat.S_ISLNK(st["st_mode"]) else ""
                         for n, st in zip(chunk, stats, strict=True)]
            found.update(zip(chunk, zip(stats, links, strict=True), strict=True))
        return [(n, *found[n]) if n in found else (n, None, None) for n in names]

    def _readlink(self, path: str) -> Optional[str]:
        """A symlink's target, None when it is not UTF-8 (the binding can't return it)."""
        try:
            return str(self._g.readlink(path))
        except UnicodeDecodeError:
            return None

    def ls(self, gp: GuestPath) -> Listing:
        """A directory's entries (or the one entry of a file), symlinks not followed."""
        path, st = self._resolve(gp)
        if not stat.S_ISDIR(st["st_mode"]):
            target = self._readlink(path) if stat.S_ISLNK(st["st_mode"]) else None
            return Listing(str(gp), [_entry(gp.basename, st, target)])
        try:
            entries = [_entry(n, s, t) for n, s, t in self._entries(path)]
        except RuntimeError as e:
            raise self._path_error(gp, e) from None
        return Listing(str(gp), entries)

    def cat(self, gp: GuestPath, out: BinaryIO) -> int:
        """Write one regular file to `out` (a file object with a descriptor, e.g. stdout's buffer).
        A symlink is followed inside the guest only (realpath is resolved chrooted)."""
        path, st = self._resolve(gp)
        if stat.S_ISLNK(st["st_mode"]):
            try:
                path = self._g.realpath(path)
                st = self._g.lstatns(path)
            except RuntimeError as e:
                raise self._path_error(gp, e) from None
        if not stat.S_ISREG(st["st_mode"]):
            raise GuestPathError(f"{gp} is a {_mode_type(st['st_mode'])}, not a file")
        out.flush()
        self._download_through_pipe(path, out.fileno(), gp)
        return int(st["st_size"])

    def _download(self, path: str, fd: int, gp: GuestPath) -> None:
        """Into a file we just created (O_EXCL, O_NOFOLLOW), never to a name libguestfs would
        open. libguestfs opens `/dev/fd/N` anew with O_TRUNC: harmless on that empty file only."""
        try:
            self._g.download(path, f"/dev/fd/{fd}")
        except RuntimeError as e:
            raise self._path_error(gp, e) from None

    def _download_through_pipe(self, path: str, fd: int, gp: GuestPath) -> None:
        """Append one file to `fd` at its own offset. Not `/dev/fd/N` directly: libguestfs would
        reopen it with O_TRUNC, so `cat a b > out` kept only b and `cat a >> log` emptied the log
        first. libguestfs writes into a pipe instead and a thread copies it on (the binding
        releases the GIL during the download)."""
        import threading
        r, w = os.pipe()
        failed: List[OSError] = []

        def pump() -> None:
            try:
                while True:
                    buf = os.read(r, 1 << 20)
                    if not buf:
                        return
                    view = memoryview(buf)
                    while view:
                        view = view[os.write(fd, view):]
            except OSError as e:        # e.g. EPIPE: the reader of stdout went away
                failed.append(e)
                while os.read(r, 1 << 20):  # keep draining: libguestfs must not block on a full pipe
                    pass

        t = threading.Thread(target=pump, name="virtbackup-cat", daemon=True)
        t.start()
        try:
            try:
                self._g.download(path, f"/dev/fd/{w}")
            finally:
                os.close(w)
                t.join()
                os.close(r)
        except RuntimeError as e:
            raise self._path_error(gp, e) from None
        if failed:
            raise failed[0]

    # -- get -------------------------------------------------------------------------------------
    def get(self, plan: Sequence[Tuple[GuestPath, Path]]) -> GetResult:
        """Copy each source to its target (from `plan_get`): files with mode and mtime, directory
        trees, symlinks as symlinks (never followed), sparse files with their holes. Never
        overwrites; refuses (NoSpace, nothing written) what would not fit the destination's
        filesystem; on failure everything this call created is removed again."""
        assert self.point is not None
        result = GetResult(self.point.id)
        ops: List[_Op] = []
        for gp, target in plan:         # first the whole list: its size is checked before writing
            path, st = self._resolve(gp)
            kind = _mode_type(st["st_mode"])
            if kind not in ("file", "directory", "symlink"):
                raise GuestPathError(f"{gp} is a {kind}; only files, directories and symlinks are copied")
            c = Copied(str(gp), str(target), kind)
            self._walk(gp, path, st, target, c, result, ops)
            result.copied.append(c)
        if plan:
            check_space(ops, plan[0][1].parent)
        created: List[Path] = []
        try:
            for op in ops:
                self._make(op, created)
            # directories' mode and mtime last, deepest first: a read-only directory must first be
            # filled, and every entry made in it changed its mtime
            for op in reversed(ops):
                if op.kind == "directory":
                    os.chmod(op.target, stat.S_IMODE(op.st["st_mode"]) & _KEEP_MODE)
                    os.utime(op.target, ns=_times(op.st))
        except BaseException:
            for p in reversed(created):
                try:
                    if p.is_dir() and not p.is_symlink():
                        os.rmdir(p)
                    else:
                        os.unlink(p)
                except OSError:
                    pass
            raise
        return result

    def _walk(self, gp: GuestPath, path: str, st: Dict[str, int], target: Path, c: Copied,
              result: GetResult, ops: List["_Op"]) -> None:
        """What copying `gp` to `target` makes, in order (a directory before its entries)."""
        kind = _mode_type(st["st_mode"])
        ops.append(_Op(kind, gp, path, st, target))
        if kind == "symlink":
            c.symlinks += 1
        elif kind == "file":
            c.files += 1
            c.bytes += st["st_size"]
        elif kind == "directory":
            c.directories += 1
            try:
                entries = self._entries(path)
            except RuntimeError as e:
                raise self._path_error(gp, e) from None
            for name, est, link in entries:
                if "/" in name or name in (".", ".."):
                    raise HostError(f"{gp}: the guest returned an impossible file name {name!r}")
                child = GuestPath(gp.fs, str(PurePosixPath(gp.path) / name))
                if est is None:
                    result.skipped.append(f"{child} (name not UTF-8)")
                    continue
                if _mode_type(est["st_mode"]) == "symlink" and link is None:
                    result.skipped.append(f"{child} (link target not UTF-8)")
                    continue
                if _mode_type(est["st_mode"]) not in ("file", "directory", "symlink"):
                    result.skipped.append(f"{child} ({_mode_type(est['st_mode'])})")
                    continue
                self._walk(child, str(PurePosixPath(path) / name), est, target / name, c, result, ops)

    def _make(self, op: "_Op", created: List[Path]) -> None:
        gp, path, st, target = op.gp, op.path, op.st, op.target
        self._mount(gp.fs)              # the sources' filesystems in turn (a no-op within one)
        if op.kind == "symlink":
            try:
                target_text = self._readlink(path)
            except RuntimeError as e:
                raise self._path_error(gp, e) from None
            if target_text is None:
                raise GuestPathError(f"{gp}: {LINK_NOT_UTF8}")
            link = target_text
            _no_overwrite(lambda: os.symlink(link, target), target)
            created.append(target)
            os.utime(target, ns=_times(st), follow_symlinks=False)
        elif op.kind == "file":
            fd = _no_overwrite(lambda: os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                                | os.O_CLOEXEC, 0o600), target)
            created.append(target)
            try:
                if _is_sparse(st):
                    self._download_sparse(path, st["st_size"], fd, gp)
                else:
                    self._download(path, fd, gp)
                os.fchmod(fd, stat.S_IMODE(st["st_mode"]) & _KEEP_MODE)
                os.utime(fd, ns=_times(st))
            finally:
                os.close(fd)
        else:
            _no_overwrite(lambda: os.mkdir(target, 0o700), target)
            created.append(target)

    def _download_sparse(self, path: str, size: int, fd: int, gp: GuestPath) -> None:
        """A sparse guest file into `fd` (a new, empty file) with its holes as holes: read in
        chunks, every all-zero block skipped (never written, so never allocated), the length set
        last. `download` would write every byte of a 6 GiB file that holds a few KiB."""
        zero = bytes(_CHUNK)
        off = 0
        while off < size:
            try:
                buf = self._g.pread(path, min(_CHUNK, size - off), off)
            except RuntimeError as e:
                raise self._path_error(gp, e) from None
            if not buf:
                raise HostError(f"{gp}: the file ended after {off} bytes; its size is {size}")
            if buf != zero[:len(buf)]:
                _write_data(fd, buf, off)
            off += len(buf)
        os.ftruncate(fd, size)


@dataclass
class _Op:
    """One thing `get` makes: a file, a directory or a symlink at `target`, from `path` in the appliance."""
    kind: str
    gp: GuestPath
    path: str
    st: Dict[str, int]
    target: Path


def _times(st: Dict[str, int]) -> Tuple[int, int]:
    return (st["st_atime_sec"] * 10**9 + st["st_atime_nsec"], st["st_mtime_sec"] * 10**9 + st["st_mtime_nsec"])


def _is_sparse(st: Dict[str, int]) -> bool:
    """Fewer bytes allocated than the file is long: it has holes (copied as holes)."""
    return st["st_blocks"] * 512 < st["st_size"]


def _write_data(fd: int, buf: bytes, off: int) -> None:
    """Write the runs of `buf` that are not all-zero _BLOCKs at their offsets (off + index)."""
    zero = bytes(_BLOCK)
    n = len(buf)
    view = memoryview(buf)
    i = 0
    while i < n:
        while i < n and buf[i:i + _BLOCK] == zero[:min(_BLOCK, n - i)]:
            i += _BLOCK
        j = i
        while j < n and buf[j:j + _BLOCK] != zero[:min(_BLOCK, n - j)]:
            j += _BLOCK
        j = min(j, n)
        data = view[i:j]
        pos = off + i
        while data:
            k = os.pwrite(fd, data, pos)
            data, pos = data[k:], pos + k
        i = j


def space_needed(ops: Sequence[_Op], block: int) -> Tuple[int, int]:
    """(bytes, inodes) the copies will take on a filesystem of `block`-byte blocks: a file what it
    has allocated in the guest when that is less than its length (a sparse file keeps its holes),
    else its length; a directory one block; each rounded up to whole blocks."""
    total = 0
    for op in ops:
        if op.kind == "file":
            n = min(op.st["st_size"], op.st["st_blocks"] * 512)
        elif op.kind == "directory":
            n = block
        else:
            n = 0           # a symlink's target fits in its inode (or one block: counted as slack)
        total += -(-n // block) * block
    return total, len(ops)


def check_space(ops: Sequence[_Op], where: Path) -> None:
    """Refuse (NoSpace, exit 2, nothing written) copies that would not fit the filesystem of
    `where`: what an unprivileged user may still write there (f_bavail; the blocks the filesystem
    reserves for root stay the host's), and its free inodes."""
    try:
        vfs = os.statvfs(where)
    except OSError as e:
        raise HostError(f"cannot see the free space in {where}: {e.strerror}") from None
    block = vfs.f_frsize or vfs.f_bsize or 4096
    need, inodes = space_needed(ops, block)
    free = vfs.f_bavail * block
    files = sum(op.kind == "file" for op in ops)
    if need > free:
        raise NoSpace(f"the copy needs {_size(need)} ({files} file(s), sparse files counted by the data they "
                      f"hold) and {where} has {_size(free)} free; nothing was copied")
    if vfs.f_files and inodes > vfs.f_favail:
        raise NoSpace(f"the copy makes {inodes} files, directories and symlinks and {where} has "
                      f"{vfs.f_favail} free inodes; nothing was copied")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        x /= 1024
        if x < 1024 or unit == "GiB":
            break
    return f"{x:.1f} {unit}"


def _no_overwrite(make: Callable[[], Any], target: Path) -> Any:
    try:
        return make()
    except FileExistsError:
        raise OutputExists(f"{target} exists; not overwriting it") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputExists(f"{target} exists (a symlink); not overwriting it") from None
        raise


# --- one call per command (what api.py exposes) ------------------------------------------------
def _known_disk_or_lv(fs: str, point: Point) -> None:
    """Refuse before the appliance starts a name that can't exist: a disk the point lacks."""
    m = re.match(r"^((?:[svh]|xv)d[a-z]+)\d*$", fs)
    if m and m.group(1) not in point.disks:
        raise FilesystemNotFound(f"point {point.id} has no disk '{m.group(1)}' "
                                 f"(disks: {', '.join(sorted(point.disks))})")


def _precheck(backup_dir: Path, point: Optional[str], paths: Sequence[GuestPath]) -> None:
    chain = BackupDir(Path(backup_dir)).load()
    p = chain.point(point)
    for gp in paths:
        _known_disk_or_lv(gp.fs, p)


def filesystems(backup_dir: Path, point: Optional[str] = None,
                status: Optional[Status] = None) -> FilesystemList:
    with PointFiles(backup_dir, point, status) as pf:
        assert pf.point is not None
        return FilesystemList(pf.point.id, pf.filesystems())


def ls(backup_dir: Path, specs: Sequence[str], point: Optional[str] = None,
       status: Optional[Status] = None) -> ListResult:
    paths = [parse_guest_path(s) for s in specs]
    _precheck(backup_dir, point, paths)
    with PointFiles(backup_dir, point, status) as pf:
        assert pf.point is not None
        return ListResult(pf.point.id, [pf.ls(gp) for gp in paths])


def get(backup_dir: Path, specs: Sequence[str], dest: Path, point: Optional[str] = None,
        status: Optional[Status] = None) -> GetResult:
    plan = plan_get(specs, dest, backup_dir)
    _precheck(backup_dir, point, [gp for gp, _ in plan])
    with PointFiles(backup_dir, point, status) as pf:
        return pf.get(plan)


def cat(backup_dir: Path, specs: Sequence[str], out: BinaryIO, point: Optional[str] = None,
        status: Optional[Status] = None) -> int:
    """Write the files, one after the other, to `out`; returns the bytes written."""
    paths = [parse_guest_path(s) for s in specs]
    _precheck(backup_dir, point, paths)
    with PointFiles(backup_dir, point, status) as pf:
        return sum(pf.cat(gp, out) for gp in paths)
