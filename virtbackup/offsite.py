"""Off-site copies of a backup directory on S3 object storage (`virtbackup offsite ...`).

The remote copy keeps the chain's guarantees (docs/offsite.md has the user's side):
- Layout: `PREFIX/<path>` for every file the chain metadata records (images and saved XML,
  their BACKUP_DIR-relative paths), and `PREFIX/virtbackup-offsite.json`, the manifest: the
  chain metadata as pushed plus, per file, the object's size, ETag, version id and retention.
- The manifest is the commit record, as `virtbackup.json` is locally: a push uploads every file
  the remote does not hold yet (each image once: a file already there, recorded with the same
  digest and still present at its version, is skipped), checks each against what was read
  (the server's ETag of every part and of the whole object), locks them, and only then writes the
  manifest in one PUT (atomic in S3). A push killed anywhere leaves the old manifest, hence the
  old consistent chain; the uploaded parts stay and the next push resumes them (ListParts: a
  part whose size and MD5 match the local bytes is not sent again).
- Every object is addressed by the version id the manifest records, so a plain DELETE (a delete
  marker) neither hides nor destroys a point; with `--lock-days N` every object version and the
  manifest get an S3 Object Lock retention in COMPLIANCE mode (GOVERNANCE can be lifted by the
  bucket owner, i.e. by the very credentials a compromised host has).
- The remote manifest is input from elsewhere: it is validated as strictly as local metadata
  (Chain.from_json), every file name must be a plain `points/...` path, and pull writes only
  below LOCAL_DIR, creating every file exclusively and never through a link. The BLAKE3 (or
  older SHA-256) digests in the chain metadata decide whether a downloaded file is intact.

boto3 is imported only here and only when an offsite command runs (the `s3` extra).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from virtbackup import env, observe
from virtbackup.errors import (
    ChainCorrupt,
    DamageFound,
    OperationFailed,
    OutputExists,
    UnsafePath,
    UsageError,
    VirtBackupError,
)
from virtbackup.store import integrity
from virtbackup.store.chain import BackupDir, Chain, FileLock, Point, now_iso, open_new, point_json, shared_lock
from virtbackup.store.digest import Digest, hasher

log = logging.getLogger("virtbackup.offsite")

MANIFEST = "virtbackup-offsite.json"
FORMAT = "virtbackup-offsite"
FORMAT_VERSION = 1
# COMPLIANCE: no user, not even the bucket owner, can shorten it or delete a locked version.
# GOVERNANCE can be bypassed by anyone with s3:BypassGovernanceRetention, which the bucket
# owner (on Ceph RGW: the user whose keys the host has) holds: no protection from that host.
LOCK_MODE = "COMPLIANCE"
MAX_LOCK_DAYS = 36_500
MiB = 1 << 20
MIN_PART = 5 * MiB              # S3's smallest part (but the last)
DEFAULT_PART = 8 * MiB             # what s3transfer uses; 10000 parts: 80 GiB, larger files get larger parts
MAX_PARTS = 10_000
MAX_MANIFEST = 64 * MiB
PART_SIZE_ENV = "VIRTBACKUP_OFFSITE_PART_SIZE"     # bytes; tests use small parts
THREADS_ENV = "VIRTBACKUP_OFFSITE_THREADS"
DEFAULT_THREADS = 8
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ETAG = re.compile(r"^[0-9a-f]{32}(-[1-9][0-9]{0,4})?$")
_VERSION_ID = re.compile(r"^[A-Za-z0-9._+/=-]{1,1024}$")
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}$")


class RemoteError(OperationFailed):
    """The S3 server could not be reached, refused a request, or stored something else than sent."""

    kind = "remote"


# --- the remote's address ----------------------------------------------------------------------
@dataclass(frozen=True)
class Remote:
    bucket: str
    prefix: str             # "" or "a/b" (no leading or trailing slash)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST)

    def where(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"


def parse_url(url: str) -> Remote:
    """`s3://BUCKET[/PREFIX]`; UsageError (exit 2) for anything else."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise UsageError(f"{url!r:.80} is not an s3://BUCKET/PREFIX URL")
    bucket, _, prefix = url[5:].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"{bucket!r:.80} is not an S3 bucket name (3-63 lowercase letters, digits, '.', '-')")
    prefix = prefix.strip("/")
    if prefix:
        parts = prefix.split("/")
        if any(p in ("", ".", "..") or not p.isprintable() or "\\" in p for p in parts):
            raise UsageError(f"prefix {prefix!r:.80} has an empty, '.' or '..' component or a control character")
    return Remote(bucket, prefix)


# --- the files of a chain --------------------------------------------------------------------------
@dataclass
class FileRef:
    rel: str                        # relative to BACKUP_DIR; the object key is PREFIX/rel
    point: str                      # the point that recorded it
    disk: str                       # "" for a point's XML file
    digest: Optional[Digest]        # what the chain metadata recorded (None: XML of an old point)
    size: Optional[int]             # images: the recorded size


def check_name(rel: str) -> None:
    """A file name of remote metadata that pull may create below LOCAL_DIR: `points/...`, plain
    components only (no hidden files, no '..', no control characters). ValueError otherwise."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if len(parts) < 2 or parts[0] != "points" or not all(_NAME_PART.match(p) for p in parts[1:]):
        raise ValueError(f"file name {rel!r:.80} is not a plain points/... path")


def chain_files(chain: Chain, points: Optional[Sequence[Point]] = None) -> Dict[str, FileRef]:
    """Every file the chain (or these points of it) records, in chain order; ValueError when one
    name is used twice or is not a plain name."""
    out: Dict[str, FileRef] = {}
    for p in (chain.points if points is None else points):
        refs = [FileRef(d.image, p.id, name, d.digest, d.size) for name, d in p.disks.items()]
        refs += [FileRef(p.domain_xml, p.id, "", p.domain_xml_digest, None),
                 FileRef(p.checkpoint_xml, p.id, "", p.checkpoint_xml_digest, None)]
        for ref in refs:
            check_name(ref.rel)
            if ref.rel in out:
                old = out[ref.rel]
                # a prune's new base may take over a dropped full's checkpoint XML under the same name
                if old.disk or ref.disk or old.digest != ref.digest:
                    raise ValueError(f"file {ref.rel} is recorded twice")
                continue
            out[ref.rel] = ref
    return out


def closure(chain: Chain, point: Point) -> List[Point]:
    """The point and every point its images or records depend on, in chain order."""
    owner = {d.image: p.id for p in chain.points for d in p.disks.values()}
    want: Set[str] = set()
    todo = [point.id]
    while todo:
        pid = todo.pop()
        if pid in want:
            continue
        want.add(pid)
        p = chain.point(pid)
        todo += [x for x in (p.parent, p.chain) if x is not None]
        todo += [owner[d.backing] for d in p.disks.values() if d.backing is not None]
    return [p for p in chain.points if p.id in want]


# --- the manifest ----------------------------------------------------------------------------------
@dataclass
class RemoteObject:
    size: int
    etag: str                       # the S3 ETag without quotes: MD5 hex, or MD5-of-part-MD5s "-N"
    version_id: Optional[str]       # None on a bucket without versioning
    retain_until: Optional[str] = None   # ISO 8601 Object Lock retention, None: not locked


@dataclass
class Manifest:
    chain: Chain
    objects: Dict[str, RemoteObject]
    pushed: str
    lock_mode: Optional[str] = None
    lock_days: int = 0

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "pushed": self.pushed,
                "lock": {"mode": self.lock_mode, "days": self.lock_days} if self.lock_mode else None,
                "chain": self.chain.to_json(),
                "objects": {k: asdict(v) for k, v in self.objects.items()}}

    def retain_until(self) -> Optional[str]:
        """The earliest retention of any object (None when any is unlocked)."""
        dates = [o.retain_until for o in self.objects.values()]
        return None if not dates or any(d is None for d in dates) else min(d for d in dates if d)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest as read from the server, validated; ChainCorrupt (exit 2) naming what is wrong."""
    try:
        if len(raw) > MAX_MANIFEST:
            raise ValueError(f"larger than {MAX_MANIFEST} bytes")
        data = json.loads(raw.decode())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a virtbackup off-site manifest")
        if set(data) != {"format", "version", "pushed", "lock", "chain", "objects"}:
            raise ValueError("unexpected or missing top-level members")
        if type(data["version"]) is not int or data["version"] != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest version {data['version']!r:.40}")
        pushed = data["pushed"]
        if not isinstance(pushed, str):
            raise ValueError("pushed is not a string")
        datetime.fromisoformat(pushed)
        lock = data["lock"]
        mode, days = None, 0
        if lock is not None:
            if not isinstance(lock, dict) or set(lock) != {"mode", "days"} or lock["mode"] not in ("COMPLIANCE",
                                                                                                  "GOVERNANCE") \
                    or type(lock["days"]) is not int or not 1 <= lock["days"] <= MAX_LOCK_DAYS:
                raise ValueError("lock is not {\"mode\", \"days\"}")
            mode, days = lock["mode"], lock["days"]
        chain = Chain.from_json(data["chain"])
        files = chain_files(chain)
        objs = data["objects"]
        if not isinstance(objs, dict) or set(objs) != set(files):
            missing = sorted(set(files) - set(objs)) if isinstance(objs, dict) else []
            raise ValueError("objects do not match the chain's files" + (f": {missing[0]} missing" if missing else ""))
        objects: Dict[str, RemoteObject] = {}
        for rel, o in objs.items():
            if not isinstance(o, dict) or set(o) != {"size", "etag", "version_id", "retain_until"}:
                raise ValueError(f"object record of {rel} has unexpected or missing members")
            if type(o["size"]) is not int or o["size"] < 0 or not isinstance(o["etag"], str) \
                    or not _ETAG.match(o["etag"]):
                raise ValueError(f"object record of {rel} has a bad size or etag")
            if o["version_id"] is not None and (not isinstance(o["version_id"], str)
                                                or not _VERSION_ID.match(o["version_id"])):
                raise ValueError(f"object record of {rel} has a bad version id")
            if o["retain_until"] is not None:
                if not isinstance(o["retain_until"], str):
                    raise ValueError(f"object record of {rel} has a bad retain_until")
                datetime.fromisoformat(o["retain_until"])
            ref = files[rel]
            if ref.size is not None and ref.size != o["size"]:
                raise ValueError(f"object {rel}: size {o['size']} but the chain records {ref.size}")
            objects[rel] = RemoteObject(**o)
        return Manifest(chain, objects, pushed, mode, days)
    except RecursionError:
        raise ChainCorrupt(f"remote metadata {where} is corrupt: nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ChainCorrupt(f"remote metadata {where} is corrupt: {e}; nothing was changed") from None


# --- the S3 client and its errors ------------------------------------------------------------------
class S3:
    """A boto3 S3 client for one remote (boto3 imported here, when an offsite command runs)."""

    def __init__(self, remote: Remote, endpoint_url: Optional[str] = None, profile: Optional[str] = None):
        try:
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]
        except ImportError:
            raise UsageError("offsite commands need boto3: pip install 'virtbackup[s3]' "
                             "(or apt-get install python3-boto3)") from None
        self.remote = remote
        self.bucket = remote.bucket
        opts: Dict[str, Any] = dict(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                                    read_timeout=120, max_pool_connections=32)
        try:     # botocore >= 1.36 adds CRC checksums by default, which older S3 servers (Ceph 16) refuse
            config = Config(request_checksum_calculation="when_required",
                            response_checksum_validation="when_required", **opts)
        except TypeError:
            config = Config(**opts)
        with translated(remote):
            session = boto3.session.Session(profile_name=profile)
            self.client = session.client("s3", endpoint_url=endpoint_url or None, config=config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_manifest(self) -> Optional[Tuple[Manifest, datetime]]:
        """The newest manifest and when it was written, None when the prefix holds none."""
        key = self.remote.manifest_key
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if _code(e) not in ("NoSuchKey", "404"):
                raise
            # a plain DELETE on a versioned bucket only adds a delete marker: the newest real
            # version is still the last manifest a push wrote (and, locked, cannot be removed)
            newest = None
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key):
                for v in page.get("Versions", []):
                    if v["Key"] == key and (newest is None or v["LastModified"] > newest["LastModified"]):
                        newest = v
            if newest is None:
                return None
            log.warning("%s is hidden by a delete marker; reading its newest version %s",
                        self.remote.where(MANIFEST), newest["VersionId"])
            r = self.client.get_object(Bucket=self.bucket, Key=key, VersionId=newest["VersionId"])
        raw = r["Body"].read(MAX_MANIFEST + 1)
        return parse_manifest(raw, self.remote.where(MANIFEST)), r["LastModified"]

    def head(self, rel: str, obj: RemoteObject) -> Optional[Dict[str, Any]]:
        """HEAD of the recorded version; None when it is gone."""
        kw = {"VersionId": obj.version_id} if obj.version_id else {}
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self.remote.key(rel), **kw))
        except Exception as e:
            if _code(e) in ("NoSuchKey", "NoSuchVersion", "404", "405"):
                return None
            raise

    def lock_enabled(self) -> bool:
        try:
            r = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except Exception as e:
            if _code(e) in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound",
                            "InvalidRequest", "NotImplemented"):
                return False
            raise
        return bool(r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _message(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        msg = resp.get("Error", {}).get("Message")
        code = _code(e)
        op = getattr(e, "operation_name", "request")
        return f"{op}: {code}" + (f" ({msg})" if msg and msg != "None" else "")
    return str(e)


@contextmanager
def translated(remote: Remote) -> Iterator[None]:
    """boto3's exceptions as virtbackup's errors: no credentials, unknown profile or bucket, bad
    keys: UsageError (exit 2); unreachable, refused, timed out: RemoteError (exit 1)."""
    try:
        yield
    except VirtBackupError:
        raise
    except Exception as e:
        mod = type(e).__module__ or ""
        if not (mod.startswith("botocore") or mod.startswith("boto3") or mod.startswith("s3transfer")
                or mod.startswith("urllib3")):
            raise
        from botocore import exceptions as bx  # type: ignore[import-untyped]
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            raise UsageError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use a "
                             "profile (~/.aws/credentials, --profile); nothing was changed") from e
        if isinstance(e, bx.ProfileNotFound):
            raise UsageError(f"{e}; nothing was changed") from e
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectTimeoutError,
                          bx.ReadTimeoutError, bx.HTTPClientError)):
            raise RemoteError(f"cannot reach the S3 server for {remote.url}: {e}") from e
        code = _code(e)
        if code == "NoSuchBucket" or (code == "404" and getattr(e, "operation_name", "") == "HeadBucket"):
            raise UsageError(f"bucket {remote.bucket} does not exist; nothing was changed") from e
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UsageError(f"the S3 server refused the credentials ({code}); nothing was changed") from e
        if isinstance(e, bx.ClientError):
            raise RemoteError(f"S3 server refused {_message(e)} on {remote.url}") from e
        raise RemoteError(f"S3 request for {remote.url} failed: {e}") from e


# --- rate limit ----------------------------------------------------------------------------------------
class Throttle:
    """At most `rate` bytes per second over the whole push (all threads together)."""

    def __init__(self, rate: Optional[int]):
        self.rate = rate
        self.lock = threading.Lock()
        self.start: Optional[float] = None
        self.sent = 0

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            if self.start is None:
                self.start = now
            self.sent += n
            due = self.start + self.sent / self.rate
        delay = due - time.monotonic()
        while delay > 0:
            observe.check()
            time.sleep(min(delay, 0.25))
            delay = due - time.monotonic()


def part_size(size: int) -> int:
    """The part size of an object of `size` bytes ($VIRTBACKUP_OFFSITE_PART_SIZE, else 8 MiB;
    at least 5 MiB, and large enough for S3's 10000 parts). The same file gets the same part size
    on every run: that is what lets a push resume a killed one's parts."""
    try:
        want = int(os.environ.get(PART_SIZE_ENV, "") or DEFAULT_PART)
    except ValueError:
        want = DEFAULT_PART
    want = max(MIN_PART, want)
    need = -(-size // MAX_PARTS)
    return max(want, -(-need // MiB) * MiB)


def threads() -> int:
    try:
        return max(1, min(32, int(os.environ.get(THREADS_ENV, "") or DEFAULT_THREADS)))
    except ValueError:
        return DEFAULT_THREADS


def multipart_etag(md5s: Sequence[bytes]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the parts' MD5s, '-', the number of parts."""
    return f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(md5s)}"


def _pread(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            raise OperationFailed("file shrank while it was read for upload")
        chunks.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(chunks)


def _b64(md5: bytes) -> str:
    return base64.b64encode(md5).decode()


# --- push ------------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    url: str
    domain: str
    points: List[str]                  # every point the remote holds now
    points_sent: List[str]             # points new on the remote
    objects_sent: int = 0
    objects_skipped: int = 0           # already there, recorded with the same digest
    bytes_sent: int = 0                # part bytes sent (resumed parts not counted)
    parts_sent: int = 0
    parts_reused: int = 0              # parts of a killed push found on the server, not sent again
    seconds: float = 0.0
    lock_mode: Optional[str] = None
    retain_until: Optional[str] = None  # the earliest retention of any object
    warnings: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["lock"] = {"mode": d.pop("lock_mode"), "retain_until": d.pop("retain_until")} if self.lock_mode else None
        d.pop("lock_mode", None)
        d.pop("retain_until", None)
        return d


class _Pusher:
    def __init__(self, s3: S3, bdir: BackupDir, throttle: Throttle, result: PushResult, total: int):
        self.s3 = s3
        self.bdir = bdir
        self.throttle = throttle
        self.result = result
        self.total = total
        self.done = 0
        self.lock = threading.Lock()

    def progress(self, n: int) -> None:
        with self.lock:
            self.done += n
            done = self.done
        observe.emit("upload", None, done, self.total)

    def upload(self, rel: str, size: int, pool: ThreadPoolExecutor,
               lock_until: Optional[datetime]) -> RemoteObject:
        """One file as one object (a single PUT up to one part, else multipart, resuming parts of
        a killed push); checked against the server's ETags; returns its record."""
        path = self.bdir.resolve(rel)
        key = self.s3.remote.key(rel)
        psize = part_size(size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise OperationFailed(f"{path} was removed while the push ran (a prune?); the remote keeps its "
                                  "previous chain: push again") from None
        try:
            found = self._already_there(fd, key, size, psize)
            if found is not None:
                etag, version = found
            elif size <= psize:
                data = _pread(fd, size, 0)
                md5 = hashlib.md5(data).digest()
                self.throttle.take(size)
                kw: Dict[str, Any] = {}
                if lock_until is not None:
                    kw = {"ObjectLockMode": LOCK_MODE, "ObjectLockRetainUntilDate": lock_until}
                r = self.s3.put_object(Bucket=self.s3.bucket, Key=key, Body=data, ContentMD5=_b64(md5), **kw)
                etag, version = md5.hex(), r.get("VersionId")
                with self.lock:
                    self.result.parts_sent += 1
                    self.result.bytes_sent += size
                self.progress(size)
            else:
                etag, version = self._multipart(fd, key, size, psize, pool)
        finally:
            os.close(fd)
        head = self.s3.head(rel, RemoteObject(size, etag, version))
        if head is None:
            raise RemoteError(f"{self.s3.remote.where(rel)} is missing right after its upload")
        got = str(head.get("ETag", "")).strip('"')
        if int(head.get("ContentLength", -1)) != size or got != etag:
            raise RemoteError(f"the server stored {self.s3.remote.where(rel)} with size "
                              f"{head.get('ContentLength')} and ETag {got}, not {size} and {etag}")
        version = version or head.get("VersionId")
        if version in ("null", ""):
            version = None
        obj = RemoteObject(size, etag, version)
        if lock_until is not None:
            obj.retain_until = self.retain(rel, obj, lock_until)
        return obj

    def _already_there(self, fd: int, key: str, size: int, psize: int) -> Optional[Tuple[str, Optional[str]]]:
        """(ETag, version) of the key's newest version when it already holds exactly these bytes (a
        push killed after this file's upload completed, before its manifest): nothing is sent again."""
        try:
            head = self.s3.head_object(Bucket=self.s3.bucket, Key=key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404", "405"):
                return None
            raise
        if int(head.get("ContentLength", -1)) != size:
            return None
        md5s = [hashlib.md5(_pread(fd, min(psize, size - off), off)).digest()
                for off in range(0, size, psize)] or [hashlib.md5(b"").digest()]
        local = md5s[0].hex() if size <= psize else multipart_etag(md5s)
        if str(head.get("ETag", "")).strip('"') != local:
            return None
        log.debug("%s already holds these bytes (version %s): not sent again", key, head.get("VersionId"))
        with self.lock:
            self.result.parts_reused += len(md5s)
        self.progress(size)
        return local, head.get("VersionId")

    def _multipart(self, fd: int, key: str, size: int, psize: int,
                   pool: ThreadPoolExecutor) -> Tuple[str, Optional[str]]:
        s3, bucket = self.s3, self.s3.bucket
        uploads: List[Dict[str, Any]] = []
        pager = s3.get_paginator("list_multipart_uploads")
        for page in pager.paginate(Bucket=bucket, Prefix=key):
            uploads += [u for u in page.get("Uploads", []) if u.get("Key") == key]
        uploads.sort(key=lambda u: u["Initiated"])
        have: Dict[int, Tuple[int, str]] = {}
        upload_id: Optional[str] = None
        if uploads:
            upload_id = uploads[-1]["UploadId"]
            for stale in uploads[:-1]:          # older killed pushes of the same file: superseded
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=stale["UploadId"])
            for page in s3.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
                for p in page.get("Parts", []):
                    have[int(p["PartNumber"])] = (int(p["Size"]), str(p["ETag"]).strip('"'))
            log.debug("resuming upload %s of %s: %d part(s) on the server", upload_id, key, len(have))
        else:
            upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        nparts = -(-size // psize)

        def part(n: int) -> Tuple[bytes, bool]:
            off = (n - 1) * psize
            length = min(psize, size - off)
            data = _pread(fd, length, off)
            md5 = hashlib.md5(data).digest()
            if have.get(n) == (length, md5.hex()):
                self.progress(length)
                return md5, False
            self.throttle.take(length)
            observe.check()
            try:
                r = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=data,
                                   ContentMD5=_b64(md5))
            except Exception as e:
                if not _code(e):
                    raise
                # BadDigest (Content-MD5) or XAmzContentSHA256Mismatch (the signed payload hash):
                # what arrived is not what was read; the part is not stored, a rerun sends it again
                raise RemoteError(f"the S3 server refused part {n} of s3://{bucket}/{key}: {_message(e)}") from e
            if str(r.get("ETag", "")).strip('"') != md5.hex():
                raise RemoteError(f"the server stored part {n} of s3://{bucket}/{key} with ETag "
                                  f"{r.get('ETag')}, not the MD5 of what was sent ({md5.hex()})")
            with self.lock:
                self.result.bytes_sent += length
            self.progress(length)
            return md5, True

        futures: List[Future[Tuple[bytes, bool]]] = [observe.submit(pool, part, n) for n in range(1, nparts + 1)]
        md5s: List[bytes] = []
        try:
            for f in futures:
                md5, sent = f.result()
                md5s.append(md5)
                with self.lock:
                    if sent:
                        self.result.parts_sent += 1
                    else:
                        self.result.parts_reused += 1
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        r = s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": f'"{m.hex()}"'} for i, m in enumerate(md5s)]})
        return multipart_etag(md5s), r.get("VersionId")

    def retain(self, rel: str, obj: RemoteObject, until: datetime) -> str:
        """Lock the object's version until `until` (never shortening a longer retention)."""
        if obj.retain_until is not None and datetime.fromisoformat(obj.retain_until) >= until:
            return obj.retain_until
        key = self.s3.remote.key(rel)
        kw = {"VersionId": obj.version_id} if obj.version_id else {}
        try:
            self.s3.put_object_retention(Bucket=self.s3.bucket, Key=key, **kw,
                                         Retention={"Mode": LOCK_MODE, "RetainUntilDate": until})
        except Exception as e:
            if _code(e) != "AccessDenied":
                raise
            # already locked for longer than recorded (COMPLIANCE never shortens): keep that one
            cur = self.s3.get_object_retention(Bucket=self.s3.bucket, Key=key, **kw)["Retention"]
            if cur.get("Mode") != LOCK_MODE or cur["RetainUntilDate"] < until:
                raise
            return str(cur["RetainUntilDate"].astimezone(timezone.utc).isoformat())
        return until.isoformat()


def _local_problem(bdir: BackupDir, chain: Chain, ref: FileRef) -> Optional[str]:
    """Why a local file must not go up (damaged, changed): integrity.py's decision."""
    if ref.disk:
        return integrity.image_problem(bdir, chain.point(ref.point).disks[ref.disk])
    return integrity.xml_problem(bdir, ref.rel, ref.digest)


@contextmanager
def _push_lock(remote: Remote) -> Iterator[None]:
    """One push at a time per remote on this host: two would abort each other's uploads."""
    name = hashlib.sha256(remote.url.encode()).hexdigest()[:16]
    lock = FileLock(env.run_dir() / f"offsite-{name}.lock", f"off-site copy {remote.url}", run_dir=True)
    with lock:
        yield


def push(backup_dir: Path, url: str, endpoint_url: Optional[str] = None, profile: Optional[str] = None,
         lock_days: Optional[int] = None, max_speed: Optional[int] = None) -> PushResult:
    """Copy every point of BACKUP_DIR the remote does not hold, files first, the manifest last."""
    t0 = time.monotonic()
    remote = parse_url(url)
    if lock_days is not None and not 1 <= lock_days <= MAX_LOCK_DAYS:
        raise UsageError(f"--lock-days must be from 1 to {MAX_LOCK_DAYS}")
    if max_speed is not None and max_speed <= 0:
        raise UsageError("--max-speed must be a positive number of bytes per second")
    bdir = BackupDir(backup_dir)
    s3 = S3(remote, endpoint_url, profile)
    with translated(remote), _push_lock(remote):
        # the chain as it is now, read under the directory's shared lock; the files are read
        # without it (a long upload must not hold up the next backup): recorded files never
        # change, and one a prune deletes meanwhile fails this push before its commit
        with shared_lock(bdir):
            chain = bdir.load()
        if not chain.points:
            raise UsageError(f"{bdir.path} has no restore points to push")
        try:
            files = chain_files(chain)
        except ValueError as e:
            raise ChainCorrupt(f"chain metadata {bdir.metadata}: {e}") from None
        s3.head_bucket(Bucket=remote.bucket)
        if lock_days is not None and not s3.lock_enabled():
            raise UsageError(f"bucket {remote.bucket} has no Object Lock, so --lock-days cannot lock anything; "
                             "create the bucket with Object Lock enabled (e.g. aws s3api create-bucket "
                             "--object-lock-enabled-for-bucket); nothing was changed")
        found = s3.get_manifest()
        old = found[0] if found else None
        if old is not None and (old.chain.dir_id != chain.dir_id or old.chain.domain_uuid != chain.domain_uuid):
            raise UsageError(f"{remote.url} holds the off-site copy of another chain (domain "
                             f"'{old.chain.domain_name}', chain id {old.chain.dir_id}); push into another prefix")
        result = PushResult(remote.url, chain.domain_name, [p.id for p in chain.points],
                            [p.id for p in chain.points if old is None or p.id not in {q.id for q in old.chain.points}])
        old_refs = chain_files(old.chain) if old is not None else {}
        until = (datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=lock_days)
                 if lock_days is not None else None)
        objects: Dict[str, RemoteObject] = {}
        todo: List[FileRef] = []
        for rel, ref in files.items():
            prev = old.objects.get(rel) if old is not None else None
            if prev is not None and old_refs[rel].digest == ref.digest and (ref.digest is not None or ref.disk == ""):
                if s3.head(rel, prev) is not None:
                    objects[rel] = prev
                    result.objects_skipped += 1
                    continue
                result.warnings.append(f"{remote.where(rel)} was recorded but is gone: uploaded again")
            elif prev is not None:
                raise ChainCorrupt(f"{remote.where(rel)} holds another {rel} than {bdir.path} records; "
                                   "nothing was changed")
            todo.append(ref)
        sizes = {}
        for ref in todo:
            if not bdir.resolve(ref.rel).exists():
                raise OperationFailed(f"{bdir.path / ref.rel} was removed while the push ran (a prune?); the "
                                      "remote keeps its previous chain: push again")
            problem = _local_problem(bdir, chain, ref)
            if problem:
                raise DamageFound(f"{bdir.path / ref.rel} (point {ref.point}) is damaged: {problem}; "
                                  "not pushing damaged data")
            sizes[ref.rel] = os.lstat(bdir.resolve(ref.rel)).st_size
        pusher = _Pusher(s3, bdir, Throttle(max_speed), result, sum(sizes.values()))
        with ThreadPoolExecutor(threads(), thread_name_prefix="offsite") as pool:
            for ref in todo:
                objects[ref.rel] = pusher.upload(ref.rel, sizes[ref.rel], pool, until)
                result.objects_sent += 1
        if until is not None:
            for rel, obj in objects.items():
                obj.retain_until = pusher.retain(rel, obj, until)
        manifest = Manifest(chain, objects, now_iso(), LOCK_MODE if until else None, lock_days or 0)
        if until is None and old is not None and old.lock_mode:
            # once locked, later pushes keep locking (older objects stay locked anyway)
            manifest.lock_mode, manifest.lock_days = old.lock_mode, old.lock_days
            until = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=old.lock_days)
            for rel, obj in objects.items():
                obj.retain_until = pusher.retain(rel, obj, until)
        body = (json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n").encode()
        kw: Dict[str, Any] = {}
        if until is not None:
            kw = {"ObjectLockMode": LOCK_MODE, "ObjectLockRetainUntilDate": until}
        # the commit: one PUT, atomic in S3; from here on the remote holds the new chain
        s3.put_object(Bucket=remote.bucket, Key=remote.manifest_key, Body=body,
                      ContentMD5=_b64(hashlib.md5(body).digest()), ContentType="application/json", **kw)
        observe.finish("upload", None, pusher.total)
        result.lock_mode = manifest.lock_mode
        result.retain_until = manifest.retain_until()
        result.seconds = round(time.monotonic() - t0, 3)
        return result


# --- list --------------------------------------------------------------------------------------------------
@dataclass
class RemoteList:
    url: str
    manifest: Manifest

    def to_json(self) -> Dict[str, Any]:
        m, c = self.manifest, self.manifest.chain
        enc = c.encryption
        return {"url": self.url, "domain": c.domain_name, "uuid": c.domain_uuid, "pushed": m.pushed,
                "lock": {"mode": m.lock_mode, "days": m.lock_days, "retain_until": m.retain_until()}
                if m.lock_mode else None,
                "encryption": ({"format": enc.format, "cipher": enc.cipher, "iter_time_ms": enc.iter_time_ms}
                               if enc is not None else None),
                "points": [point_json(p) for p in c.points]}


def _load(s3: S3) -> Manifest:
    found = s3.get_manifest()
    if found is None:
        raise UsageError(f"{s3.remote.url} holds no off-site copy ({MANIFEST} not found)")
    return found[0]


def list_remote(url: str, endpoint_url: Optional[str] = None, profile: Optional[str] = None) -> RemoteList:
    remote = parse_url(url)
    s3 = S3(remote, endpoint_url, profile)
    with translated(remote):
        return RemoteList(remote.url, _load(s3))


# --- verify ------------------------------------------------------------------------------------------------
@dataclass
class RemoteDamage:
    object: str             # s3://bucket/key
    point: str
    disk: str
    problem: str


@dataclass
class RemoteVerify:
    url: str
    deep: bool
    objects_checked: int = 0
    bytes_read: int = 0
    damage: List[RemoteDamage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def failure(self) -> Optional[str]:
        if self.ok:
            return None
        d = self.damage[0]
        more = f" (and {len(self.damage) - 1} more)" if len(self.damage) > 1 else ""
        return f"off-site copy damaged: {d.object} (point {d.point}): {d.problem}{more}"

    def to_json(self) -> Dict[str, Any]:
        return {"url": self.url, "deep": self.deep, "ok": self.ok, "objects_checked": self.objects_checked,
                "bytes_read": self.bytes_read, "damage": [asdict(d) for d in self.damage]}


def _stream_digest(s3: S3, rel: str, obj: RemoteObject, alg: str) -> Tuple[str, int]:
    kw = {"VersionId": obj.version_id} if obj.version_id else {}
    body = s3.get_object(Bucket=s3.bucket, Key=s3.remote.key(rel), **kw)["Body"]
    h = hasher(alg) if alg != "md5" else hashlib.md5()
    n = 0
    for chunk in body.iter_chunks(4 * MiB):
        h.update(chunk)
        n += len(chunk)
        observe.check()
    return str(h.hexdigest()), n


def verify_remote(url: str, deep: bool = False, endpoint_url: Optional[str] = None,
                  profile: Optional[str] = None) -> RemoteVerify:
    """Every object present at its recorded version with its size and ETag; `deep`: downloaded and
    hashed against the digests of the chain metadata."""
    remote = parse_url(url)
    s3 = S3(remote, endpoint_url, profile)
    with translated(remote):
        m = _load(s3)
        files = chain_files(m.chain)
        result = RemoteVerify(remote.url, deep)

        def check(rel: str) -> Tuple[Optional[str], int]:
            ref, obj = files[rel], m.objects[rel]
            head = s3.head(rel, obj)
            if head is None:
                return "object is missing", 0
            got = str(head.get("ETag", "")).strip('"')
            if int(head.get("ContentLength", -1)) != obj.size or got != obj.etag:
                return (f"size {head.get('ContentLength')} and ETag {got}, but {obj.size} and {obj.etag} "
                        "were recorded"), 0
            if not deep:
                return None, 0
            if ref.digest is None:       # XML of a point recorded before XML was hashed
                if "-" in obj.etag:
                    return None, 0
                value, n = _stream_digest(s3, rel, obj, "md5")
                return (None if value == obj.etag else "content does not match its MD5"), n
            value, n = _stream_digest(s3, rel, obj, ref.digest.algorithm)
            if n != obj.size:
                return f"read {n} bytes, {obj.size} recorded", n
            if value != ref.digest.value:
                return f"{ref.digest.algorithm} {value} but the chain records {ref.digest.value}", n
            return None, n

        rels = list(files)
        with ThreadPoolExecutor(threads() if deep else 8, thread_name_prefix="offsite-verify") as pool:
            futures = [observe.submit(pool, check, rel) for rel in rels]
            for i, (rel, f) in enumerate(zip(rels, futures, strict=True)):
                problem, n = f.result()
                result.objects_checked += 1
                result.bytes_read += n
                if problem:
                    ref = files[rel]
                    result.damage.append(RemoteDamage(remote.where(rel), ref.point, ref.disk, problem))
                observe.emit("verify", None, i + 1, len(rels), "objects")
        return result


# --- pull --------------------------------------------------------------------------------------------------
@dataclass
class PullResult:
    url: str
    local_dir: str
    points: List[str]
    objects: int
    bytes: int
    seconds: float

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


class _Created:
    """What a pull created below LOCAL_DIR, removed again (newest first) when it fails."""

    def __init__(self) -> None:
        self.files: List[Path] = []
        self.dirs: List[Path] = []

    def mkdir(self, path: Path) -> None:
        try:
            os.mkdir(path, 0o700)
            self.dirs.append(path)
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{path} is not a directory virtbackup made; not following it") from None

    def undo(self) -> None:
        for f in reversed(self.files):
            try:
                os.unlink(f)
            except OSError:
                pass
        for d in reversed(self.dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _prepare_local(local: Path, created: _Created) -> None:
    try:
        st = os.lstat(local)
    except FileNotFoundError:
        if not local.parent.is_dir():
            raise UsageError(f"cannot create {local}: {local.parent} does not exist") from None
        created.mkdir(local)
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{local} is a symlink; give a new or empty directory")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputExists(f"{local} exists and is not a directory")
    if os.listdir(local):
        raise OutputExists(f"{local} is not empty; give a new or empty directory")


def pull(url: str, local_dir: Path, point: Optional[str] = None, endpoint_url: Optional[str] = None,
         profile: Optional[str] = None) -> PullResult:
    """Download the remote chain (or one point's and what it depends on) into a new LOCAL_DIR:
    every file checked against the chain's digests, the metadata written last."""
    t0 = time.monotonic()
    remote = parse_url(url)
    local = Path(os.path.abspath(local_dir))
    s3 = S3(remote, endpoint_url, profile)
    created = _Created()
    with translated(remote):
        m = _load(s3)
        chain = m.chain
        points = closure(chain, chain.point(point)) if point is not None else list(chain.points)
        files = chain_files(chain, points)
        _prepare_local(local, created)
        total = sum(m.objects[r].size for r in files)
        done = 0
        try:
            from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
            cfg = TransferConfig(multipart_threshold=DEFAULT_PART, multipart_chunksize=DEFAULT_PART,
                                 max_concurrency=threads())
            for rel, ref in files.items():
                obj = m.objects[rel]
                target = local
                for part in PurePosixPath(rel).parts[:-1]:
                    target = target / part
                    created.mkdir(target)
                path = target / PurePosixPath(rel).name
                fd = open_new(path)
                created.files.append(path)
                extra = {"VersionId": obj.version_id} if obj.version_id else {}
                try:
                    with os.fdopen(fd, "wb") as f:
                        s3.download_fileobj(remote.bucket, remote.key(rel), f, ExtraArgs=extra, Config=cfg)
                        f.flush()
                        os.fsync(f.fileno())
                except Exception as e:
                    if _code(e) in ("NoSuchKey", "NoSuchVersion", "404"):
                        raise DamageFound(f"{remote.where(rel)} (point {ref.point}) is missing; nothing was "
                                          "restored") from None
                    raise
                problem = None
                got = os.lstat(path).st_size
                if got != obj.size:
                    problem = f"{got} bytes, {obj.size} recorded"
                elif ref.digest is not None:
                    value = Digest.of_file(path, ref.digest.algorithm).value
                    if value != ref.digest.value:
                        problem = f"{ref.digest.algorithm} {value} but the chain records {ref.digest.value}"
                if problem:
                    raise DamageFound(f"{remote.where(rel)} (point {ref.point}"
                                      f"{', disk ' + ref.disk if ref.disk else ''}) is damaged: {problem}; "
                                      f"nothing was restored")
                done += got
                observe.emit("download", None, done, total)
            keep = {p.id for p in points}
            pulled = Chain(domain_name=chain.domain_name, domain_uuid=chain.domain_uuid, dir_id=chain.dir_id,
                           points=[p for p in chain.points if p.id in keep], next_seq=chain.next_seq,
                           schema=chain.schema, path=chain.path, encryption=chain.encryption)
            BackupDir(local).save(pulled)       # the commit: LOCAL_DIR is a backup dir from here on
        except BaseException:
            created.undo()
            raise
        return PullResult(remote.url, str(local), [p.id for p in points], len(files), done,
                          round(time.monotonic() - t0, 3))


# --- prune -------------------------------------------------------------------------------------------------
@dataclass
class RemotePrune:
    url: str
    dry_run: bool
    deleted: List[str] = field(default_factory=list)        # "key@version" deleted (or that would be)
    locked: List[str] = field(default_factory=list)         # unreferenced but still locked: kept
    failed: List[str] = field(default_factory=list)         # the server refused to delete them
    kept: int = 0                                           # versions the newest manifest references

    @property
    def failure(self) -> Optional[str]:
        if not self.failed:
            return None
        return f"the server refused to delete {len(self.failed)} object version(s), e.g. {self.failed[0]}"

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def prune_remote(url: str, dry_run: bool = False, endpoint_url: Optional[str] = None,
                 profile: Optional[str] = None) -> RemotePrune:
    """Delete the object versions (and older manifests) the newest manifest no longer references,
    once their retention has expired; never what it references, never a locked version, never
    anything written after the newest manifest (a push may be uploading it), nothing outside
    PREFIX/points/ and the manifest."""
    remote = parse_url(url)
    s3 = S3(remote, endpoint_url, profile)
    with translated(remote):
        found = s3.get_manifest()
        if found is None:
            raise UsageError(f"{remote.url} holds no off-site copy ({MANIFEST} not found)")
        m, written = found
        refs = {(remote.key(rel), o.version_id) for rel, o in m.objects.items()}
        unversioned = {k for k, v in refs if v is None}
        ours = remote.key("points/")
        result = RemotePrune(remote.url, dry_run)
        now = datetime.now(timezone.utc)
        latest_manifest: Optional[str] = None
        candidates: List[Tuple[str, Optional[str], datetime]] = []
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=remote.bucket,
                                                                       Prefix=remote.key("")):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                key, vid = v["Key"], v.get("VersionId")
                vid = None if vid in (None, "null") else vid
                if key == remote.manifest_key:
                    if v.get("IsLatest"):
                        latest_manifest = vid
                        continue
                elif not key.startswith(ours):
                    continue
                if (key, vid) in refs or (vid is None and key in unversioned):
                    result.kept += 1
                    continue
                candidates.append((key, vid, v["LastModified"]))
        for key, vid, modified in candidates:
            if modified >= written or (key == remote.manifest_key and vid == latest_manifest):
                continue
            name = f"{key}@{vid}" if vid else key
            kw = {"VersionId": vid} if vid else {}
            if vid:
                try:
                    head = s3.head_object(Bucket=remote.bucket, Key=key, **kw)
                except Exception as e:
                    if _code(e) not in ("405", "MethodNotAllowed"):   # a delete marker has no HEAD
                        raise
                    head = {}
                until = head.get("ObjectLockRetainUntilDate")
                if until is not None and until > now:
                    result.locked.append(name)
                    continue
            if dry_run:
                result.deleted.append(name)
                continue
            try:
                s3.delete_object(Bucket=remote.bucket, Key=key, **kw)
                result.deleted.append(name)
            except Exception as e:
                if _code(e) not in ("AccessDenied", "403"):
                    raise
                result.failed.append(f"{name}: {_message(e)}")
        return result


Callback = Callable[[Any], None]

__all__ = ["LOCK_MODE", "MANIFEST", "Manifest", "PullResult", "PushResult", "Remote", "RemoteError", "RemoteList",
           "RemotePrune", "RemoteVerify", "chain_files", "closure", "list_remote", "parse_manifest", "parse_url",
           "prune_remote", "pull", "push", "verify_remote"]
