"""The chain model (restore points, their images and checkpoints) and its JSON file.

The metadata file is the commit record: a restore point exists only once it is written here
(temp file, fsync, rename, fsync dir). Every path in it is relative to BACKUP_DIR and must stay
inside it, so the directory can be moved to another host and restored with qemu-img alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, cast

from virtbackup import env
from virtbackup.errors import (
    BackupDirError,
    ChainCorrupt,
    LockBusy,
    OperationFailed,
    PointNotFound,
    UnsafePath,
    UsageError,
)
from virtbackup.store.crypto import ChainEncryption
from virtbackup.store.digest import DEFAULT as DEFAULT_HASH
from virtbackup.store.digest import Digest

# Metadata schema versions. A virtbackup refuses a version it does not know ("unsupported schema
# version"): that keeps older versions from misreading records they don't understand, and
# versions without encryption from adding plaintext points to an encrypted chain (or skipping
# its key).
#   1 plain, 2 encrypted: an image's hash in "sha256" or (images since BLAKE3) "blake3", the other ""
#   3 plain, 4 encrypted: an image's hash in "digest": {"algorithm", "value"}; a point's two XML
#     files' hashes in "domain_xml_digest"/"checkpoint_xml_digest" (same shape; absent or null in
#     points recorded before they were hashed: no new version, 3 and 4 have no release without them)
# All four are read (1 and 2 converted in memory); a save always writes 3 or 4.
SCHEMA_VERSION = 3
SCHEMA_ENCRYPTED = 4
ENCRYPTED_SCHEMAS = (2, SCHEMA_ENCRYPTED)
HASH_FIELD_SCHEMAS = (1, 2)         # records with "sha256"/"blake3" instead of "digest"
SCHEMAS = (1, 2, SCHEMA_VERSION, SCHEMA_ENCRYPTED)
METADATA = "virtbackup.json"
LOCKFILE = ".virtbackup.lock"
POINTS_DIR = "points"
PARTIAL_SUFFIX = ".partial"
Level = Literal["full", "inc", "diff"]
LEVELS: Tuple[str, ...] = ("full", "inc", "diff")
CONSISTENCIES = (None, "application", "crash")
COMPRESSION_TYPES = (None, "zstd", "zlib")     # a point's record: None is uncompressed

# A libvirt disk target name (vda, sdb, hdc, xvda, nvme0n1...): it becomes a file name in
# OUTPUT_DIR, so anything else in the metadata ("/../../srv/x") is corruption, not a name.
DISK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,31}$")
# How long a lock waits for readers (restore, verify) or for a writer to finish (seconds).
LOCK_WAIT_ENV = "VIRTBACKUP_LOCK_WAIT"
LOCK_WAIT_DEFAULT = 60.0


def user_path(value: object, what: str) -> Path:
    """A path argument as the user gave it; an empty string is a usage error, not '.'."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else ""
    if not str(text).strip():
        raise UsageError(f"{what} must not be an empty string")
    return Path(text)


def open_new(path: Path, mode: int = 0o600) -> int:
    """Create a file that must not exist yet, never through a symlink; returns the fd.

    A symlink (even a dangling one) at the name is refused with exit 2: it is not ours."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symlink where virtbackup creates its own file; "
                             "not following it") from None
        raise OperationFailed(f"{path} exists; not overwriting it") from None


def create_new(path: Path, mode: int = 0o600) -> None:
    """open_new() for a file another program (qemu-img, cp) then writes into."""
    os.close(open_new(path, mode))


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def write_private(path: Path, text: str) -> None:
    """Write a new file readable by root only (it describes guest data), durably; created
    exclusively and never through a symlink (a file already at the name is refused, not truncated)."""
    fd = open_new(path, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_KINDS = {stat.S_IFLNK: "a symlink", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def file_kind(mode: int) -> str:
    """'a symlink', 'a character device', ... for messages ('a regular file' for one)."""
    return _KINDS.get(stat.S_IFMT(mode), "a regular file" if stat.S_ISREG(mode) else "a special file")


def checked_dir(path: Path, what: str, follow: bool = True) -> int:
    """An fd of the directory `path` after checking it is a place to create `what` in
    (env.unsafe_dir: owned by root or us, not writable by other users unless sticky); UnsafePath
    (exit 2) otherwise. Work relative to the fd: the directory checked is the one written."""
    try:
        fd = env.open_dir(path, follow)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePath(f"{path} is a symlink; not creating {what} through it") from None
        raise OperationFailed(f"cannot open {path} for {what}: {e.strerror}") from None
    problem = env.unsafe_dir(os.fstat(fd))
    if problem:
        os.close(fd)
        raise UnsafePath(f"not writing {what} into {path}: {problem}")
    return fd


Ours = Callable[[bytes], bool]


def check_replaceable(dir_fd: int, name: str, path: Path, what: str, ours: Optional[Ours] = None) -> None:
    """Refuse (UnsafePath, exit 2) to replace `name` in `dir_fd` unless it is absent or a regular
    file; with `ours`, also unless it is owned by this user and empty or `ours(its first 4 KiB)`:
    a device node, fifo, symlink or somebody else's file is never replaced by our file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is {file_kind(st.st_mode)}, not {what} virtbackup wrote; not replacing it")
    if ours is None:
        return
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{path} is owned by uid {st.st_uid}, not {what} virtbackup wrote; not replacing it")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            head = os.read(fd, 4096)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UnsafePath(f"cannot read {path} ({e.strerror}); not replacing it") from None
    if head and not ours(head):
        raise UnsafePath(f"{path} does not look like {what} virtbackup wrote; not replacing it "
                         "(remove it, or choose another name)")


def replace_file(path: Path, data: bytes, mode: int, what: str, ours: Optional[Ours] = None,
                 check_dir: bool = True) -> None:
    """Replace `path` atomically and durably: a temp file beside it with a name of this process
    (created exclusively, never through a link, `mode` whatever the umask), fsync, rename over
    `path`, fsync the directory; all relative to one fd of the directory.

    `check_dir`: the directory must pass `checked_dir` (owned by root or us, not writable by
    others unless sticky). What is at `path` must pass `check_replaceable` (a regular file; with
    `ours`, one we wrote). Refusals are UnsafePath (exit 2); on failure the temp file is removed
    and OperationFailed names `what`; `path` is untouched either way."""
    path = Path(path)
    if check_dir:
        dfd = checked_dir(path.parent, what)
    else:
        try:
            dfd = env.open_dir(path.parent)
        except OSError as e:
            raise OperationFailed(f"cannot write {what} {path}: {e.strerror}") from None
    tmp = f".{path.name}.{os.getpid()}.tmp"
    made = False
    try:
        check_replaceable(dfd, path.name, path, what, ours)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=dfd)
        except FileExistsError:
            if stat.S_ISLNK(os.stat(tmp, dir_fd=dfd, follow_symlinks=False).st_mode):
                raise UnsafePath(f"{path.parent / tmp} is a symlink where virtbackup creates its own file; "
                                 "not following it") from None
            raise OperationFailed(f"{path.parent / tmp} exists; not overwriting it") from None
        made = True
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        check_replaceable(dfd, path.name, path, what, ours)   # again: it may have appeared meanwhile
        os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        made = False
        try:
            os.fsync(dfd)
        except OSError:
            pass            # renamed: the new file is what readers see; durability is best effort
    except OSError as e:
        raise OperationFailed(f"cannot write {what} {path}: {e.strerror}") from None
    finally:
        if made:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
        os.close(dfd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, to make the new entry durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class DiskImage:
    image: str                      # path relative to BACKUP_DIR
    backing: Optional[str]          # image this one is layered on (relative to BACKUP_DIR), None = standalone
    virtual_size: int
    size: int                       # bytes of the image file at backup time
    # hash of the image file, with the algorithm that made it (BLAKE3; SHA-256 in older records);
    # None only while the file is being written: a save refuses an image without it
    digest: Optional[Digest]
    source: str = ""                # the domain's disk source when it was backed up
    copied_full: bool = True        # this image holds the whole disk (no backing)
    full_reason: Optional[str] = None   # why a disk of an inc/diff point was copied whole
    # bytes of guest data the image holds (its allocated clusters); with `size` the compression
    # ratio. None in records made before it was counted, and for encrypted images
    data_size: Optional[int] = None

    def record_hash(self, path: Path, alg: str = DEFAULT_HASH) -> None:
        """Hash the final image file and record the digest (integrity.py checks it)."""
        self.digest = Digest.of_file(path, alg)

    @classmethod
    def from_json(cls, data: Any, schema: int) -> "DiskImage":
        """An image record as metadata of `schema` keeps it; records of schema 1 and 2 carry
        their hash in "sha256" or "blake3" (the other one empty or, before BLAKE3, absent)."""
        if not isinstance(data, dict):
            raise ValueError("an image record is not an object")
        rec = dict(data)
        if schema in HASH_FIELD_SCHEMAS:
            if "digest" in rec:
                raise ValueError(f'a schema {schema} image record has a "digest"')
            if "sha256" not in rec:      # every version that wrote this layout wrote it
                raise ValueError('no "sha256" field (a schema 1 or 2 image record has one)')
            sha256, blake3 = rec.pop("sha256"), rec.pop("blake3", "")
            if not isinstance(sha256, str) or not isinstance(blake3, str):
                raise ValueError("wrong field types of sha256/blake3")
            if sha256 and blake3:
                raise ValueError("both a sha256 and a blake3 hash recorded")
            if not (sha256 or blake3):
                raise ValueError("no content hash recorded")
            rec["digest"] = Digest("blake3", blake3) if blake3 else Digest("sha256", sha256)
        else:
            stale = sorted({"sha256", "blake3"} & set(rec))
            if stale:
                raise ValueError(f'a schema {schema} image record has {" and ".join(stale)}, '
                                 'not just a "digest"')
            if "digest" not in rec:
                raise ValueError("no content hash recorded (digest missing)")
            rec["digest"] = Digest.from_json(rec["digest"])
        return cls(**rec)


@dataclass
class Point:
    id: str
    level: Level                    # full | inc | diff
    created: str                    # ISO 8601, when the backup started (its point in time)
    checkpoint: str                 # libvirt checkpoint created with this point
    base_checkpoint: Optional[str]  # checkpoint the incremental/diff copied changes since
    parent: Optional[str]           # point id the images are layered on (None for a full)
    chain: str                      # id of the full point this point depends on
    disks: Dict[str, DiskImage]
    domain_xml: str                 # saved inactive domain XML (relative path)
    checkpoint_xml: str             # saved checkpoint XML, no <domain>, for redefine
    reason: Optional[str] = None    # why this level was chosen (e.g. auto fell back to a full)
    duration: float = 0.0
    # how consistent the data is (quiesce.py): application (guest frozen through its agent, or
    # shut off) | crash; None in metadata written before virtbackup recorded it
    consistency: Optional[str] = None
    consistency_reason: Optional[str] = None
    frozen_seconds: Optional[float] = None      # how long the guest's filesystems were frozen
    transport: str = "push"         # how the data travelled: push | pull | offline (older points: push)
    # a pull over TCP from a remote hypervisor: True = NBD over TLS, False = plaintext (asked for
    # with --insecure-nbd); None = the data never crossed a network (push, offline, local socket)
    nbd_tls: Optional[bool] = None
    encryption: Optional[str] = None    # "luks": every image of the point is LUKS-encrypted
    # "zstd" | "zlib": the images hold qcow2 compressed clusters of that type (any QEMU reads
    # them); None: uncompressed (and every point recorded before compression existed)
    compression: Optional[str] = None
    # hashes of the two XML files, checked like the images (integrity.py) before anything uses
    # them; None in points recorded before they were hashed (their XML is taken as it is)
    domain_xml_digest: Optional[Digest] = None
    checkpoint_xml_digest: Optional[Digest] = None


XML_DIGESTS = ("domain_xml_digest", "checkpoint_xml_digest")


@dataclass
class Chain:
    domain_name: str
    domain_uuid: str
    dir_id: str = field(default_factory=lambda: secrets.token_hex(4))
    points: List[Point] = field(default_factory=list)
    next_seq: int = 1
    schema: int = SCHEMA_VERSION
    path: str = ""      # where the dir was at its last backup: a copy elsewhere must not share the chain
    encryption: Optional[ChainEncryption] = None    # set at the first point; never the key

    # -- queries -------------------------------------------------------------------------------
    def point(self, point_id: Optional[str]) -> Point:
        """A point by id, `latest` (or None), or a time: the newest point at or before it."""
        if not self.points:
            raise PointNotFound("the backup directory has no restore points")
        if point_id in (None, "latest"):
            return self.points[-1]
        for p in self.points:
            if p.id == point_id:
                return p
        when = parse_point_time(point_id)
        if when is not None:
            return self.point_at(when)
        raise PointNotFound(f"no restore point '{point_id}' (see 'virtbackup list')")

    def point_at(self, when: datetime) -> Point:
        """The newest point created at or before `when` (aware datetime)."""
        best: Optional[Point] = None
        for p in self.points:
            if point_time(p) <= when and (best is None or point_time(p) >= point_time(best)):
                best = p
        if best is None:
            raise PointNotFound(f"no restore point at or before {when.isoformat()} "
                                f"(the oldest is {self.points[0].id}, {self.points[0].created})")
        return best

    @property
    def latest(self) -> Optional[Point]:
        return self.points[-1] if self.points else None

    def chain_full(self, point: Point) -> Point:
        return self.point(point.chain)

    def checkpoint_prefix(self) -> str:
        return f"virtbackup-{self.dir_id}-"

    def new_point_id(self) -> str:
        return f"{self.next_seq:04d}"

    def checkpoint_name(self, point_id: str) -> str:
        return f"{self.checkpoint_prefix()}{point_id}"

    def needed_checkpoints(self) -> List[str]:
        """Checkpoints a future backup can start from: the latest point's and its chain's full."""
        last = self.latest
        if last is None:
            return []
        names = [self.chain_full(last).checkpoint, last.checkpoint]
        return list(dict.fromkeys(names))

    def image_chain(self, point: Point, disk: str) -> List[str]:
        """Relative image paths from the point's image down to its standalone base."""
        by_image = {d.image: d for p in self.points for d in p.disks.values()}
        img = point.disks[disk]
        out = [img.image]
        while img.backing is not None:
            img = by_image[img.backing]
            out.append(img.image)
        return out

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        """The metadata in the newest layout (whatever version it was read from)."""
        data = asdict(self)
        data["schema"] = SCHEMA_ENCRYPTED if self.encryption is not None else SCHEMA_VERSION
        if self.encryption is None:
            del data["encryption"]
        return data

    @classmethod
    def from_json(cls, data: Any) -> "Chain":
        """Metadata of any known schema version, validated; `schema` keeps the version read."""
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        schema = data.get("schema")
        if type(schema) is not int or schema not in SCHEMAS:     # bool is an int, true is not 1
            raise ValueError(f"unsupported schema version {schema!r:.40}")
        encryption = None
        if data.get("encryption") is not None:
            encryption = ChainEncryption.from_json(data["encryption"])
        if (encryption is not None) != (schema in ENCRYPTED_SCHEMAS):
            raise ValueError("schema version and encryption do not match")
        points = []
        for p in data["points"]:
            p = dict(p)
            disks = {}
            for k, v in p["disks"].items():
                try:
                    disks[k] = DiskImage.from_json(v, schema)
                except ValueError as e:
                    raise ValueError(f"point {str(p.get('id'))[:40]} disk {str(k)[:40]}: {e}") from None
            p["disks"] = disks
            p["level"] = cast(Level, p.get("level"))   # checked in validate()
            for k in XML_DIGESTS:
                if p.get(k) is None:
                    continue
                if schema in HASH_FIELD_SCHEMAS:
                    raise ValueError(f"point {str(p.get('id'))[:40]}: a schema {schema} point record has {k}")
                try:
                    p[k] = Digest.from_json(p[k])
                except ValueError as e:
                    raise ValueError(f"point {str(p.get('id'))[:40]} {k}: {e}") from None
            points.append(Point(**p))
        chain = cls(domain_name=str(data["domain_name"]), domain_uuid=str(data["domain_uuid"]),
                    dir_id=str(data["dir_id"]), points=points, next_seq=int(data["next_seq"]),
                    schema=schema, path=str(data.get("path", "")), encryption=encryption)
        chain.validate()
        return chain

    def validate(self, hashed: bool = True) -> None:
        """Structural checks; raises ValueError naming the first problem.

        `hashed=False`: images may lack their digest yet (a prune's plan, before it wrote them);
        a save always checks that every image has one."""
        seen: Dict[str, Point] = {}
        images: Dict[str, str] = {}
        ids = [int(p.id) for p in self.points if isinstance(p.id, str) and p.id.isdigit()]
        if ids and self.next_seq <= max(ids):
            raise ValueError(f"next_seq {self.next_seq} is not above the newest point id {max(ids)}")
        for p in self.points:
            if not isinstance(p.id, str) or not isinstance(p.disks, dict):
                raise ValueError("a point has a wrong type of id or disks")
            if p.id in seen:
                raise ValueError(f"duplicate point id {p.id}")
            try:
                datetime.fromisoformat(p.created)
            except (TypeError, ValueError):
                raise ValueError(f"point {p.id}: bad creation time {p.created!r}") from None
            if p.level not in LEVELS:
                raise ValueError(f"point {p.id}: unknown level {p.level!r}")
            if p.consistency not in CONSISTENCIES:
                raise ValueError(f"point {p.id}: unknown consistency {p.consistency!r}")
            if not p.disks:
                raise ValueError(f"point {p.id}: no disks")
            if p.compression not in COMPRESSION_TYPES:
                raise ValueError(f"point {p.id}: unknown compression {str(p.compression)[:40]!r}")
            if p.compression is not None and p.encryption is not None:
                # QEMU cannot write compressed clusters into a LUKS qcow2: such a record is not ours
                raise ValueError(f"point {p.id}: both encrypted and compressed")
            want = self.encryption.format if self.encryption is not None else None
            if p.encryption != want:
                # one chain, one key: a plaintext point in an encrypted chain (or the reverse)
                # is tampering or a bug, never something to restore from silently
                raise ValueError(f"point {p.id}: encryption {p.encryption!r}, the chain's is {want!r}")
            if p.chain not in seen and p.chain != p.id:
                raise ValueError(f"point {p.id}: chain {p.chain} is not an earlier point")
            if p.parent is not None and p.parent not in seen:
                raise ValueError(f"point {p.id}: parent {p.parent} is not an earlier point")
            for rel in (p.domain_xml, p.checkpoint_xml):
                check_relative(rel)
            for k in XML_DIGESTS:
                xd = getattr(p, k)
                if xd is None:
                    continue
                if not isinstance(xd, Digest):
                    raise ValueError(f"point {p.id}: {k} has a wrong type")
                try:
                    xd.check()
                except ValueError as e:
                    raise ValueError(f"point {p.id} {k}: {e}") from None
            for name, d in p.disks.items():
                if not isinstance(name, str) or not DISK_NAME.match(name):
                    raise ValueError(f"point {p.id}: disk name {name!r} is not a disk target name "
                                     "(letters and digits)")
                if not isinstance(d.image, str) or not isinstance(d.size, int) or not isinstance(d.virtual_size, int) \
                        or not isinstance(d.digest, (Digest, type(None))) \
                        or not isinstance(d.data_size, (int, type(None))) or isinstance(d.data_size, bool) \
                        or (d.data_size is not None and d.data_size < 0):
                    raise ValueError(f"point {p.id} disk {name}: wrong field types")
                if d.digest is None:
                    if hashed:
                        raise ValueError(f"point {p.id} disk {name}: no content hash recorded")
                else:
                    try:
                        d.digest.check()
                    except ValueError as e:
                        raise ValueError(f"point {p.id} disk {name}: {e}") from None
                check_relative(d.image)
                if d.image in images:
                    raise ValueError(f"point {p.id}: image {d.image} listed twice")
                if d.backing is not None:
                    check_relative(d.backing)
                    if d.backing not in images:
                        raise ValueError(f"point {p.id} disk {name}: backing {d.backing} is not an earlier image")
                images[d.image] = p.id
            seen[p.id] = p


def point_json(p: Point) -> Dict[str, Any]:
    """A point record as `list --json` and `backup --json` print it (its fields plus "size")."""
    d = asdict(p)
    d["size"] = sum(img.size for img in p.disks.values())
    return d


def data_ratio(images: List[DiskImage]) -> Optional[float]:
    """Guest data bytes per stored byte over `images` (2.0: stored in half the room), counting
    only images whose data size is recorded; None when none is."""
    known = [i for i in images if i.data_size is not None]
    stored = sum(i.size for i in known)
    if not known or stored <= 0:
        return None
    return round(sum(i.data_size or 0 for i in known) / stored, 3)


def parse_point_time(spec: str) -> Optional[datetime]:
    """An ISO 8601 time (`Z` or an offset; naive means UTC), or None when `spec` is not a time.

    A bare date means that day's 00:00 UTC. Point ids (digits only) are never taken for times.
    """
    if not spec or spec.isdigit() or not spec[:1].isdigit():
        return None
    text = spec.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


def point_time(p: Point) -> datetime:
    """When the point's backup started, as an aware datetime (naive metadata is taken as UTC)."""
    when = datetime.fromisoformat(p.created.replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def check_relative(rel: str) -> None:
    """A metadata path must be relative and stay inside BACKUP_DIR."""
    if not isinstance(rel, str):
        raise ValueError(f"path {rel!r} is not a string")
    pp = PurePosixPath(rel)
    if not rel or pp.is_absolute() or ".." in pp.parts or "\\" in rel:
        raise ValueError(f"path {rel!r} points outside the backup directory")


# What a directory may hold before its first point and still be taken as new: what a first run
# killed before it recorded the empty chain leaves (its lock file, its run log), and a fresh
# filesystem's lost+found.
FRESH_DIR_ENTRIES = frozenset({LOCKFILE, "logs", "lost+found"})


class BackupDir:
    """A BACKUP_DIR: one domain's restore points, their metadata and its lock."""

    def __init__(self, path: Path):
        # absolute: libvirt's backup XML needs absolute target paths, and messages name it fully
        self.path = Path(os.path.abspath(path))

    @property
    def metadata(self) -> Path:
        return self.path / METADATA

    def exists(self) -> bool:
        return self.metadata.exists()

    def check_usable(self) -> bool:
        """Fail (exit 2) before anything starts when the directory can't be used for a backup.

        Returns True when the directory still has to be created (its parent exists).
        """
        p = self.path
        if not p.exists():
            if not p.parent.is_dir():
                raise BackupDirError(f"cannot create backup directory {p}: {p.parent} does not exist")
            if not os.access(p.parent, os.W_OK | os.X_OK):
                raise BackupDirError(f"cannot create backup directory {p}: {p.parent} is not writable")
            return True
        if not p.is_dir():
            raise BackupDirError(f"{p} is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise BackupDirError(f"backup directory {p} is not writable")
        if not self.metadata.exists() and not self.metadata.is_symlink():
            # Without our metadata nothing here is provably ours: a dir whose virtbackup.json was
            # lost must not lose a point per run as "left unrecorded by an interrupted run".
            foreign = sorted(set(os.listdir(p)) - FRESH_DIR_ENTRIES)
            if foreign:
                raise BackupDirError(f"{p} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
                                     f" and holds no virtbackup metadata ({METADATA}); nothing was changed: give an "
                                     "empty or new directory")
        return False

    def create(self) -> None:
        try:
            self.path.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise BackupDirError(f"cannot create backup directory {self.path}: {e.strerror}") from None

    def load(self) -> Chain:
        if not self.path.is_dir():
            raise BackupDirError(f"backup directory {self.path} does not exist" if not self.path.exists()
                                 else f"{self.path} is not a directory")
        if not self.metadata.exists():
            raise BackupDirError(f"{self.path} holds no virtbackup metadata ({METADATA} missing)")
        try:
            fd = os.open(self.metadata, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"{self.metadata} is a symlink; virtbackup never follows symlinks "
                                 "inside a backup directory") from None
            raise ChainCorrupt(f"cannot read {self.metadata}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                text = f.read().decode()
            data = json.loads(text)
            return Chain.from_json(data)
        except RecursionError:
            raise ChainCorrupt(f"chain metadata {self.metadata} is corrupt: nested too deeply") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ChainCorrupt(f"chain metadata {self.metadata} is corrupt: {e}") from None
        except OSError as e:
            raise ChainCorrupt(f"cannot read {self.metadata}: {e.strerror}") from None

    def load_or_none(self) -> Optional[Chain]:
        return self.load() if self.exists() else None

    def save(self, chain: Chain) -> None:
        """Atomic commit: temp file, fsync, rename over the old file, fsync the directory.

        Raises only when nothing was committed: once the rename is done the new metadata is
        what a reader sees, so a failing directory fsync afterwards must not make the caller
        roll back (it would delete a recorded point's images).
        """
        chain.validate()
        data = json.dumps(chain.to_json(), indent=2, sort_keys=True) + "\n"
        # The directory is not ownership-checked: a backup dir on NFS with root_squash belongs to
        # nobody. What is in it is ours or refused (never a link followed, never a special file).
        replace_file(self.metadata, data.encode(), 0o600, "chain metadata", check_dir=False)
        try:
            dfd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass   # committed; durability of the rename is best effort from here

    def resolve(self, rel: str) -> Path:
        """The path of a metadata-relative name; refuses (exit 2) a symlink on the way.

        Only what the tool itself created lives under BACKUP_DIR: a symlink there was put by
        someone else, and following it would read, write or delete outside the directory."""
        check_relative(rel)
        path = self.path
        for part in PurePosixPath(rel).parts:
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                break
            except OSError:
                break
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{path} is a symlink; virtbackup never follows symlinks inside "
                                 "a backup directory")
        return self.path / rel

    def backing_link(self, image: str, backing: Optional[str]) -> Optional[str]:
        """What the qcow2 header of `image` must name as its backing file: relative to the
        image's directory, so the backup dir can move. Both arguments relative to BACKUP_DIR."""
        if backing is None:
            return None
        return os.path.relpath(self.resolve(backing), self.resolve(image).parent)

    def check_owner(self, chain: Chain, name: str, uuid: str) -> None:
        """Refuse (exit 2) a domain other than the one this directory holds backups of, and a
        copy of a backup dir: it carries the original's chain id, hence its checkpoint names,
        and backing up into both would make each delete the other's checkpoints. A moved dir,
        or the same dir through a symlink or bind mount, is fine."""
        if chain.domain_uuid != uuid:
            raise BackupDirError(f"{self.path} holds backups of domain '{chain.domain_name}' "
                                 f"({chain.domain_uuid}), not of '{name}' ({uuid})")
        if not chain.path or chain.path == str(self.path):
            return
        try:
            if os.path.samefile(chain.path, self.path):
                return
        except OSError:
            pass
        try:
            original = BackupDir(Path(chain.path)).load_or_none()
        except (BackupDirError, ChainCorrupt):
            original = None
        if original is not None and original.dir_id == chain.dir_id:
            raise BackupDirError(f"{self.path} is a copy of {chain.path} (same chain id {chain.dir_id}); "
                                 f"back up into {chain.path}, or into a new directory")

    def point_dir(self, point_id: str, partial: bool = False) -> Path:
        return self.path / POINTS_DIR / (point_id + (PARTIAL_SUFFIX if partial else ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holders(fd: int) -> Dict[int, str]:
    """Live processes holding an flock on the file of `fd`: pid -> READ (shared) or WRITE.

    From /proc/locks, by inode: the pid a lock file's content names may have exited (its
    lock went with it, the next holder may not have written its own pid yet), so the kernel's
    list is the only honest answer. Empty when /proc/locks can't be read."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: Dict[int, str] = {}
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if "->" in parts:            # a waiter, not a holder
            continue
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[5] != key:
            continue
        try:
            pid = int(parts[4])
        except ValueError:
            continue
        if pid > 0 and _alive(pid):
            if out.get(pid) != "WRITE":
                out[pid] = parts[3]
    return out


class FileLock:
    """An flock(2) lock: released by the kernel when the holder dies, so it can't go stale.

    `shared`: readers (restore, verify, files) share it; writers (backup, prune, repair) hold
    it alone. A writer finding another writer fails at once (one run at a time, invariant 7);
    waiting for readers to finish, or a reader for a writer, is bounded by `wait` seconds
    (default $VIRTBACKUP_LOCK_WAIT, else 60), then refused naming the live holders.
    The lock file is opened with O_NOFOLLOW relative to its directory and must be a regular file
    with one link: a symlink, a device node, a fifo or a hard link to another file is refused,
    never truncated or written.

    `run_dir`: a lock in the run directory (domain, job): the directory must pass `checked_dir`,
    the file must be ours, and it is removed when released, so /run/virtbackup does not keep one
    file per domain ever backed up. That is race-free because the file is removed only by its
    exclusive holder, and a taker checks after flock that the name still leads to the inode it
    locked (else it locked a removed file and tries again).
    """

    def __init__(self, path: Path, what: str, shared: bool = False, wait: Optional[float] = None,
                 run_dir: bool = False):
        self.path = path
        self.what = what
        self.shared = shared
        self.run_dir = run_dir and not shared
        if wait is None:
            try:
                wait = float(os.environ.get(LOCK_WAIT_ENV, LOCK_WAIT_DEFAULT))
            except ValueError:
                wait = LOCK_WAIT_DEFAULT
        self.wait = wait
        self.fd: Optional[int] = None
        self.dir_fd: Optional[int] = None

    def _open_dir(self) -> int:
        parent = self.path.parent
        try:
            st = os.lstat(parent)
            if stat.S_ISLNK(st.st_mode) and self.path.name != LOCKFILE:
                raise UnsafePath(f"{parent} is a symlink; not using it for locks")
        except FileNotFoundError:
            if self.shared:      # a reader never creates the directory it was asked to read
                raise UsageError(f"backup directory {parent} does not exist") from None
            os.makedirs(parent, mode=0o700, exist_ok=True)
        if self.run_dir:
            return checked_dir(parent, "lock files")
        return env.open_dir(parent)

    def _open(self, dfd: int) -> Optional[int]:
        name = self.path.name
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:        # not even opened when it is no regular file (opening a device can act on it)
            st0 = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st0.st_mode) and not stat.S_ISLNK(st0.st_mode):
                raise UnsafePath(f"lock file {self.path} is {file_kind(st0.st_mode)}, not a lock file of "
                                 "virtbackup's; not using it (remove it if you did not put it there)")
        except FileNotFoundError:
            pass
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"lock file {self.path} is a symlink; not following it "
                                 "(remove it if you did not put it there)") from None
            if self.shared and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                try:      # a read-only backup dir: nobody can change it, a reader needs no lock
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
                except FileNotFoundError:
                    return None
            else:
                raise
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"is {file_kind(st.st_mode)}"
        elif st.st_nlink != 1:
            problem = f"has {st.st_nlink} hard links (a link to another file?)"
        elif self.run_dir and st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}"
        if problem:
            os.close(fd)
            raise UnsafePath(f"lock file {self.path} {problem}, not a lock file of virtbackup's; "
                             "not using it (remove it if you did not put it there)")
        return fd

    def _busy(self, fd: int, holders: Dict[int, str]) -> LockBusy:
        if not holders:
            return LockBusy(f"another virtbackup run is using {self.what}")
        pids = ", ".join(str(p) for p in sorted(holders))
        if all(m == "READ" for m in holders.values()):
            return LockBusy(f"{self.what} is being read (restore or verify, pid {pids}); "
                            f"gave up waiting after {self.wait:g} s; try again when it has ended")
        return LockBusy(f"another virtbackup run (pid {pids}) is using {self.what}")

    def _same_file(self, fd: int, dfd: int) -> bool:
        """Does the lock's name still lead to the inode of `fd` (not removed by a releasing holder)?"""
        try:
            st = os.stat(self.path.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def __enter__(self) -> "FileLock":
        try:
            dfd = self._open_dir()
        except OSError as e:
            raise OperationFailed(f"cannot open the directory of lock file {self.path}: {e.strerror}") from None
        try:
            fd = self._lock(dfd)
        except BaseException:
            os.close(dfd)
            raise
        if fd is None:
            os.close(dfd)
            return self
        if not self.shared:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            except OSError:
                pass
        self.fd, self.dir_fd = fd, dfd
        return self

    def _lock(self, dfd: int) -> Optional[int]:
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.wait
        while True:
            fd = self._open(dfd)
            if fd is None:
                return None
            try:
                while True:
                    try:
                        fcntl.flock(fd, op)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                            raise
                    holders = lock_holders(fd)
                    writer = any(m == "WRITE" for m in holders.values())
                    # a writer never waits for another writer; everything else waits, bounded
                    if (not self.shared and writer) or time.monotonic() >= deadline:
                        raise self._busy(fd, holders)
                    time.sleep(0.1)
                if not self.run_dir or self._same_file(fd, dfd):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)           # its holder removed it while we waited: lock the new one

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            if self.run_dir and self.dir_fd is not None and self._same_file(self.fd, self.dir_fd):
                try:
                    os.unlink(self.path.name, dir_fd=self.dir_fd)     # still held: nobody else has it
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = None
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


def domain_lock(uuid: str) -> FileLock:
    return FileLock(env.run_dir() / f"domain-{uuid}.lock", f"domain {uuid}", run_dir=True)


def dir_lock(backup_dir: BackupDir) -> FileLock:
    """The exclusive lock of a backup dir: backup, prune, repair."""
    return FileLock(backup_dir.path / LOCKFILE, f"backup directory {backup_dir.path}")


def shared_lock(backup_dir: BackupDir, wait: Optional[float] = None) -> FileLock:
    """The shared lock of a backup dir, for anything that only reads it (restore, verify, files):
    a prune can't delete or replace what a reader is reading."""
    return FileLock(backup_dir.path / LOCKFILE, f"backup directory {backup_dir.path}", shared=True, wait=wait)
