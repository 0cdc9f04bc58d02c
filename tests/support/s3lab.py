"""A real S3 server for the off-site tests: a throwaway Ceph cluster (one mon, one memstore OSD,
one RADOS Gateway on 127.0.0.1) started by scripts/s3lab.sh in a private directory, and taken
down again (every daemon killed by its pid, the directory removed) even when a test fails.

`Lab` is a context manager; `client()` gives a boto3 client of the bucket owner (LABKEY), or of
the second user (`client(user="ro")`). Buckets are named `vbtest-<hex>` and removed with every
version they hold (`remove_bucket`); a bucket holding COMPLIANCE-locked versions cannot be
removed before they expire: it goes with the cluster (its data lives in the OSD's memory).

`Proxy` is a TCP forwarder between the CLI and RGW that a test can cut (server unreachable
mid-upload) or make flip one byte of the next request body it forwards (a part rejected).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "s3lab.sh"
USERS = {"owner": ("LABKEY", "LABSECRET"), "ro": ("LABRO", "LABROSECRET")}


def available() -> Optional[str]:
    """None when the lab can run here, else why not."""
    for prog in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph"):
        if shutil.which(prog) is None:
            return f"{prog} not installed (scripts/setup-host.sh installs Ceph)"
    try:
        import boto3  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "boto3 not installed (pip install '.[s3]')"
    return None


class Lab:
    def __init__(self, memstore_bytes: int = 3 << 30):
        self.memstore_bytes = memstore_bytes
        self.dir: Optional[Path] = None
        self.env: Dict[str, str] = {}

    @property
    def endpoint(self) -> str:
        return self.env["S3_ENDPOINT"]

    def __enter__(self) -> "Lab":
        # short path: the daemons' admin sockets must fit in a sun_path (108 bytes)
        self.dir = Path(tempfile.mkdtemp(prefix="s3lab-", dir="/tmp"))
        env = dict(os.environ, MEMSTORE_BYTES=str(self.memstore_bytes))
        try:
            r = subprocess.run(["bash", str(SCRIPT), "up", str(self.dir)], capture_output=True, text=True,
                               timeout=180, env=env)
            if r.returncode != 0:
                raise RuntimeError(f"s3lab up failed: {r.stderr[-2000:]}")
        except BaseException:
            self.down()
            raise
        for line in (self.dir / "s3.env").read_text().splitlines():
            k, _, v = line.removeprefix("export ").partition("=")
            self.env[k] = v.strip("'")
        return self

    def down(self) -> None:
        if self.dir is not None:
            subprocess.run(["bash", str(SCRIPT), "down", str(self.dir)], capture_output=True, timeout=60)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def cli_env(self, user: str = "owner") -> Dict[str, str]:
        """What the CLI needs to reach the lab the boto3 way (environment)."""
        key, secret = USERS[user]
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def client(self, user: str = "owner", endpoint: Optional[str] = None) -> Any:
        import boto3
        from botocore.config import Config  # type: ignore[import-untyped]
        key, secret = USERS[user]
        cfg = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                     retries={"max_attempts": 2, "mode": "standard"})
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=key,
                            aws_secret_access_key=secret, region_name="us-east-1", config=cfg)

    def make_bucket(self, lock: bool = True) -> str:
        name = f"vbtest-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
        return name

    def remove_bucket(self, name: str) -> List[str]:
        """Delete every version, delete marker and upload of the bucket, then the bucket; the
        versions the server refuses to delete (locked) are returned, and the bucket stays."""
        s3 = self.client()
        refused = []
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for u in page.get("Uploads", []):
                s3.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                try:
                    s3.delete_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"])
                except Exception:  # noqa: BLE001 - locked: stays until the cluster goes
                    refused.append(f"{v['Key']}@{v['VersionId']}")
        if not refused:
            s3.delete_bucket(Bucket=name)
        return refused


class Proxy:
    """127.0.0.1:<port> forwarded to the lab's RGW. `cut()` closes the listener and every open
    connection (the server is gone mid-upload); `corrupt_next(marker)` flips one byte of the next
    request whose head contains `marker` (e.g. b"partNumber=2 ")."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.corrupt_marker: Optional[bytes] = None
        self.corrupted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def corrupt_next(self, marker: bytes) -> None:
        self.corrupt_marker = marker

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self.lock:
                if self.closed:
                    c.close()
                    u.close()
                    return
                self.conns += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        armed = False
        seen = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream and self.corrupt_marker is not None and self.corrupt_marker in data:
                    self.corrupt_marker, armed, seen = None, True, 0
                if armed:
                    # flip a byte of the body, well past the request head
                    seen += len(data)
                    if seen > 1 << 17:
                        buf = bytearray(data)
                        buf[len(buf) // 2] ^= 0xFF
                        data = bytes(buf)
                        armed = False
                        self.corrupted += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            self.closed = True
            conns = list(self.conns)
        self.sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    close = cut
