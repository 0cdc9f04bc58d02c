"""Helpers shared by the tests: the real CLI as a user runs it, restore checks, libvirt state.

Test modules import from here (never from each other or from conftest)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20

class CLIResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc = proc
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> Dict[str, Any]:
        data: Dict[str, Any] = json.loads(self.out)
        return data

    def __repr__(self) -> str:
        return f"<rc={self.rc} out={self.out!r} err={self.err!r}>"


def cli(*args: object, timeout: float = 300, cwd: Optional[Path] = None) -> CLIResult:
    """Run the real command line, as a user would."""
    cmd = [sys.executable, "-m", "virtbackup.cli", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return CLIResult(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env))


def take_backup(dom_name: str, bdir: Path, level: str = "auto") -> dict:
    """`virtbackup backup --json` that must succeed; its JSON result."""
    r = cli("backup", dom_name, bdir, "--level", level, "--json")
    assert r.rc == 0, r
    return r.json()


def assert_point_restores(bdir: Path, point: str, expected: Dict[str, bytes], out: Path) -> None:
    """Restore `point` through the CLI and compare every disk byte for byte with what the guest saw."""
    from tests.support import scratch
    r = cli("restore", bdir, out, "--point", point)
    assert r.rc == 0, r
    for disk, want in expected.items():
        img = out / f"{disk}.qcow2"
        assert scratch.backing_chain(img) == [str(img)], "restored image must be standalone"
        got = scratch.read_raw(img)
        diff = scratch.first_difference(got, want)
        assert diff is None, f"point {point} disk {disk}: first difference at byte {diff}"


def our_bitmaps(dom: Any, prefix: str) -> Dict[str, List[str]]:
    from virtbackup.virt import bitmaps, host
    disks = host.domain_disks(dom.XMLDesc(0))
    return {t: [b.name for b in bms if b.name.startswith(prefix)]
            for t, bms in bitmaps.live(dom, disks).items()}


def checkpoint_names(dom: Any) -> List[str]:
    return sorted(cp.getName() for cp in dom.listAllCheckpoints(0))


def forget_xml_digests(bdir: Path) -> None:
    """Metadata as virtbackup wrote it before it hashed the saved XML files: a test that feeds a
    hand-edited domain.xml to libvirt gets past the integrity check (which refuses it otherwise)."""
    meta = Path(bdir) / "virtbackup.json"
    data = json.loads(meta.read_text())
    for p in data["points"]:
        p.pop("domain_xml_digest", None)
        p.pop("checkpoint_xml_digest", None)
    meta.write_text(json.dumps(data))


def snapshot_dir(path: Path) -> Dict[str, bytes]:
    """Every file under path with its content (to prove a failed run changed nothing). The run
    logs (logs/) are left out: a failed run is meant to leave one."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".virtbackup.lock" and p.relative_to(path).parts[0] != "logs"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *opts: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_error_line(r: CLIResult) -> str:
    lines = r.err.strip().splitlines()
    errors = [str(ln) for ln in lines if ln.startswith("virtbackup: error:")]
    assert len(errors) == 1, r
    return errors[0]


def start_cli(*args: object, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "virtbackup.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 90) -> CLIResult:
    out, err = proc.communicate(timeout=timeout)
    return CLIResult(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def image_bitmaps(image: Path) -> Dict[str, List[str]]:
    """Persistent bitmaps in an image's qcow2 header: name -> flags."""
    from virtbackup.virt import bitmaps
    return bitmaps.header_flags(Path(image))


@contextlib.contextmanager
def image_held(image: Path, kill: bool = False) -> Iterator[None]:
    """Another QEMU process (qemu-io reading commands from a pipe) holding the image open.

    Closing its stdin makes it exit cleanly, storing the bitmaps again; `kill=True` SIGKILLs it
    instead, which leaves the bitmaps it loaded flagged in-use (= inconsistent).
    """
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        # its answer to a read means the open is complete (bitmaps loaded and flagged in-use):
        # killed earlier, QEMU may have been halfway through rewriting the bitmap directory
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        assert b"read 512/512" in holder.stdout.readline()
        yield
    finally:
        if kill:
            holder.kill()
        holder.stdin.close()
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


# -- a backup job held in flight (test_faults, test_encryption) ----------------------------------
def job_ids(dom: Any) -> List[str]:
    """QEMU block-job ids libvirt gives a backup of each disk: backup-<dst>-libvirt-N-format."""
    from virtbackup.virt import host
    return [f"backup-{x.target}-{x.node_name}" for x in host.domain_disks(dom.XMLDesc(0)) if x.node_name]


def pause_job(dom: Any, proc: Optional[subprocess.Popen] = None, timeout: float = 30) -> bool:
    """Pause every disk job of the backup that `proc` starts (or that runs); False if it ended first."""
    pending = set(job_ids(dom))
    deadline = time.monotonic() + timeout

    def alive() -> bool:
        return proc.poll() is None if proc else True

    import libvirt_qemu
    while pending and alive() and time.monotonic() < deadline:
        for jid in sorted(pending):
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(
                dom, json.dumps({"execute": "block-job-pause", "arguments": {"device": jid}}), 0))
            if "error" not in reply:
                pending.discard(jid)
            elif "not found" not in reply["error"]["desc"]:
                return False      # concluded before we got to it
    return not pending and alive()


def cli_bg(procs: List[subprocess.Popen], *args: object) -> subprocess.Popen:
    """The CLI started in the background (output piped); `procs` (the fixture) kills it at the end."""
    cmd = [sys.executable, "-m", "virtbackup.cli", *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    procs.append(p)
    return p


def hmp_write(dom: Any, target: str, pattern: int, offset: int, length: int) -> None:
    """Write into any running domain's disk through its qdev (the guest's path), then flush."""
    from tests.support.qemu import hmp
    from virtbackup.virt import host
    alias = next(d.alias for d in host.domain_disks(dom.XMLDesc(0)) if d.target == target)
    qdev = f"/machine/peripheral/{alias}/virtio-backend"
    hmp(dom, f'qemu-io -d {qdev} "write -P {pattern:#04x} {offset} {length}"')
    hmp(dom, f'qemu-io -d {qdev} "flush"')


def patched(data: bytes, pattern: int, offset: int, length: int) -> bytes:
    """`data` with `length` bytes of `pattern` written at `offset`."""
    return data[:offset] + bytes([pattern]) * length + data[offset + length:]


def our_secrets(conn: Any) -> List[str]:
    """UUIDs of every libvirt secret virtbackup defined that libvirtd still holds."""
    import libvirt
    from lxml import etree

    from virtbackup.virt import keysecret
    out = []
    for s in conn.listAllSecrets(0):
        try:
            if keysecret.is_ours(etree.fromstring(s.XMLDesc(0).encode()).findtext("description")):
                out.append(s.UUIDString())
        except libvirt.libvirtError:
            continue
    return out


def wait_for(what: str, cond: Any, timeout: float = 60.0, every: float = 0.02) -> Any:
    """Poll `cond()` until it returns something true (returned); AssertionError after `timeout`."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def lookup_domain(conn: Any, name: str) -> Any:
    """The domain of that name, or None."""
    import libvirt
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def pulling(dom: Any, disk: str) -> Any:
    """The disk's running block job (a live restore's pull), once it has copied something."""
    import libvirt
    try:
        info = dom.blockJobInfo(disk, 0)
    except libvirt.libvirtError:
        return None
    return info if info and info.get("cur", 0) > 0 else None


def header_backing(image: Path) -> Optional[str]:
    """The backing file name an image's qcow2 header carries (None: standalone)."""
    from virtbackup.qemu import qemu_img
    name = qemu_img.info(image, force_share=True).get("backing-filename")
    return str(name) if name is not None else None


def guest_data_byte(image: Path) -> int:
    """The file offset of a byte of guest data the qcow2 image itself holds: inside a plain data
    cluster (qemu-img map gives its offset), else inside a compressed cluster's bytes (map gives
    none: read from the L1/L2 tables; qcow2 spec: a compressed L2 entry has bit 62 set and the
    host offset in its low 62 - (cluster_bits - 8) bits). Flipping it changes guest data only."""
    import json
    import struct
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-U", str(image)], check=True,
                                        capture_output=True, text=True).stdout)
    for e in extents:
        if e.get("data") and e.get("depth") == 0 and "offset" in e and e["length"] > 4096:
            return int(e["offset"]) + 1000
    with open(image, "rb") as f:
        head = f.read(48)
        cluster_bits = struct.unpack(">I", head[20:24])[0]
        l1_size = struct.unpack(">I", head[36:40])[0]
        l1_offset = struct.unpack(">Q", head[40:48])[0]
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        for entry in l1:
            l2_offset = entry & 0x00FFFFFFFFFFFE00
            if not l2_offset:
                continue
            f.seek(l2_offset)
            size = 1 << cluster_bits
            for (l2,) in struct.iter_unpack(">Q", f.read(size)):
                if l2 & (1 << 62):
                    return int(l2 & ((1 << (62 - (cluster_bits - 8))) - 1)) + 4
    raise AssertionError(f"{image} holds no guest data cluster")
