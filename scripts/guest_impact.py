#!/usr/bin/env python3
"""Guest impact of a full backup to a slow target: push mode against pull mode.

In push mode QEMU's copy-before-write puts the old data of every cluster the guest overwrites
into the backup target before the guest write completes, so a slow target slows the guest. In
pull mode that old data goes to a local scratch file on the hypervisor and the slow target is
only virtbackup's problem. This measures the guest's write throughput (HMP `qemu-io` writes
through the guest's virtio disk, into data the backup has not copied yet) while a full backup
runs, in both modes, against idle.

The slow target: an ext4 mounted `-o sync` on a loop device over an `nbdfuse` file served by
`nbdkit memory` with the delay filter (every write request to the "disk" waits WDELAY).
Needs nbdkit and libnbd-bin (`apt-get install nbdkit libnbd-bin`), root, scripts/setup-host.sh.

    .venv/bin/python scripts/guest_impact.py [--reps N] [--wdelay 1ms] [--data-mib 48]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo: tests.support

from tests.support import scratch  # noqa: E402
from virtbackup.virt import host  # noqa: E402

MiB = 1 << 20
CLI = [sys.executable, "-m", "virtbackup.cli"]


class SlowDisk:
    """A filesystem whose writes are slow: ext4 (sync) / loop / nbdfuse / nbdkit delay."""

    def __init__(self, work: Path, wdelay: str, size: str = "1G"):
        self.fuse_dir = work / "fuse"
        self.mnt = work / "slow"
        self.wdelay = wdelay
        self.size = size
        self.fuse: Optional[subprocess.Popen] = None
        self.loop: Optional[str] = None

    def __enter__(self) -> Path:
        for tool in ("nbdfuse", "nbdkit"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} missing: apt-get install nbdkit libnbd-bin")
        self.fuse_dir.mkdir()
        self.mnt.mkdir()
        self.fuse = subprocess.Popen(["nbdfuse", str(self.fuse_dir / "disk"), "--command", "nbdkit", "-s",
                                      "--filter=delay", "memory", f"size={self.size}", f"wdelay={self.wdelay}"])
        for _ in range(100):
            if (self.fuse_dir / "disk").exists():
                break
            time.sleep(0.05)
        self.loop = subprocess.run(["losetup", "-f", "--show", str(self.fuse_dir / "disk")], check=True,
                                   capture_output=True, text=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", self.loop], check=True)
        subprocess.run(["mount", "-o", "sync", self.loop, str(self.mnt)], check=True)
        return self.mnt

    def __exit__(self, *_exc: object) -> None:
        subprocess.run(["umount", str(self.mnt)], check=False)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
        subprocess.run(["fusermount3", "-u", str(self.fuse_dir)], check=False)
        if self.fuse is not None:
            try:
                self.fuse.wait(10)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait()


def guest_write_rate(d: scratch.ScratchDomain, offset: int, length: int, chunk: int = 1 * MiB) -> float:
    """MB/s of guest writes (qemu-io through the virtio disk, flushed) over [offset, offset+length)."""
    t = time.perf_counter()
    for off in range(offset, offset + length, chunk):
        d.qemu_io("vda", f"write -P 0x5a {off} {chunk}")
    d.qemu_io("vda", "flush")
    return length / (time.perf_counter() - t) / 1e6


def job_open(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--wdelay", default="1ms", help="delay per write request to the slow target")
    ap.add_argument("--data-mib", type=int, default=48, help="data on the disk (what the full backup copies)")
    ap.add_argument("--write-mib", type=int, default=16, help="guest writes measured during the backup")
    args = ap.parse_args()
    data, wlen = args.data_mib * MiB, args.write_mib * MiB
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="virtbackup-impact-"))
    d = scratch.ScratchDomain(conn, f"vbimpact-{secrets.token_hex(3)}", work / "disks", {"vda": 2 * data})
    rates: Dict[str, List[float]] = {"idle": [], "push": [], "pull": []}
    times: Dict[str, List[float]] = {"push": [], "pull": []}
    try:
        d.create()
        d.write("vda", 0x11, 0, data)
        with SlowDisk(work, args.wdelay) as slow:
            for rep in range(args.reps):
                # idle: the same writes with no backup running
                d.write("vda", 0x11, data - wlen, wlen)
                rates["idle"].append(guest_write_rate(d, data - wlen, wlen))
                for mode in ("push", "pull"):
                    d.write("vda", 0x11, data - wlen, wlen)      # back to copied-data state
                    bdir = slow / f"{mode}{rep}"
                    t = time.perf_counter()
                    p = subprocess.Popen([*CLI, "backup", d.name, bdir, "--mode", mode, "--compress", "none",
                                          "--level", "full"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    while not job_open(d.dom) and p.poll() is None:
                        time.sleep(0.01)
                    # the end of the data: copied last, so every write here hits copy-before-write
                    rates[mode].append(guest_write_rate(d, data - wlen, wlen))
                    out, err = p.communicate()
                    if p.returncode != 0:
                        raise SystemExit(f"{mode} backup failed: {err.strip()}")
                    times[mode].append(time.perf_counter() - t)
                    shutil.rmtree(bdir, ignore_errors=True)
    finally:
        scratch.remove_domain(conn, d.name)
        shutil.rmtree(work, ignore_errors=True)
        conn.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"slow target: {args.wdelay} per write request (ext4 -o sync on nbdkit delay); "
          f"full backup of {args.data_mib} MiB; guest writes {args.write_mib} MiB into not-yet-copied data")
    print(f"guest write MB/s, idle: {med['idle']:.1f}  during push full: {med['push']:.1f} "
          f"({med['push'] / med['idle']:.0%} of idle)  during pull full: {med['pull']:.1f} "
          f"({med['pull'] / med['idle']:.0%} of idle)")
    print(f"backup duration s, push: {statistics.median(times['push']):.2f}  pull: "
          f"{statistics.median(times['pull']):.2f}   (all runs: {rates} {times})")
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    raise SystemExit(main())
