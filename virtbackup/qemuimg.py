"""Small wrappers around the `qemu-img` binary. Argument lists only, never a shell string."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .errors import HostError

QEMU_IMG = os.environ.get("VIRTBACKUP_QEMU_IMG", "qemu-img")
log = logging.getLogger(__name__)


def execute(cmd: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    """Run one program (argv list), logging the argv, exit status and time at debug."""
    log.debug("exec %s", " ".join(cmd))
    started = time.monotonic()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise HostError(f"{cmd[0]} not found; install qemu-utils") from e
    log.debug("exit %d after %.3fs: %s", proc.returncode, time.monotonic() - started, cmd[0])
    return proc


def run(args: Sequence[str], what: str) -> "subprocess.CompletedProcess[str]":
    """Run qemu-img; on failure raise HostError with its last stderr line."""
    proc = execute([QEMU_IMG, *args])
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise HostError(f"{what}: {reason}")
    return proc


def create(path: Path, size: int, backing: Optional[str] = None, cluster_size: Optional[int] = None) -> None:
    """Create a qcow2 v3 image; `backing` is stored exactly as given (we pass relative paths)."""
    opts = ["compat=1.1"]
    if cluster_size:
        opts.append(f"cluster_size={cluster_size}")
    args = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing is not None:
        # -u: the backing may be resolved relative to the new image; don't open it here (cheap).
        args += ["-u", "-b", backing, "-F", "qcow2"]
    args += [str(path), str(size)]
    run(args, f"cannot create {path}")


def info(path: Path, backing_chain: bool = False, force_share: bool = False) -> Any:
    args = ["info", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    if force_share:
        args.append("-U")
    args.append(str(path))
    return json.loads(run(args, f"cannot inspect {path}").stdout)


def check(path: Path) -> Any:
    """`qemu-img check`; returns its JSON report; raises HostError when the image is damaged."""
    proc = execute([QEMU_IMG, "check", "--output=json", str(path)])
    # exit 0 clean, 2 corruptions, 3 leaks only (harmless), 1 could not check
    if proc.returncode in (0, 3):
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return {}
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit status {proc.returncode}"
    if proc.returncode == 2:
        reason = "qcow2 corruption found"
    raise HostError(f"{path}: {reason}")


def convert(src: Path, dst: Path, out_format: str = "qcow2") -> None:
    """Copy `src` (read through its backing chain) into a standalone image `dst`."""
    from . import observe
    if observe.active():
        _convert_reporting(src, dst, out_format)
        return
    run(["convert", "-q", "-W", "-O", out_format, str(src), str(dst)], f"cannot convert {src}")


def _convert_reporting(src: Path, dst: Path, out_format: str) -> None:
    """`convert -p`: qemu-img's own progress lines ("    (12.50/100%)\r") go to observe.report."""
    import re

    from . import observe
    cmd = [QEMU_IMG, "convert", "-p", "-W", "-O", out_format, str(src), str(dst)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise HostError(f"{QEMU_IMG} not found; install qemu-utils") from None
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            buf = (buf + chunk)[-256:]
            found = re.findall(rb"\(([0-9.]+)/100%\)", buf)
            if found:
                observe.report(src.name, float(found[-1]), 100.0)
        err = proc.stderr.read().decode(errors="replace")
    except BaseException:
        proc.kill()          # e.g. Ctrl-C: the caller removes the half-written target
        proc.wait()
        raise
    if proc.wait() != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        raise HostError(f"cannot convert {src}: {lines[-1] if lines else f'exit status {proc.returncode}'}")


def compare(a: Path, b: Path) -> bool:
    proc = execute([QEMU_IMG, "compare", "-q", str(a), str(b)])
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise HostError(f"cannot compare {a} and {b}: {proc.stderr.strip()}")


def bitmap_remove(image: Path, bitmap: str) -> None:
    """Remove a persistent bitmap from an image nobody has open."""
    run(["bitmap", "--remove", str(image), bitmap], f"could not remove bitmap {bitmap} from {image}")


def rebase(path: Path, backing: Optional[str], safe: bool = True) -> None:
    """Point `path` at `backing` (stored exactly as given; None = standalone).

    Safe mode (the default) copies into `path` every cluster where the old and the new backing
    chain differ, so the guest-visible content stays the same; it writes the header last, so an
    interrupted run leaves the old backing link and unchanged content. `safe=False` rewrites only
    the header, for when the new backing reads exactly like the old one.
    """
    args = ["rebase", "-q", "-f", "qcow2"]
    if not safe:
        args.append("-u")
    if backing:
        args += ["-F", "qcow2", "-b", backing]
    else:
        args += ["-b", ""]
    args.append(str(path))
    run(args, f"cannot rebase {path}")


def read_all(path: Path, virtual_size: int) -> None:
    """Read every guest-visible byte of `path` through its backing chain (output discarded).

    Finds what `check` and a file hash can't: data that qemu can't read back (a broken
    compressed cluster, an I/O error under the file). Copies into QEMU's null driver.
    """
    run(["convert", "-q", "-n", "--target-image-opts", str(path), f"driver=null-co,size={virtual_size}"],
        f"cannot read {path}")


# --- QEMU's image locks (no qemu-img involved: asked of the kernel) ---------------------------
def image_in_use(path: str) -> bool:
    """True when another process holds QEMU's image locks on `path`.

    QEMU (file-posix) takes OFD byte-range locks at offsets 100.. and 200.. on every image it has
    open; F_OFD_GETLK asks whether any of them would conflict with a write lock.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 100, 200, 0)
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, req)
        return bool(struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def wait_released(paths: List[str], timeout: float = 60.0) -> None:
    """Wait until QEMU has closed these images.

    libvirt reports a backup job complete a few milliseconds before QEMU closes the target
    (observed on libvirt 9.0 / QEMU 7.2: the close rewrites qcow2 metadata up to ~30 ms after
    the JOB_COMPLETED event). Nothing signals the close, so this is a short bounded wait on
    the lock state, not a poll for the job.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    for p in paths:
        while image_in_use(p):
            if time.monotonic() > deadline:
                raise HostError(f"QEMU still holds {p} open {timeout:.0f}s after the job ended")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
