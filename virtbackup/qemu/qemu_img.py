"""Small wrappers around the `qemu-img` binary. Argument lists only, never a shell string.

Functions that read or write image data take an optional `key` (keys.Key): the images are
then LUKS-encrypted qcow2, opened with `--image-opts` naming the key's secret object for every
encrypted layer of the backing chain; the key itself reaches qemu-img through a pipe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence, Tuple

from virtbackup import env
from virtbackup.errors import HostError

if TYPE_CHECKING:
    from virtbackup.qemu.keys import Key

log = logging.getLogger(__name__)
COMPRESSION_TYPES = ("zstd", "zlib")     # qcow2 compression_type values we write


def execute(cmd: Sequence[str], pass_fds: Sequence[int] = ()) -> "subprocess.CompletedProcess[str]":
    """Run one program (argv list), logging the argv, exit status and time at debug.

    `pass_fds`: descriptors the child inherits (the key's pipe; the argv only names it)."""
    log.debug("exec %s", " ".join(cmd))
    started = time.monotonic()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, pass_fds=tuple(pass_fds))
    except FileNotFoundError as e:
        raise HostError(f"{cmd[0]} not found; install qemu-utils") from e
    log.debug("exit %d after %.3fs: %s", proc.returncode, time.monotonic() - started, cmd[0])
    return proc


@contextmanager
def key_object(key: Optional["Key"]) -> Iterator[Tuple[List[str], Tuple[int, ...]]]:
    """`--object secret,...,file=/dev/fd/N` and the fds to pass, or nothing without a key."""
    if key is None:
        yield [], ()
        return
    from virtbackup.qemu.keys import key_pipe
    with key_pipe(key) as (obj, fd):
        yield obj, (fd,)


def run_program(cmd: Sequence[str], args: Sequence[str], what: str,
                key: Optional["Key"] = None) -> "subprocess.CompletedProcess[str]":
    """Run `cmd` (e.g. [qemu-img, convert] or [qemu-io]), with the key's secret object (id
    keys.SECRET_ID) before `args` when `key` is given; HostError with the last stderr line."""
    with key_object(key) as (obj, fds):
        proc = execute([*cmd, *obj, *args], fds)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise HostError(f"{what}: {reason}")
    return proc


def run(args: Sequence[str], what: str, key: Optional["Key"] = None) -> "subprocess.CompletedProcess[str]":
    """Run qemu-img; on failure raise HostError with its last stderr line.

    With `key`, the key's secret object is added after the subcommand."""
    return run_program([env.program("qemu-img"), args[0]], args[1:], what, key)


def _argv(args: Sequence[str], obj: Sequence[str]) -> List[str]:
    """qemu-img's argv for `args` (subcommand first), the key's secret object after the subcommand."""
    return [env.program("qemu-img"), args[0], *obj, *args[1:]]


# --- argument lists (pure: what each wrapper runs, testable without qemu-img) -------------------
def file_name(path: "os.PathLike[str] | str") -> str:
    """A file name as qemu-img's positional argument. QEMU takes `proto:rest` for a protocol
    when the colon comes before any slash ("Unknown protocol 'vm'" for a relative `vm:1/x.qcow2`):
    such a relative name is given as `./vm:1/x.qcow2`. Every other name is passed unchanged."""
    name = os.fspath(path)
    if ":" in name.split("/", 1)[0]:
        return "./" + name
    return name


def create_args(path: Path, size: int, backing: Optional[str] = None, cluster_size: Optional[int] = None,
                encrypt_iter_time: Optional[int] = None, compression: Optional[str] = None) -> List[str]:
    """`create` of a qcow2 v3 image; `encrypt_iter_time` set: LUKS-encrypted (with the key's
    secret object, which run() adds); `compression` ("zstd", "zlib"): the type of the compressed
    clusters written into it (the header says it; readers need nothing)."""
    from virtbackup.qemu import keys
    opts = ["compat=1.1"]
    if cluster_size:
        opts.append(f"cluster_size={cluster_size}")
    if compression is not None:
        if compression not in COMPRESSION_TYPES:
            raise ValueError(f"unknown compression {compression!r}")
        opts.append(f"compression_type={compression}")
    if encrypt_iter_time is not None:
        opts += keys.create_options(encrypt_iter_time)
    args = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing is not None:
        # -u: the backing may be resolved relative to the new image; don't open it here (cheap).
        args += ["-u", "-b", backing, "-F", "qcow2"]
    return [*args, file_name(path), str(size)]


def image_names(path: Path, encrypted_layers: Optional[Sequence[bool]] = None) -> List[str]:
    """How to name an image for reading through its chain: its file name, or (given which layers
    of its chain are encrypted: a key is used) `--image-opts` handing the key to each of them."""
    if encrypted_layers is None:
        return [file_name(path)]
    from virtbackup.qemu.keys import image_opts
    return ["--image-opts", image_opts(Path(os.path.abspath(path)), encrypted_layers)]


def info_args(path: Path, backing_chain: bool = False, force_share: bool = False) -> List[str]:
    args = ["info", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    if force_share:
        args.append("-U")
    return [*args, file_name(path)]


def check_args(path: Path, encrypted: bool = False) -> List[str]:
    """`check` of this image only; `encrypted`: named as `json:` with the key's secret id and no
    backing (checking one layer needs no other layer's key)."""
    name = file_name(path)
    if encrypted:
        from virtbackup.qemu.keys import SECRET_ID
        name = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": os.path.abspath(path)},
                                     "encrypt": {"key-secret": SECRET_ID}, "backing": None})
    return ["check", "--output=json", name]


def check_result(path: Path, returncode: int, stdout: str, stderr: str) -> Any:
    """`qemu-img check`'s outcome: its JSON report, or HostError when the image is damaged.

    Exit 0 clean, 2 corruptions, 3 leaks only (harmless), 1 could not check."""
    if returncode in (0, 3):
        try:
            return json.loads(stdout)
        except ValueError:
            return {}
    lines = [ln for ln in (stderr or stdout).strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit status {returncode}"
    if returncode == 2:
        reason = "qcow2 corruption found"
    raise HostError(f"{path}: {reason}")


def convert_args(src_names: Sequence[str], dst: Path, out_format: str = "qcow2",
                 encrypt_iter_time: Optional[int] = None, progress: bool = False,
                 compression: Optional[str] = None) -> List[str]:
    """`convert` of `src_names` (image_names()) into a standalone `dst`; `encrypt_iter_time`
    set: `dst` LUKS-encrypted with the key; `progress`: qemu-img's progress lines (-p), else -q;
    `compression`: `dst` holds compressed clusters of that type (qcow2 only)."""
    args = ["convert", "-p" if progress else "-q", "-W", "-O", out_format]
    if encrypt_iter_time is not None:
        from virtbackup.qemu.keys import create_options
        args += ["-o", ",".join(create_options(encrypt_iter_time))]
    if compression is not None:
        if compression not in COMPRESSION_TYPES or out_format != "qcow2" or encrypt_iter_time is not None:
            raise ValueError(f"cannot write {out_format} with compression {compression!r}")
        args += ["-c", "-o", f"compression_type={compression}"]
    return [*args, *src_names, file_name(dst)]


def compare_args(a: Path, b: Path, a_layers: Optional[Sequence[bool]] = None,
                 b_layers: Optional[Sequence[bool]] = None) -> List[str]:
    """`compare` of two images; with their encrypted layers (a key is used): both by options."""
    if a_layers is not None and b_layers is not None:
        names = ["--image-opts", image_names(a, a_layers)[-1], image_names(b, b_layers)[-1]]
    else:
        names = [file_name(a), file_name(b)]
    return ["compare", "-q", *names]


def bitmap_remove_args(image: Path, bitmap: str) -> List[str]:
    return ["bitmap", "--remove", file_name(image), bitmap]


def rebase_args(path: Path, backing: Optional[str], safe: bool = True) -> List[str]:
    """`rebase` of a plain image onto `backing` (stored as given; None or "" = standalone)."""
    args = ["rebase", "-q", "-f", "qcow2"]
    if not safe:
        args.append("-u")
    if backing:
        args += ["-F", "qcow2", "-b", backing]
    else:
        args += ["-b", ""]
    return [*args, file_name(path)]


def encrypted_rebase_args(path: Path, backing: Optional[str], safe: bool, top_layers: Sequence[bool] = (),
                          backing_layers: Sequence[bool] = ()) -> List[List[str]]:
    """The `rebase` runs for a LUKS image (absolute `path`), in order.

    qemu-img opens a safe rebase's new backing by file name only, with no way to give it the
    key: it is given as a `json:` name carrying the key's secret id (absolute), and a second,
    header-only rebase then writes the relative name we record. `top_layers`/`backing_layers`:
    the encrypted layers of the image's and of the new backing's chain (safe mode only)."""
    from virtbackup.qemu.keys import image_opts, json_image
    if not safe:
        if backing is None:
            raise ValueError("an unsafe rebase needs a backing file")
        return [["rebase", "-q", "-u", "--image-opts", image_opts(path, [True]), "-F", "qcow2", "-b", backing]]
    top = image_opts(path, top_layers)
    if backing is None:
        return [["rebase", "-q", "--image-opts", top, "-b", ""]]
    new = Path(os.path.normpath(path.parent / backing))
    return [["rebase", "-q", "--image-opts", top, "-F", "qcow2", "-b", json_image(new, backing_layers)],
            ["rebase", "-q", "-u", "--image-opts", image_opts(path, [True]), "-F", "qcow2", "-b", backing]]


def compress_args(src: Path, dst: Path, backing: Optional[Path]) -> List[str]:
    """`convert` of the clusters `src` itself holds into the pre-created `dst` (same backing link,
    compression type in its header) as compressed clusters. `backing` (absolute): `src`'s
    backing; -B then keeps every cluster `src` leaves to it out of `dst` (zero clusters that hide
    backing data are written, as zeroes); None: `src` is standalone, all of it is written."""
    args = ["convert", "-q", "-n", "-c", "-W", "-m", "16", "-t", "writeback", "-O", "qcow2"]
    if backing is not None:
        args += ["-B", file_name(backing)]
    else:
        args.append("--target-is-zero")
    return [*args, file_name(src), file_name(dst)]


def read_all_args(src_names: Sequence[str], virtual_size: int) -> List[str]:
    """`convert` of every guest-visible byte into QEMU's null driver (output discarded)."""
    return ["convert", "-q", "-n", *src_names, "--target-image-opts", f"driver=null-co,size={virtual_size}"]


def create(path: Path, size: int, backing: Optional[str] = None, cluster_size: Optional[int] = None,
           key: Optional["Key"] = None, iter_time: Optional[int] = None, compression: Optional[str] = None) -> None:
    """Create a qcow2 v3 image; `backing` is stored exactly as given (we pass relative paths).

    With `key`: LUKS-encrypted with it (`iter_time`: key derivation ms, see keys.py). The
    backing is not opened (-u), so it needs no key here.
    """
    from virtbackup.qemu import keys
    if key is not None and compression is not None:
        raise ValueError("QEMU writes no compressed clusters into an encrypted qcow2")
    args = create_args(path, size, backing, cluster_size,
                       (iter_time or keys.DEFAULT_ITER_TIME_MS) if key is not None else None, compression)
    _luks_retry(lambda: run(args, f"cannot create {path}", key), key is not None)


# QEMU calibrates PBKDF2 for a new LUKS header by timing it in thread CPU time; on a loaded host
# that measurement can come back as zero and qemu-img gives up ("Unable to get accurate CPU
# usage"). Thread CPU time here is counted in 4 ms scheduler ticks, and QEMU's first calibration
# round (2^15 iterations) takes about 3 ms, so a round often sees no tick at all: 12 of 40
# `qemu-img create` runs failed so on an idle machine, and CI once lost six tries in a row. Each
# try is an independent draw costing ~30 ms, so we retry many times (0.3^40 is nil) with a short
# pause that grows to a cap. The file is left where it is between tries (qemu-img
# rewrites it; unlinking it would let the next try create the name afresh, outside the caller's
# exclusive create); the caller removes it when the last try fails.
_LUKS_TRANSIENT = "Unable to get accurate CPU usage"


def _luks_retry(fn: Any, encrypting: bool, attempts: int = 40) -> None:
    for attempt in range(attempts):
        try:
            fn()
            return
        except HostError as e:
            if not encrypting or _LUKS_TRANSIENT not in str(e) or attempt == attempts - 1:
                raise
            log.info("qemu-img: %s; trying again", _LUKS_TRANSIENT)
            time.sleep(min(0.01 * 2 ** attempt, 0.25))


def layers(path: Path) -> List[bool]:
    """Which layers of the image's backing chain (top first) are encrypted. Needs no key."""
    return [bool(i.get("encrypted")) for i in info(path, backing_chain=True)]


def _source(path: Path, key: Optional["Key"]) -> List[str]:
    """How to name an image for reading through its chain: a file name, or with a key
    `--image-opts` options that hand the key to every encrypted layer."""
    if key is None:
        return image_names(path)
    return image_names(path, layers(Path(os.path.abspath(path))))


def info(path: Path, backing_chain: bool = False, force_share: bool = False) -> Any:
    return json.loads(run(info_args(path, backing_chain, force_share), f"cannot inspect {path}").stdout)


def check(path: Path, key: Optional["Key"] = None) -> Any:
    """`qemu-img check`; returns its JSON report; raises HostError when the image is damaged.

    With `key` only this image is opened (its backing is not needed to check it).
    """
    if key is not None and not info(path).get("encrypted"):
        key = None                       # a plain image (verify reports that it should not be)
    args = check_args(path, encrypted=key is not None)
    with key_object(key) as (obj, fds):
        proc = execute(_argv(args, obj), fds)
    return check_result(path, proc.returncode, proc.stdout, proc.stderr)


def convert(src: Path, dst: Path, out_format: str = "qcow2", key: Optional["Key"] = None,
            encrypt_iter_time: Optional[int] = None, compression: Optional[str] = None) -> None:
    """Copy `src` (read through its backing chain) into a standalone image `dst`.

    `key` opens an encrypted chain; `encrypt_iter_time` (with `key`) encrypts `dst` with the
    same key, else `dst` is plain. `compression`: `dst` holds compressed clusters.
    """
    from virtbackup import observe
    encrypting = key is not None and encrypt_iter_time is not None
    reporting = observe.active()
    args = convert_args(_source(src, key), dst, out_format, encrypt_iter_time if key is not None else None,
                        progress=reporting, compression=compression)
    if reporting:
        _luks_retry(lambda: _convert_reporting(src, args, key), encrypting)
        return
    _luks_retry(lambda: run(args, f"cannot convert {src}", key), encrypting)


def _convert_reporting(src: Path, args: Sequence[str], key: Optional["Key"]) -> None:
    """`convert -p` (`args` from convert_args): qemu-img's own progress lines ("    (12.50/100%)\r")
    go to observe.report."""
    import re

    from virtbackup import observe
    with key_object(key) as (obj, fds):
        cmd = _argv(args, obj)
        log.debug("exec %s", " ".join(cmd))
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds)
        except FileNotFoundError:
            raise HostError(f"{cmd[0]} not found; install qemu-utils") from None
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


def compare(a: Path, b: Path, key: Optional["Key"] = None) -> bool:
    if key is not None:
        args = compare_args(a, b, layers(Path(os.path.abspath(a))), layers(Path(os.path.abspath(b))))
    else:
        args = compare_args(a, b)
    with key_object(key) as (obj, fds):
        proc = execute(_argv(args, obj), fds)
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise HostError(f"cannot compare {a} and {b}: {proc.stderr.strip()}")


def bitmap_remove(image: Path, bitmap: str) -> None:
    """Remove a persistent bitmap from an image nobody has open."""
    run(bitmap_remove_args(image, bitmap), f"could not remove bitmap {bitmap} from {image}")


def rebase(path: Path, backing: Optional[str], safe: bool = True, key: Optional["Key"] = None) -> None:
    """Point `path` at `backing` (stored exactly as given; None = standalone).

    Safe mode (the default) copies into `path` every cluster where the old and the new backing
    chain differ, so the guest-visible content stays the same; it writes the header last, so an
    interrupted run leaves the old backing link and unchanged content. `safe=False` rewrites only
    the header, for when the new backing reads exactly like the old one.
    """
    if key is not None:
        _rebase_encrypted(path, backing, safe, key)
        return
    run(rebase_args(path, backing, safe), f"cannot rebase {path}")


def _rebase_encrypted(path: Path, backing: Optional[str], safe: bool, key: "Key") -> None:
    """`rebase` for LUKS images (see encrypted_rebase_args)."""
    path = Path(os.path.abspath(path))
    top: List[bool] = []
    new: List[bool] = []
    if safe:
        top = layers(path)
        if backing is not None:
            new = layers(Path(os.path.normpath(path.parent / backing)))
    for args in encrypted_rebase_args(path, backing, safe, top, new):
        run(args, f"cannot rebase {path}", key)


def compress_into(src: Path, dst: Path, backing: Optional[Path]) -> None:
    """Write what `src` holds into the empty, pre-created `dst` as compressed clusters (see
    compress_args); HostError when qemu-img fails (the caller discards `dst`)."""
    run(compress_args(src, dst, backing), f"cannot compress {src}")


TWIN_SUFFIX = ".z"      # recompress()'s twin beside the image; a leftover of a killed run is junk


def recompress(path: Path, compression: str) -> None:
    """Rewrite what the plain qcow2 `path` itself holds as compressed clusters of `compression`:
    into a twin `<path>.z` created here (O_EXCL|O_NOFOLLOW: never over a file or through a
    symlink found at the name; that is refused and left alone) with the same virtual size and
    backing link, then renamed over `path`. The twin is removed when anything fails. Reads
    the header with -U: the caller holds the only writer (or there is none)."""
    meta = info(path, force_share=True)
    twin = path.with_name(path.name + TWIN_SUFFIX)
    try:
        os.close(os.open(twin, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        raise HostError(f"{twin} exists (not made by this run); not overwriting it") from None
    except OSError as e:
        raise HostError(f"cannot create {twin}: {e.strerror}") from None
    try:
        link = meta.get("backing-filename")
        backing = meta.get("full-backing-filename") if link else None
        create(twin, int(meta["virtual-size"]), link, cluster_size=int(meta.get("cluster-size") or 0) or None,
               compression=compression)
        compress_into(path, twin, Path(backing) if backing else None)
        os.replace(twin, path)
    except BaseException:
        try:
            twin.unlink()
        except OSError:
            pass
        raise


def data_size(path: Path) -> Optional[int]:
    """Bytes of guest data the image file itself holds (`map`: its own data extents, compressed
    ones at their uncompressed size; zero clusters and what its backing holds not counted);
    None when qemu-img cannot say (an encrypted image needs its key to be opened: not counted)."""
    proc = execute([env.program("qemu-img"), "map", "--output=json", "-U", file_name(path)])
    if proc.returncode != 0:
        return None
    try:
        return sum(int(e["length"]) for e in json.loads(proc.stdout) if e.get("depth") == 0 and e.get("data"))
    except (ValueError, KeyError, TypeError):
        return None


def read_all(path: Path, virtual_size: int, key: Optional["Key"] = None) -> None:
    """Read every guest-visible byte of `path` through its backing chain (output discarded).

    Finds what `check` and a file hash can't: data that qemu can't read back (a broken
    compressed cluster, an I/O error under the file). Copies into QEMU's null driver.
    """
    run(read_all_args(_source(path, key), virtual_size), f"cannot read {path}", key)


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
