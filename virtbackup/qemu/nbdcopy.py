"""Copy an NBD export into a qcow2 image: the data path of pull-mode backups.

The source is libvirt's NBD server (a unix socket or TCP); the target is a pre-created qcow2
(with its relative backing link for incrementals) that `qemu-nbd` serves to us, started by
libnbd through socket activation: qcow2 stays in QEMU's block layer, and the server process
ends with our connection (also when we are killed). Only what is needed travels:
- full copy (no bitmap): the source's allocated extents that do not read as zeroes;
- incremental (a `qemu:dirty-bitmap:...` meta context): the dirty extents only; dirty extents
  that read as zeroes become NBD write-zeroes on the target (no data moved, and the backing
  image's old data below them is masked).
Several requests stay in flight on both connections (one event loop over both sockets).
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

from virtbackup import env
from virtbackup.errors import HostError, OperationFailed

if TYPE_CHECKING:
    from virtbackup.qemu.keys import Key

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"
STATE_ZERO = 2          # base:allocation: the extent reads as zeroes
DIRTY = 1               # qemu:dirty-bitmap:*: the extent changed since the bitmap's checkpoint
REQUEST_SIZE = 4 << 20  # per read/write; QEMU's NBD server allows 32 MiB
MAX_IN_FLIGHT = 16      # requests on the wire, reads and writes together (64 MiB of buffers)
STATUS_WINDOW = 1 << 30  # block status asked for this much at a time

# What the copy can be told to stop for: returns a reason (e.g. "SIGINT") or None.
StopCheck = Callable[[], Optional[str]]
Progress = Callable[[int, int], None]   # (bytes of the disk dealt with, the disk's size): see copy()


class NbdError(OperationFailed):
    """The NBD copy failed: the source connection broke, the target could not be written..."""

    kind = "nbd"


class CopyStopped(OperationFailed):
    """`should_stop` asked the copy to end early (a signal)."""

    kind = "interrupted"

    def __init__(self, why: str):
        super().__init__(f"copy stopped by {why}")
        self.why = why


@dataclass(frozen=True)
class Endpoint:
    """Where an NBD export is: a unix socket, or TCP host and port."""

    export: str
    socket: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    tls: bool = False
    tls_certificates: Optional[str] = None   # directory with ca-cert.pem, client-cert.pem, client-key.pem

    def describe(self) -> str:
        where = self.socket if self.socket else f"{self.host}:{self.port}"
        return f"export '{self.export}' at {where}"


@dataclass
class CopyStats:
    size: int = 0           # virtual size of the export
    read: int = 0           # bytes read from the source (what travelled over NBD)
    written: int = 0        # data bytes written to the target
    zeroed: int = 0         # bytes written as zeroes (no data moved)
    extents: int = 0        # extents copied or zeroed
    seconds: float = 0.0


def _nbd() -> Any:
    try:
        import nbd
    except ImportError:
        raise OperationFailed("pull mode needs libnbd's Python binding: apt-get install python3-libnbd "
                              "(and a Python that sees Debian's packages; see the README's host setup)") from None
    return nbd


def require_tools() -> None:
    """OperationFailed (saying what to install) unless a pull copy can run here: libnbd's Python
    binding (incrementals, and the target server's handshake) and qemu-nbd."""
    _nbd()
    if shutil.which(env.program("qemu-nbd")) is None:
        raise OperationFailed(f"pull mode needs {env.program('qemu-nbd')}: apt-get install qemu-utils")


def _message(e: BaseException) -> str:
    """libnbd's error text, without its 'nbd_xxx: ' prefix noise when errno says it all."""
    msg = getattr(e, "string", None) or str(e)
    err = getattr(e, "errnum", None)      # nbd.Error: .errno is a name ('EIO'), .errnum the number
    if isinstance(err, int) and err and os.strerror(err) not in msg:
        msg = f"{msg} ({os.strerror(err)})"
    return " ".join(msg.split())


def open_source(src: Endpoint, contexts: List[str]) -> Any:
    """Connect to the export with the meta contexts asked for; refuse one that lacks any."""
    nbd = _nbd()
    h = nbd.NBD()
    h.set_handle_name("virtbackup-src")
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(src.export)
    if src.tls:
        h.set_tls(nbd.TLS_REQUIRE)
        if src.tls_certificates:
            h.set_tls_certificates(src.tls_certificates)
    try:
        if src.socket:
            h.connect_unix(src.socket)
        else:
            h.connect_tcp(src.host or "localhost", str(src.port))
    except nbd.Error as e:
        raise NbdError(f"cannot connect to NBD {src.describe()}: {_message(e)}") from None
    for c in contexts:
        if not h.can_meta_context(c):
            raise NbdError(f"NBD {src.describe()} does not offer meta context {c}")
    return h


# Run by setpriv after it set the parent-death signal: exec the server only if the process that
# started it is still its parent. A parent killed before the signal was set would otherwise leave
# a server nobody ends (seen once at load ~20: a qemu-nbd outlived its SIGKILLed run for good).
_PARENT_CHECK = 'read -r _ _ _ ppid _ < /proc/$$/stat && [ "$ppid" = "$1" ] || exit 1; shift; exec "$@"'


def tied_to_this_process(argv: List[str]) -> List[str]:
    """`argv` run so that it ends with this process (SIGTERM on its death, PR_SET_PDEATHSIG) and
    never starts after it. Every layer execs in place: the pid stays the one libnbd forked, so
    socket activation's LISTEN_PID check still holds. Unchanged where setpriv is missing."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return argv
    return [setpriv, "--pdeathsig", "TERM", "/bin/sh", "-c", _PARENT_CHECK, "sh", str(os.getpid()), *argv]


def open_target(image: Path, key: Optional["Key"] = None, compress: bool = False) -> Any:
    """Serve `image` (qcow2, with its backing link) with qemu-nbd over socket activation.

    Call it from the thread that will close the handle: the server gets SIGTERM when the
    thread that started it ends (PR_SET_PDEATHSIG), which is what cleans up after a SIGKILL.

    --detect-zeroes=on: data that is all zeroes is stored as zero clusters, not written.
    `key`: the image and its encrypted backing layers are LUKS: qemu-nbd reads the key from a
    0600 file in a private directory (keys.key_file) that is removed as soon as the server has
    answered the handshake (it has created its secret object by then); never in its argv.
    `compress`: served through QEMU's `compress` filter: every write lands as compressed
    clusters (of the type in the image's header). The server then takes only whole clusters
    (its minimum block size; libnbd refuses anything else): see align_runs.
    """
    nbd = _nbd()
    exe = shutil.which(env.program("qemu-nbd"))
    if exe is None:
        raise OperationFailed(f"{env.program('qemu-nbd')} not found; install qemu-utils")
    common = [exe, "--cache=writeback", "--detect-zeroes=on", "--discard=ignore"]
    h = nbd.NBD()
    h.set_handle_name("virtbackup-dst")
    if compress:
        if key is not None:
            raise NbdError("QEMU writes no compressed clusters into an encrypted qcow2")
        from virtbackup.qemu.keys import qemu_opt
        name = qemu_opt(os.path.abspath(image))
        argv = tied_to_this_process([*common, "--image-opts",
                                     f"driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={name}"])
        log.debug("target server: %s", argv)
        try:
            h.connect_systemd_socket_activation(argv)
        except nbd.Error as e:
            raise NbdError(f"cannot serve {image} with qemu-nbd: {_message(e)}") from None
    elif key is None:
        argv = tied_to_this_process([*common, "--format=qcow2", str(image)])
        log.debug("target server: %s", argv)
        try:
            h.connect_systemd_socket_activation(argv)
        except nbd.Error as e:
            raise NbdError(f"cannot serve {image} with qemu-nbd: {_message(e)}") from None
    else:
        from virtbackup.qemu import keys, qemu_img
        path = Path(os.path.abspath(image))
        opts = keys.image_opts(path, qemu_img.layers(path))
        with keys.key_file(key) as kf:
            argv = tied_to_this_process([*common, "--object", keys.secret_object(keys.SECRET_ID, str(kf)),
                                         "--image-opts", opts])
            log.debug("target server: %s", argv)
            try:
                h.connect_systemd_socket_activation(argv)
            except nbd.Error as e:
                raise NbdError(f"cannot serve {image} with qemu-nbd: {_message(e)}") from None
    if h.is_read_only():
        raise NbdError(f"qemu-nbd serves {image} read-only")
    return h


def servers_of(points_dir: Path) -> List[int]:
    """Our qemu-nbd processes (same user) serving an image in one of `points_dir`'s `.partial`
    dirs: the target servers of a pull run. Called under the backup dir's lock, when no run of
    ours can be using that directory: any such process is one a killed run left (its parent-death
    signal lost while it started: the soak saw one waiting for its first client for minutes)."""
    prefix = os.path.join(os.path.abspath(points_dir), "")
    found: List[int] = []
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != "qemu-nbd":
            continue
        if any(prefix in a and ".partial/" in a[a.index(prefix):] for a in argv[1:]):
            found.append(pid)
    return found


def close(h: Any) -> None:
    """Disconnect cleanly when possible; the handle's end also ends a socket-activated server."""
    nbd = _nbd()
    try:
        h.shutdown()
    except nbd.Error:
        pass
    # nbd_close() runs when the last reference goes: it closes the socket and waits for the
    # qemu-nbd child (which exits when its only client is gone)
    del h


def extents(h: Any, size: int, bitmap: Optional[str],
            offset: int = 0, window: int = STATUS_WINDOW) -> Tuple[List[Tuple[int, int, bool]], int]:
    """(offset, length, zero) runs to copy from [offset, end), and `end`: see the module doc.

    `end` is where every meta context answered up to (the server may answer less than asked);
    the caller asks again from there.
    """
    nbd = _nbd()
    count = min(window, size - offset)
    answers: Dict[str, List[Tuple[int, int, int]]] = {}

    def cb(ctx: str, off: int, entries: List[int], err: Any) -> int:
        runs = []
        pos = off
        for i in range(0, len(entries) - 1, 2):
            runs.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        answers[ctx] = runs
        return 0

    try:
        h.block_status(count, offset, cb)
    except nbd.Error as e:
        raise NbdError(f"block status of NBD export at {offset} failed: {_message(e)}") from None
    if ALLOCATION not in answers or (bitmap and bitmap not in answers):
        raise NbdError(f"NBD server returned no block status for {ALLOCATION}"
                       f"{' and ' + bitmap if bitmap else ''} at offset {offset}")
    end = min(offset + count, *(r[-1][0] + r[-1][1] for r in answers.values() if r))
    if end <= offset:
        raise NbdError(f"NBD server returned an empty block status at offset {offset}")
    alloc = answers[ALLOCATION]
    if bitmap is None:
        wanted = [(s, min(s + n, end)) for s, n, f in alloc if not f & STATE_ZERO and s < end]
        return _merge([(s, e - s, False) for s, e in wanted if e > s]), end
    out: List[Tuple[int, int, bool]] = []
    for ds, dn, df in answers[bitmap]:
        if not df & DIRTY:
            continue
        de = min(ds + dn, end)
        for s, n, f in alloc:       # split the dirty run where allocation says zero/data
            lo, hi = max(s, ds), min(s + n, de)
            if lo < hi:
                out.append((lo, hi - lo, bool(f & STATE_ZERO)))
    return _merge(out), end


def align_runs(runs: List[Tuple[int, int, bool]], cluster: int, size: int) -> List[Tuple[int, int, bool]]:
    """`runs` (sorted, disjoint) widened to whole clusters of `cluster` bytes (the last cluster
    ends at `size`), for a target that takes only whole clusters (a compressing one).

    A cluster that a data run touches is copied whole, and so is one a zero run covers only in
    part: reading the export around a run reads the same point in time (in a bitmap copy, the
    clean bytes read are the backing's own). Only clusters zero runs cover whole are zeroed."""
    if cluster <= 1 or not runs:
        return runs

    def up(x: int) -> int:
        return min(size, -(-x // cluster) * cluster)

    def down(x: int) -> int:
        return x // cluster * cluster

    data: List[Tuple[int, int]] = []
    zero: List[Tuple[int, int]] = []
    for s, n, z in runs:
        e = s + n
        zs, ze = up(s), (e if e >= size else down(e))
        if z and zs < ze:
            zero.append((zs, ze))
            if s < zs:
                data.append((down(s), zs))
            if ze < e:
                data.append((ze, up(e)))
        else:
            data.append((down(s), up(e)))
    merged: List[Tuple[int, int]] = []
    for lo, hi in sorted(data):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    out = [(lo, hi - lo, False) for lo, hi in merged]
    i = 0
    for lo, hi in sorted(zero):     # what of each zero run no data cluster took
        while i < len(merged) and merged[i][1] <= lo:
            i += 1
        j = i
        while lo < hi:
            if j < len(merged) and merged[j][0] < hi:
                if merged[j][0] > lo:
                    out.append((lo, merged[j][0] - lo, True))
                lo = max(lo, merged[j][1])
                j += 1
            else:
                out.append((lo, hi - lo, True))
                break
    return _merge(out)


def _merge(runs: List[Tuple[int, int, bool]]) -> List[Tuple[int, int, bool]]:
    merged: List[Tuple[int, int, bool]] = []
    for s, n, z in sorted(runs):
        if merged and merged[-1][2] == z and merged[-1][0] + merged[-1][1] == s:
            ps, pn, _ = merged[-1]
            merged[-1] = (ps, pn + n, z)
        else:
            merged.append((s, n, z))
    return merged


class _Pump:
    """One event loop over the source and target sockets, several requests in flight.

    Reads complete into a queue that the loop turns into writes of the same buffer; zero runs
    go to the target directly. Completion callbacks only record: libnbd forbids calls on a
    handle from inside its own callbacks, and errors are raised from the loop.
    """

    def __init__(self, src: Any, dst: Any, src_name: str, dst_name: str, stats: CopyStats):
        self.nbd = _nbd()
        self.src, self.dst = src, dst
        self.src_name, self.dst_name = src_name, dst_name
        self.stats = stats
        self.in_flight = 0
        self.to_write: Deque[Tuple[Any, int]] = deque()
        self.error: Optional[str] = None
        self.done_bytes = 0

    def _fail(self, what: str, err: int) -> None:
        if self.error is None:
            self.error = f"{what}: {os.strerror(err) if err else 'failed'}"

    def read(self, offset: int, length: int) -> None:
        buf = self.nbd.Buffer(length)

        def done(err: Any) -> int:
            if err.value:
                self.in_flight -= 1
                self._fail(f"reading {length} bytes at {offset} from {self.src_name}", err.value)
            else:
                self.stats.read += length
                self.to_write.append((buf, offset))
            return 1
        self.src.aio_pread(buf, offset, completion=done)
        self.in_flight += 1

    def _write(self, buf: Any, offset: int) -> None:
        n = len(buf)

        def done(err: Any) -> int:
            self.in_flight -= 1
            if err.value:
                self._fail(f"writing {n} bytes at {offset} to {self.dst_name}", err.value)
            else:
                self.stats.written += n
                self.done_bytes += n
            return 1
        self.dst.aio_pwrite(buf, offset, completion=done)

    def zero(self, offset: int, length: int) -> None:
        def done(err: Any) -> int:
            self.in_flight -= 1
            if err.value:
                self._fail(f"zeroing {length} bytes at {offset} in {self.dst_name}", err.value)
            else:
                self.stats.zeroed += length
                self.done_bytes += length
            return 1
        self.dst.aio_zero(length, offset, completion=done)
        self.in_flight += 1

    def step(self, timeout: float) -> None:
        """Hand finished reads to the target, then wait (at most `timeout` s) for socket events."""
        while self.to_write:
            buf, off = self.to_write.popleft()
            self._write(buf, off)
        if self.error:
            return
        nbd = self.nbd
        fds = {}
        poller = select.poll()
        for h in (self.src, self.dst):
            d = h.aio_get_direction()
            ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                 (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                fd = h.aio_get_fd()
                fds[fd] = h
                poller.register(fd, ev)
        if not fds:
            return
        for fd, ev in poller.poll(int(timeout * 1000)):
            h = fds[fd]
            name = self.src_name if h is self.src else self.dst_name
            try:
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                if ev & select.POLLOUT:
                    h.aio_notify_write()
            except nbd.Error as e:
                if self.error is None:
                    self.error = f"connection to {name} lost: {_message(e)}"


class Pacer:
    """Reads at no more than `speed` bytes/s: a token bucket that holds at most `burst` bytes
    (one request: no request ever waits for more than the bucket can hold). Zeroed extents move
    no data and are not counted."""

    def __init__(self, speed: Optional[int], burst: int):
        self.speed = speed
        self.burst = burst
        self.tokens = float(burst)
        self.last: Optional[float] = None

    def wait_for(self, n: int) -> float:
        """Seconds until a read of `n` (<= burst) bytes may start (0: now)."""
        if not self.speed:
            return 0.0
        now = time.monotonic()
        if self.last is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.speed)
        self.last = now
        return max(0.0, (n - self.tokens) / self.speed)

    def took(self, n: int) -> None:
        self.tokens -= n


def copy(src: Endpoint, target: Path, bitmap: Optional[str] = None, *,
         should_stop: Optional[StopCheck] = None, progress: Optional[Progress] = None,
         request_size: int = REQUEST_SIZE, max_in_flight: int = MAX_IN_FLIGHT,
         max_speed: Optional[int] = None, key: Optional["Key"] = None, compress: bool = False) -> CopyStats:
    """_copy(); `compress`: the target ends up holding compressed clusters (of the type its
    header names). Written through QEMU's compress filter when the disk is a whole number of
    the target's clusters; QEMU refuses the filter on any other size ("Image size is not a
    multiple of request alignment"), so such a disk is copied plain and then rewritten
    compressed (qemu_img.recompress), before this returns."""
    if not compress:
        return _copy(src, target, bitmap, should_stop=should_stop, progress=progress, request_size=request_size,
                     max_in_flight=max_in_flight, max_speed=max_speed, key=key)
    from virtbackup.qemu import qemu_img
    try:
        meta = qemu_img.info(target, force_share=True)
        cluster = int(meta.get("cluster-size") or 0)
        size = int(meta["virtual-size"])
        ctype = str(meta["format-specific"]["data"].get("compression-type") or "zlib")
    except (HostError, KeyError, ValueError, TypeError) as e:
        raise NbdError(f"cannot read the header of {target}: {e}") from None
    inline = cluster > 0 and size % cluster == 0
    stats = _copy(src, target, bitmap, should_stop=should_stop, progress=progress, request_size=request_size,
                  max_in_flight=max_in_flight, max_speed=max_speed, key=key, cluster=cluster if inline else 0)
    if not inline:
        try:
            qemu_img.wait_released([str(target)])
            qemu_img.recompress(target, ctype)
        except (HostError, OSError) as e:
            raise NbdError(f"compressing {target} failed: {e}") from None
    return stats


def _copy(src: Endpoint, target: Path, bitmap: Optional[str] = None, *,
          should_stop: Optional[StopCheck] = None, progress: Optional[Progress] = None,
          request_size: int = REQUEST_SIZE, max_in_flight: int = MAX_IN_FLIGHT,
          max_speed: Optional[int] = None, key: Optional["Key"] = None, cluster: int = 0) -> CopyStats:
    """Copy the export into `target` (see the module doc); flushed before returning.

    `bitmap` is the dirty-bitmap meta context (e.g. `qemu:dirty-bitmap:backup-vda`): given, only
    dirty extents are copied and the target must have the previous image as backing; not
    given, the target must be empty and unbacked. `max_speed`: bytes/s read from the source
    (a token bucket of one request; see Pacer). `key`: the target is LUKS-encrypted (open_target).
    `cluster` (the target's cluster size, from copy()): written as compressed clusters, whole
    clusters only (open_target, align_runs); 0: plain writes.
    Raises NbdError (with what failed and where)
    or CopyStopped; the target's content is then undefined and the caller discards it.

    `progress(done, size)` after each step: `done` counts the bytes of the disk dealt with,
    those copied (or zeroed) and those block status showed need nothing (clean, unallocated),
    so it never goes down, the size stays the same, and it ends at `size`.
    """
    nbd = _nbd()
    started = time.monotonic()
    contexts = [ALLOCATION] + ([bitmap] if bitmap else [])
    if cluster and request_size % cluster:
        raise NbdError(f"{target}: cluster size {cluster} does not divide the request size {request_size}")
    s = open_source(src, contexts)
    d: Any = None
    try:
        size = s.get_size()
        stats = CopyStats(size=size)
        pump: Optional[_Pump] = None     # and the target server: started at the first run found
        pending: Deque[Tuple[int, int, bool]] = deque()
        pacer = Pacer(max_speed, request_size)
        status_at = 0           # block status known up to here
        queued = 0              # bytes in `pending` (for progress: not dealt with yet)
        issued = 0              # bytes handed to the pump (dealt with once pump.done_bytes has them)
        while True:
            why = should_stop() if should_stop else None
            if why:
                raise CopyStopped(why)
            if pump is not None and pump.error:
                raise NbdError(pump.error)
            # keep the queue fed from block status, a window at a time
            if not pending and status_at < size:
                runs, status_at = extents(s, size, bitmap, status_at)
                if cluster:
                    runs = align_runs(runs, cluster, size)
                for off, n, zero in runs:
                    stats.extents += 1
                    queued += n
                    for o in range(off, off + n, request_size):
                        pending.append((o, min(request_size, off + n - o), zero))
                if progress:
                    progress(status_at - queued - (issued - (pump.done_bytes if pump else 0)), size)
                continue
            if pump is None:
                if not pending:
                    break       # nothing to copy: the target stays as created (reads as its backing)
                d = open_target(target, key, compress=cluster > 0)
                if d.get_size() < size:
                    raise NbdError(f"target {target} ({d.get_size()} bytes) is smaller than "
                                   f"{src.describe()} ({size} bytes)")
                pump = _Pump(s, d, f"NBD {src.describe()}", str(target), stats)
            wait = 0.2
            while pending and pump.in_flight < max_in_flight:
                off, n, zero = pending[0]
                if not zero:
                    later = pacer.wait_for(n)
                    if later > 0:
                        wait = min(wait, later)
                        break
                    pacer.took(n)
                pending.popleft()
                queued -= n
                issued += n
                (pump.zero if zero else pump.read)(off, n)
            if not pending and status_at >= size and pump.in_flight == 0 and not pump.to_write:
                break
            if pump.in_flight == 0 and not pump.to_write:
                time.sleep(wait)        # paced, nothing on the wire to wait for
            else:
                pump.step(wait)
            if progress:
                progress(status_at - queued - (issued - pump.done_bytes), size)
        if d is not None:
            try:
                d.flush()
            except nbd.Error as e:
                raise NbdError(f"flushing {target} failed: {_message(e)}") from None
        if progress:
            progress(size, size)
        stats.seconds = round(time.monotonic() - started, 3)
        log.debug("copied %s into %s: %s", src.describe(), target, stats)
        return stats
    except nbd.Error as e:     # a synchronous call on a broken connection
        raise NbdError(f"NBD copy from {src.describe()} failed: {_message(e)}") from None
    finally:
        close(s)
        if d is not None:
            close(d)





def _source_opts(src: Endpoint, tls_id: Optional[str]) -> str:
    """The export as qemu-img `--image-opts` (QEMU's own NBD client; raw, no format probing)."""
    from virtbackup.qemu.keys import qemu_opt
    if src.socket:
        where = f"server.type=unix,server.path={qemu_opt(src.socket)}"
    else:
        where = f"server.type=inet,server.host={qemu_opt(src.host or 'localhost')},server.port={src.port}"
    return f"driver=nbd,{where},export={qemu_opt(src.export)}" + (f",tls-creds={tls_id}" if tls_id else "")


def convert_whole(src: Endpoint, target: Path, *, should_stop: Optional[StopCheck] = None,
                  progress: Optional[Progress] = None, max_speed: Optional[int] = None,
                  key: Optional["Key"] = None, compress: bool = False) -> CopyStats:
    """Copy a whole export into the empty, unbacked `target` with `qemu-img convert`: QEMU's NBD
    client reads with block status (holes and zeroes are skipped), 16 coroutines, writes out of
    order straight into the qcow2 (no second NBD hop through qemu-nbd, no Python per request):
    about twice the speed of copy() for whole disks here (scripts/benchmark.py). Incrementals
    stay with copy(), which follows the dirty bitmap. Same contract as copy(): flushed on
    return; NbdError or CopyStopped otherwise (the caller discards the target). `compress`:
    qemu-img writes compressed clusters (-c; the type is the target header's)."""
    from virtbackup.qemu import keys, qemu_img
    started = time.monotonic()
    exe = shutil.which(env.program("qemu-img"))
    if exe is None:
        raise OperationFailed(f"{env.program('qemu-img')} not found; install qemu-utils")
    objects: List[str] = []
    tls_id = None
    if src.tls:
        tls_id = "vbtls0"
        objects += ["--object", f"tls-creds-x509,id={tls_id},endpoint=client,"
                                f"dir={keys.qemu_opt(src.tls_certificates or '/etc/pki/qemu')}"]
    argv = [exe, "convert", "-p", "-n", "--target-is-zero", "-W", "-m", "16", "-t", "writeback"]
    if max_speed:
        argv += ["-r", str(max_speed)]
    if compress:
        if key is not None:
            raise NbdError("QEMU writes no compressed clusters into an encrypted qcow2")
        argv.append("-c")
    with qemu_img.key_object(key) as (key_obj, fds):
        argv += [*objects, *key_obj, "--image-opts", _source_opts(src, tls_id)]
        if key is not None:
            argv += ["--target-image-opts", keys.image_opts(Path(os.path.abspath(target)), [True])]
        else:
            argv += ["-O", "qcow2", str(target)]
        argv = tied_to_this_process(argv)
        log.debug("exec %s", " ".join(argv))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds)
    assert proc.stdout is not None and proc.stderr is not None
    size = 0
    buf = b""
    try:
        while True:
            why = should_stop() if should_stop else None
            if why:
                raise CopyStopped(why)
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            buf = (buf + chunk)[-256:]
            found = re.findall(rb"\(([0-9.]+)/100%\)", buf)
            if found and progress:
                size = size or _export_size(src)
                progress(int(size * float(found[-1]) / 100), size)
        err = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if rc != 0:
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        raise NbdError(f"copy of NBD {src.describe()} into {target} failed: "
                       f"{lines[-1] if lines else f'qemu-img exited with {rc}'}")
    stored = qemu_img.data_size(target) or 0
    stats = CopyStats(size=size, read=stored, written=stored, seconds=round(time.monotonic() - started, 3))
    if progress:
        size = size or _export_size(src)
        progress(size, size)
    log.debug("converted %s into %s: %s", src.describe(), target, stats)
    return stats


def _export_size(src: Endpoint) -> int:
    """The export's size (one short NBD connection; only for progress)."""
    try:
        h = open_source(src, [ALLOCATION])
    except NbdError:
        return 0
    try:
        return int(h.get_size())
    finally:
        close(h)


__all__ = ["Endpoint", "CopyStats", "NbdError", "CopyStopped", "copy", "convert_whole", "extents",
           "open_source", "open_target"]
