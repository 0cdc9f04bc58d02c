"""A backup directory that only virtbackup can see: a tmpfs in a private mount namespace.

`unshare -m` starts a small holder process in a new mount namespace (private propagation) and
mounts a tmpfs over `path` there. Commands run in that namespace through `nsenter`; libvirtd and
its QEMU stay in the host's namespace, where `path` is an empty directory. So push mode fails
there (QEMU cannot open the targets), and a pull backup that works proves the data travelled
over NBD. The tmpfs (and everything in it) ends with the holder: `stop()`.
A `size` makes the tmpfs small enough to fill up (ENOSPC on the local target).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

from tests.support.helpers import ROOT, CLIResult


class HiddenDir:
    def __init__(self, path: Path, size: str = "512m"):
        self.path = Path(path)
        self.size = size
        self.holder: Optional[subprocess.Popen] = None

    def start(self) -> "HiddenDir":
        self.path.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o "size=$2,mode=0700" virtbackup-hidden "$1" && echo ready && exec sleep infinity',
             "sh", str(self.path), self.size],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            self.stop()
            raise RuntimeError(f"cannot make a private mount namespace: {err.strip()}")
        return self

    def run(self, *argv: object, timeout: float = 300, env: Optional[Dict[str, str]] = None,
            check: bool = False) -> subprocess.CompletedProcess:
        """A command inside the namespace (sees the tmpfs at `path`)."""
        assert self.holder is not None
        cmd = ["nsenter", "-t", str(self.holder.pid), "-m", "--", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))

    def cli(self, *args: object, uri: Optional[str] = None, timeout: float = 300) -> CLIResult:
        """The real virtbackup command line, inside the namespace."""
        pre = ["-c", uri] if uri else []
        return CLIResult(self.run(sys.executable, "-m", "virtbackup.cli", *pre, *args, timeout=timeout))

    def popen(self, *args: object, uri: Optional[str] = None) -> subprocess.Popen:
        assert self.holder is not None
        pre = ["-c", uri] if uri else []
        return subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-m", "--", sys.executable, "-m",
                                 "virtbackup.cli", *pre, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def listing(self) -> Dict[str, bytes]:
        """Every file under `path` as seen inside the namespace, with its content (run logs, which
        a failed run is meant to leave, and locks left out)."""
        r = self.run(sys.executable, "-c",
                     "import sys,json,base64,pathlib;p=pathlib.Path(sys.argv[1]);"
                     "print(json.dumps({str(f.relative_to(p)):base64.b64encode(f.read_bytes()).decode() "
                     "for f in sorted(p.rglob('*')) if f.is_file() and f.name!='.virtbackup.lock' "
                     "and 'logs' not in f.relative_to(p).parts[:-1]}))",
                     self.path, check=True)
        import base64
        import json
        return {k: base64.b64decode(v) for k, v in json.loads(r.stdout).items()}

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.terminate()
            self.holder.wait(10)
        self.holder = None
