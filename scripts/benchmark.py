#!/usr/bin/env python3
"""Side-by-side speed measurements of virtbackup on this machine (ratios, not absolute times).

Every figure is measured REPS times (default 5), interleaved with its baseline (the baseline, then
virtbackup, then the baseline again, ...), and reported as min/median/max; targets compare medians.
The machine's noise is shown as the spread of the baseline (max/min of `qemu-img convert -t
writeback` of the same disk) and the load average before and after.

Targets (DESIGN.md "Performance targets"):
- full backup <= 1.5x a flushed `qemu-img convert -t writeback` of the same disk (768 MiB of data
  on a 4 GiB disk), hashing included;
- incremental with nothing dirty <= 0.2 s for the whole command; `list` <= 0.1 s;
- restore of a 50-link chain <= 1.0x converting the flattened image;
- full + 3 incrementals + restore >= 5x faster than virtnbdbackup (`--virtnbdbackup`; Debian
  package virtnbdbackup) on twin domains;
- `run` over 8 domains with parallel = 2 >= 1.6x parallel = 1 (`--jobs`, only that);
- `--restore-check` (only that): what checking every image costs a restore (reported);
- pull mode (issue 23): pull full <= 1.2x push full and <= 1.5x `qemu-img convert -t none` of the
  same disk; pull incrementals (4/32/128 MiB dirty) <= 1.0x push incrementals of the same writes;
- guest impact (`--guest-impact`): the guest's write throughput while a full backup of its disk
  runs, as a fraction of its idle write throughput: push without and with `--max-speed`, and
  pull mode (reported).
- compression (issue 24, `--only compress`; a real Debian 12 minbase userland from
  scripts/userland.py on a 2 GiB disk of a running domain): a `--compress zstd` full stores <= 1.02x
  what `qemu-img convert -c -o compression_type=zstd` of the same disk stores, takes <= 2x the
  uncompressed full's time, and is >= 2x faster than `virtnbdbackup -z` on a twin domain;
  incrementals compressed vs not (and virtnbdbackup -z) after a realistic change in the guest fs.
- QEMU-side copy (issue 23's next step, `--only qemu-copy`; a measurement prototype, not
  virtbackup's path): QEMU copies libvirt's pull snapshot into the target itself
  (`snapshot-access` + `blockdev-backup`): its full against the push job and `qemu-img convert -t
  none`, and the guest's write throughput during it, during push and during pull (reported).

Run as root after scripts/setup-host.sh:
    .venv/bin/python scripts/benchmark.py [--quick] [--reps N] [--virtnbdbackup] [--guest-impact] [--json|--markdown]
    .venv/bin/python scripts/benchmark.py --jobs | --restore-check [--quick] [--json|--markdown]
    .venv/bin/python scripts/benchmark.py --only compress [--reps N] [--json|--markdown]
    .venv/bin/python scripts/benchmark.py --only qemu-copy [--quick] [--reps N] [--json|--markdown]
    .venv/bin/python scripts/benchmark.py --from-json RUN.json --markdown   (a saved run, printed again)
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import functools
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo: tests.support

import libvirt  # noqa: E402

from tests.support import scratch  # noqa: E402
from virtbackup.virt import host, monitor  # noqa: E402

MiB = 1 << 20
# the transport sections measure the copy path: uncompressed, as before compression existed
# (explicit, whatever the default); --only compress measures what compression costs
PLAIN = ["--compress", "none"]
CLI = [sys.executable, "-m", "virtbackup.cli"]


# -- measuring ---------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(*cmd: object) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def stats(xs: List[float]) -> Dict[str, Any]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs),
            "runs": [round(x, 4) for x in xs]}


def load() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Bench:
    """The figures (name -> list of runs), the targets, and where the scratch files go."""

    def __init__(self, reps: int, work: Path):
        self.reps = reps
        self.work = work
        self.conn = host.connect()
        self.runs: Dict[str, List[float]] = {}
        self.targets: List[Dict[str, Any]] = []
        self.notes: Dict[str, Any] = {}
        self.domains: List[scratch.ScratchDomain] = []

    def add(self, name: str, seconds: float) -> None:
        self.runs.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return float(statistics.median(self.runs[name]))

    def target(self, name: str, value: float, target: float, unit: str, at_most: bool = True) -> None:
        """One target: value against target; ratio_to_target <= 1 means met (for an `at least`
        target the ratio is target/value, so <= 1 means met there too)."""
        ratio = value / target if at_most else target / value
        self.targets.append({"target": name, "value": round(value, 4), "limit": target, "unit": unit,
                             "kind": "<=" if at_most else ">=", "ratio_to_target": round(ratio, 3),
                             "met": ratio <= 1.0})

    def domain(self, disks: Dict[str, int], prefix: str = "vbbench") -> scratch.ScratchDomain:
        d = scratch.ScratchDomain(self.conn, f"{prefix}-{secrets.token_hex(3)}", self.work / "disks", disks)
        self.domains.append(d)
        d.create()
        return d

    def drop(self, d: scratch.ScratchDomain) -> None:
        d.remove()
        self.domains.remove(d)

    def close(self) -> None:
        for d in list(self.domains):
            self.drop(d)
        self.conn.close()


def fill(d: scratch.ScratchDomain, disk: str, data: int, first_pattern: int = 0x40) -> None:
    for off in range(0, data, 64 * MiB):
        d.write(disk, first_pattern + off // (64 * MiB) % 0x80, off, min(64 * MiB, data - off))


def job_seconds(bdir: Path) -> Optional[float]:
    """The push job's own time, from the newest run log ("push job done in 0.123s")."""
    logs = sorted((bdir / "logs").glob("backup-*.log"), key=lambda p: p.stat().st_mtime)
    for line in reversed(logs[-1].read_text().splitlines() if logs else []):
        if "push job done in " in line:
            return float(line.rsplit(" ", 1)[-1].rstrip("s"))
    return None


# -- sections ----------------------------------------------------------------------------------
def full_vs_convert(b: Bench, disk: int, data: int) -> Path:
    """Full backup vs `qemu-img convert` of the same disk, interleaved; `sync` before each, so
    each starts with no dirty pages. A backup is flushed before it is recorded; plain convert is
    not (its default target cache mode is 'unsafe'), so `-t writeback` (flushes at the end) is the
    baseline of the target, plain convert is shown beside it."""
    d = b.domain({"vda": disk})
    fill(d, "vda", data)
    src = d.disk_path("vda")
    last = b.work / "full-none"
    out = b.work / "conv.qcow2"

    def convert_flushed() -> None:
        run("sync")
        b.add("convert_flushed_s", timed(lambda: run("qemu-img", "convert", "-U", "-t", "writeback", "-O", "qcow2",
                                                     src, out)))
        out.unlink()

    def convert_direct() -> None:
        # O_DIRECT and a flush at the end: as durable as -t writeback, but it skips the page
        # cache, whose dirty-page throttling made -t writeback bimodal here (0.7 s or ~3 s)
        run("sync")
        b.add("convert_direct_s", timed(lambda: run("qemu-img", "convert", "-U", "-t", "none", "-O", "qcow2",
                                                    src, out)))
        out.unlink()

    def convert_unflushed() -> None:
        run("sync")
        b.add("convert_unflushed_s", timed(lambda: run("qemu-img", "convert", "-U", "-O", "qcow2", src, out)))
        out.unlink()

    def full_backup(i: int) -> Path:
        run("sync")
        bdir = b.work / f"full{i}"
        b.add("full_backup_s", timed(lambda: run(*CLI, "backup", d.name, bdir, *PLAIN, "--level", "full")))
        job = job_seconds(bdir)
        if job is not None:   # QEMU's part (the copy, and the flush when it closes the target)
            b.add("full_backup_push_job_s", job)
        return bdir

    # the order alternates (ABC, CBA, ...): whatever one run leaves behind (page cache, the
    # previous file's discards) falls on each figure alike
    for i in range(b.reps):
        if i:
            shutil.rmtree(last)
        if i % 2 == 0:
            convert_flushed()
            convert_direct()
            last = full_backup(i)
            convert_unflushed()
        else:
            convert_unflushed()
            last = full_backup(i)
            convert_direct()
            convert_flushed()
    # against the faster of the two durable converts (the stricter comparison)
    baseline = min(b.median("convert_flushed_s"), b.median("convert_direct_s"))
    b.target("full backup / flushed qemu-img convert (medians)", b.median("full_backup_s") / baseline, 1.5, "x")
    b.notes["full_backup_over_convert_writeback"] = round(b.median("full_backup_s") / b.median("convert_flushed_s"), 2)
    b.notes["full_backup_over_convert_direct"] = round(b.median("full_backup_s") / b.median("convert_direct_s"), 2)
    if "full_backup_push_job_s" in b.runs:
        b.notes["full_backup_push_job_over_flushed_convert"] = round(b.median("full_backup_push_job_s") / baseline, 2)
    conv = b.runs["convert_flushed_s"]
    b.notes["noise_baseline_max_over_min"] = round(max(conv) / min(conv), 2)
    direct = b.runs["convert_direct_s"]
    b.notes["noise_direct_baseline_max_over_min"] = round(max(direct) / min(direct), 2)

    # the fixed costs on the incremental path, on the last full's chain
    for _ in range(b.reps):
        b.add("inc_nothing_dirty_s", timed(lambda: run(*CLI, "backup", d.name, last, *PLAIN, "--level", "inc")))
        b.add("list_s", timed(lambda: run(*CLI, "list", last)))
        b.add("help_s", timed(lambda: run(*CLI, "--help")))
        b.add("python_start_s", timed(lambda: run(sys.executable, "-c", "pass")))
    b.target("incremental, nothing dirty (whole command)", b.median("inc_nothing_dirty_s"), 0.2, "s")
    b.target("list (whole command)", b.median("list_s"), 0.1, "s")

    # incremental cost grows with dirty bytes, not disk size
    for mib in (4, 32, 128):
        for _ in range(max(1, b.reps // 2)):
            d.write("vda", 0x90, 0, mib * MiB)
            b.add(f"inc_{mib}mib_dirty_s", timed(lambda: run(*CLI, "backup", d.name, last, *PLAIN, "--level", "inc")))
    b.drop(d)
    return last


def pull_vs_push(b: Bench, disk: int, data: int) -> None:
    """Issue 23's targets, side by side: a pull full against a push full of the same disk and
    against `qemu-img convert -t none` of it; pull incrementals (4/32/128 MiB dirty) against push
    incrementals of the same data (two directories of the same domain, one per mode: each
    incremental pair copies the same writes); pull's whole-disk copy with qemu-img (default)
    and with the libnbd pump (VIRTBACKUP_PULL_WHOLE_COPY=libnbd), for what qemu-img bought."""
    d = b.domain({"vda": disk}, "vbpull")
    fill(d, "vda", data)
    src = d.disk_path("vda")
    out = b.work / "pull-conv.qcow2"
    libnbd = dict(os.environ, VIRTBACKUP_PULL_WHOLE_COPY="libnbd")

    def full(name: str, mode: str, env: Optional[Dict[str, str]] = None) -> None:
        bdir = b.work / f"pf-{secrets.token_hex(3)}"
        run("sync")
        t = timed(lambda: subprocess.run([*map(str, CLI), "backup", d.name, str(bdir), *PLAIN, "--level", "full",
                                          "--mode", mode], check=True, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, env=env))
        b.add(name, t)
        shutil.rmtree(bdir)

    def convert() -> None:
        run("sync")
        b.add("pull_baseline_convert_direct_s", timed(lambda: run("qemu-img", "convert", "-U", "-t", "none", "-O",
                                                                  "qcow2", src, out)))
        out.unlink()

    steps = [lambda: full("pull_push_full_s", "push"), lambda: full("pull_full_s", "pull"),
             lambda: full("pull_full_libnbd_s", "pull", libnbd), convert]
    for i in range(b.reps):
        for step in (steps if i % 2 == 0 else list(reversed(steps))):
            step()
    push = b.median("pull_push_full_s")
    b.target("pull full / push full (medians)", b.median("pull_full_s") / push, 1.2, "x")
    conv = b.median("pull_baseline_convert_direct_s")
    b.target("pull full / qemu-img convert -t none", b.median("pull_full_s") / conv, 1.5, "x")
    b.notes["pull_full_libnbd_over_push"] = round(b.median("pull_full_libnbd_s") / push, 2)
    # incrementals: a chain per mode, the same writes before each pair
    dirs = {m: b.work / f"pinc-{m}" for m in ("push", "pull")}
    for m, bdir in dirs.items():
        run(*CLI, "backup", d.name, bdir, *PLAIN, "--level", "full", "--mode", m)
    for mib in (4, 32, 128):
        for i in range(max(1, b.reps // 2)):
            d.write("vda", 0x90 + i, 0, mib * MiB)
            for m in (("push", "pull") if i % 2 == 0 else ("pull", "push")):
                run("sync")
                b.add(f"pull_inc_{mib}mib_{m}_s", timed(lambda m=m: run(*CLI, "backup", d.name, dirs[m], *PLAIN,
                                                                        "--level", "inc", "--mode", m)))
        b.target(f"pull inc / push inc, {mib} MiB dirty", b.median(f"pull_inc_{mib}mib_pull_s")
                 / b.median(f"pull_inc_{mib}mib_push_s"), 1.0, "x")
    b.drop(d)


def write_during_backup(b: Bench, d: scratch.ScratchDomain, guest_write: Callable[[], float],
                        extra: List[object]) -> Optional[float]:
    """A full backup of `d` (uncompressed, `extra` CLI options) started in the background, and
    `guest_write()` timed once libvirt reports the job running; None when it ended first."""
    bdir = b.work / f"gi-{secrets.token_hex(3)}"
    run("sync")
    proc = subprocess.Popen([str(c) for c in (*CLI, "backup", d.name, bdir, *PLAIN, "--level", "full", *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t: Optional[float] = None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            running = d.dom is not None and d.dom.jobInfo()[0] != 0
        except libvirt.libvirtError:   # "backup job data missing": a pull job being set up
            running = False
        if running:
            t = guest_write()
            break
        time.sleep(0.005)
    proc.wait(timeout=600)
    shutil.rmtree(bdir, ignore_errors=True)
    return t


def qemu_side_full(d: scratch.ScratchDomain, work: Path, on_copying: Optional[Callable[[], object]] = None,
                   check: Optional[Path] = None) -> float:
    """A full backup of vda the way issue 23's next step would take one: a MEASUREMENT PROTOTYPE,
    not virtbackup's path (no records, no hashing, no checkpoint, no fault handling).

    libvirt's pull job fixes the point in time (its copy-before-write filter puts the old data in
    a local scratch file), and instead of reading its NBD export, QEMU copies that point in time
    into the qcow2 target itself: a `snapshot-access` node over libvirt's copy-before-write filter,
    read by our own `blockdev-backup` job. Nothing writes to that node, so the job's own filter
    never puts the target in the guest's write path. Seconds from backupBegin to the target
    flushed and libvirt's job ended; `check`: compare the target with this source image."""
    tag = secrets.token_hex(3)
    target, scratch_file, sock = (work / f"qs-{tag}.qcow2", work / f"qs-{tag}.scratch", work / f"qs-{tag}.sock")
    run("qemu-img", "create", "-f", "qcow2", target, str(d.disk_sizes["vda"]))
    xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
           f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch_file}'/></disk>"
           "</disks></domainbackup>")
    snap, tgt, job = f"vbq-snap-{tag}", f"vbq-tgt-{tag}", f"vbq-copy-{tag}"
    dom = d.dom
    assert dom is not None
    t = time.perf_counter()
    dom.backupBegin(xml, None, 0)
    try:
        cbw = next(n["node-name"] for n in monitor.qmp(dom, "query-named-block-nodes", {"flat": True})
                   if n["drv"] == "copy-before-write")
        monitor.qmp(dom, "blockdev-add", {"driver": "snapshot-access", "node-name": snap, "file": cbw})
        monitor.qmp(dom, "blockdev-add", {"driver": "qcow2", "node-name": tgt,
                                          "file": {"driver": "file", "filename": str(target)}})
        monitor.qmp(dom, "blockdev-backup", {"job-id": job, "device": snap, "target": tgt, "sync": "full",
                                             "auto-dismiss": False})
        if on_copying:
            on_copying()
        while True:
            state = next(j for j in monitor.qmp(dom, "query-jobs") if j["id"] == job)
            if state["status"] == "concluded":
                break
            time.sleep(0.005)
        monitor.qmp(dom, "job-dismiss", {"id": job})
        if state.get("error"):
            raise RuntimeError(f"QEMU's copy failed: {state['error']}")
        monitor.qmp(dom, "blockdev-del", {"node-name": tgt})      # closes (and flushes) the target
        monitor.qmp(dom, "blockdev-del", {"node-name": snap})
    finally:
        dom.abortJob()                                            # ends libvirt's pull job
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t
    if check is not None:
        run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", target, check)
    target.unlink()
    scratch_file.unlink(missing_ok=True)
    return elapsed


def qemu_side_copy(b: Bench, disk: int, data: int) -> None:
    """Issue 23's next step, measured before it is built: QEMU copying from libvirt's pull
    snapshot (`qemu_side_full`) against push and pull fulls of the same disk and `qemu-img convert
    -t none` of it; and the guest's write throughput (64 MiB over data copied last) idle and during
    each kind of full."""
    d = b.domain({"vda": disk}, "vbqside")
    fill(d, "vda", data)
    src = d.disk_path("vda")
    out = b.work / "qs-conv.qcow2"
    chunk = 64 * MiB

    def cli_full(mode: str) -> float:
        bdir = b.work / f"qs-{secrets.token_hex(3)}"
        run("sync")
        t = timed(lambda: run(*CLI, "backup", d.name, bdir, *PLAIN, "--level", "full", "--mode", mode))
        if mode == "push":
            b.add("qside_push_job_s", job_seconds(bdir) or float("nan"))
        shutil.rmtree(bdir)
        return t

    def convert() -> None:
        run("sync")
        b.add("qside_convert_direct_s", timed(lambda: run("qemu-img", "convert", "-U", "-t", "none", "-O",
                                                          "qcow2", src, out)))
        out.unlink()

    def qside(first: bool) -> None:
        run("sync")
        b.add("qside_full_s", qemu_side_full(d, b.work, check=src if first else None))

    steps = [lambda i: b.add("qside_push_full_s", cli_full("push")),
             lambda i: b.add("qside_pull_full_s", cli_full("pull")),
             lambda i: qside(i == 0), lambda i: convert()]
    for i in range(b.reps):
        for step in (steps if i % 2 == 0 else list(reversed(steps))):
            step(i)
    qs = b.median("qside_full_s")
    b.target("QEMU-side copy full / push job (prototype)", qs / b.median("qside_push_job_s"), 1.2, "x")
    b.target("QEMU-side copy full / qemu-img convert -t none (prototype)",
             qs / b.median("qside_convert_direct_s"), 1.5, "x")
    b.notes["qside_full_over_push_cli_full"] = round(qs / b.median("qside_push_full_s"), 3)
    b.notes["qside_pull_cli_over_push_cli_full"] = round(b.median("qside_pull_full_s")
                                                         / b.median("qside_push_full_s"), 3)

    # guest impact: the same write, idle and while each full runs (started once the copy runs)
    off = data - chunk

    def guest_write() -> float:
        return timed(lambda: d.qemu_io("vda", f"write -P 0x66 {off} {chunk}"))

    for _ in range(b.reps):
        run("sync")
        b.add("qside_guest_write_idle_s", guest_write())
        for mode in ("push", "pull"):
            t = write_during_backup(b, d, guest_write, ["--mode", mode])
            if t is not None:
                b.add(f"qside_guest_write_during_{mode}_s", t)
        seen: List[float] = []
        qemu_side_full(d, b.work, on_copying=lambda: seen.append(guest_write()))
        b.add("qside_guest_write_during_qside_s", seen[0])
    idle = b.median("qside_guest_write_idle_s")
    for kind in ("push", "pull", "qside"):
        name = f"qside_guest_write_during_{kind}_s"
        if name in b.runs:
            b.notes[f"qside_guest_throughput_fraction_{kind}"] = round(idle / b.median(name), 3)
    b.drop(d)


def restore_chain(b: Bench, disk: int, links: int = 50) -> None:
    """Restore of a 50-link chain vs converting the flattened image (interleaved)."""
    d = b.domain({"vda": disk})
    fill(d, "vda", min(disk // 4, 256 * MiB))
    chain_dir = b.work / "chain50"
    run(*CLI, "backup", d.name, chain_dir, *PLAIN, "--level", "full")
    for i in range(links - 1):
        d.write("vda", 0x10 + i % 64, (i * 7 % (disk // MiB - 1)) * MiB, 1 * MiB)
        run(*CLI, "backup", d.name, chain_dir, *PLAIN, "--level", "inc")
    flat = b.work / "flat.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", chain_dir / "points" / f"{links:04d}" / "vda.qcow2", flat)
    top = chain_dir / "points" / f"{links:04d}" / "vda.qcow2"
    for _ in range(b.reps):
        out = b.work / "restore50"
        run("sync")
        b.add("convert_flattened_s", timed(lambda: run("qemu-img", "convert", "-O", "qcow2", flat,
                                                       b.work / "flat-again.qcow2")))
        (b.work / "flat-again.qcow2").unlink()
        run("sync")
        b.add(f"restore_{links}_links_s", timed(lambda: run(*CLI, "restore", chain_dir, out)))
        shutil.rmtree(out)
        # the floor of any restore through QEMU: the same convert restore runs, no check, no CLI
        run("sync")
        b.add(f"convert_{links}_link_chain_s", timed(lambda: run("qemu-img", "convert", "-W", "-O", "qcow2", top,
                                                                  b.work / "chain-flat.qcow2")))
        (b.work / "chain-flat.qcow2").unlink()
        b.add(f"qemu_img_map_{links}_link_chain_s", timed(lambda: run("qemu-img", "map", top)))
    b.target(f"restore of a {links}-link chain / convert of the flattened image (medians)",
             b.median(f"restore_{links}_links_s") / b.median("convert_flattened_s"), 1.0, "x")
    # chain length must not make incrementals slower
    for _ in range(max(1, b.reps // 2)):
        d.write("vda", 0x77, 0, 4 * MiB)
        b.add(f"inc_4mib_dirty_after_{links}_links_s",
              timed(lambda: run(*CLI, "backup", d.name, chain_dir, *PLAIN, "--level", "inc")))
    b.drop(d)


def virtnbdbackup_cycle(b: Bench) -> None:
    """full + 3 inc + restore on twin domains (1 GiB disk, 100 MiB data, 20 MiB per inc), the two
    tools alternating, each rep on fresh twins; only the tools' commands are timed."""
    if not shutil.which("virtnbdbackup"):
        b.notes["virtnbdbackup"] = "not installed (apt-get install virtnbdbackup); skipped"
        return
    b.notes["virtnbdbackup"] = subprocess.run(["virtnbdbackup", "--version"], capture_output=True,
                                              text=True).stdout.strip()
    for rep in range(b.reps):
        for tool in ("virtbackup", "virtnbdbackup"):
            d = b.domain({"vda": 1024 * MiB}, "vbtwin")
            d.write("vda", 0x21, 0, 100 * MiB)
            bdir = b.work / f"twin-{tool}-{rep}"
            spent = 0.0
            for i in range(4):
                if i:
                    d.write("vda", 0x30 + i, (200 + 20 * i) * MiB, 20 * MiB)
                if tool == "virtbackup":
                    cmd: List[object] = [*CLI, "backup", d.name, bdir, *PLAIN, "--level", "full" if i == 0 else "inc"]
                else:
                    cmd = ["virtnbdbackup", "-d", d.name, "-l", "full" if i == 0 else "inc", "-o", bdir,
                           "--noprogress"]
                spent += timed(lambda: run(*cmd))
            out = b.work / f"twin-restore-{tool}-{rep}"
            if tool == "virtbackup":
                cmd = [*CLI, "restore", bdir, out]
            else:
                cmd = ["virtnbdrestore", "-i", bdir, "-o", out, "--noprogress"]
            spent += timed(lambda: run(*cmd))
            b.add(f"cycle_{tool}_s", spent)
            b.drop(d)
            shutil.rmtree(bdir, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    b.target("full+3 inc+restore: virtnbdbackup / virtbackup (medians)",
             b.median("cycle_virtnbdbackup_s") / b.median("cycle_virtbackup_s"), 5.0, "x", at_most=False)


def guest_impact(b: Bench, disk: int, data: int, speeds: List[int]) -> None:
    """The guest's write throughput (HMP `qemu-io` write of 64 MiB over data the backup still has
    to copy, timed) idle vs while a full backup of the disk runs, without and with --max-speed.
    Each during-backup write starts once libvirt reports the job running."""
    d = b.domain({"vda": disk}, "vbguest")
    fill(d, "vda", data)
    chunk = 64 * MiB
    off = data - chunk                       # the end of the data: copied last by the job

    def guest_write() -> float:
        return timed(lambda: d.qemu_io("vda", f"write -P 0x66 {off} {chunk}"))

    for _ in range(b.reps):
        run("sync")
        b.add("guest_write_64mib_idle_s", guest_write())
        t = write_during_backup(b, d, guest_write, [])
        if t is not None:
            b.add("guest_write_64mib_during_full_s", t)
        for sp in speeds:
            t = write_during_backup(b, d, guest_write, ["--max-speed", sp])
            if t is not None:
                b.add(f"guest_write_64mib_during_full_max_speed_{sp // MiB}mib_s", t)
        # pull mode: no copy-before-write into the target in the guest's write path (the old data
        # goes to a scratch file on the hypervisor while our client reads over NBD)
        t = write_during_backup(b, d, guest_write, ["--mode", "pull"])
        if t is not None:
            b.add("guest_write_64mib_during_full_pull_s", t)
        t = write_during_backup(b, d, guest_write, ["--mode", "pull", "--max-speed", speeds[0]])   # our reads paced too
        if t is not None:
            b.add(f"guest_write_64mib_during_full_pull_max_speed_{speeds[0] // MiB}mib_s", t)
    idle = b.median("guest_write_64mib_idle_s")
    for name in sorted(b.runs):
        if name.startswith("guest_write_64mib_during"):
            b.notes[f"guest_throughput_fraction_{name[len('guest_write_64mib_during_'):-2]}"] = \
                round(idle / b.median(name), 3)
    b.drop(d)


def parallel_jobs(b: Bench, quick: bool) -> None:
    """`run` of one job over 8 domains (full backups), parallel = 2 against parallel = 1,
    interleaved, fresh backup roots each time. Target (DESIGN.md): >= 1.6x on 2 cores."""
    prefix = f"vbbenchjob-{secrets.token_hex(3)}"
    size, data = (64 * MiB, 32 * MiB) if quick else (256 * MiB, 128 * MiB)
    doms = [scratch.ScratchDomain(b.conn, f"{prefix}-{i}", b.work / "disks", {"vda": size}) for i in range(8)]
    for d in doms:
        b.domains.append(d)
        d.create()
        d.write("vda", 0x50, 0, data)
    for rep in range(b.reps):
        for par in (1, 2):
            root = b.work / f"root-{par}-{rep}"
            root.mkdir()
            job = b.work / f"job{par}.toml"
            job.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nlevel = "full"\n'
                           f"parallel = {par}\n")
            run("sync")
            b.add(f"run_8_domains_parallel{par}_s", timed(lambda: run(*CLI, "run", job)))
            shutil.rmtree(root)
    for d in doms:
        b.drop(d)
    b.target("run over 8 domains: parallel=1 / parallel=2 (medians)",
             b.median("run_8_domains_parallel1_s") / b.median("run_8_domains_parallel2_s"), 1.6, "x", at_most=False)


def restore_check(b: Bench, disk: int, data: int) -> None:
    """What checking every image before a restore costs (size, backing link and hash of each
    image, hashed while the copy is made): the restore command with the check, the plain
    `qemu-img convert` of the point's image (a restore without any check), and the check alone
    (in-process); interleaved, `sync` before each; for a full and for a 50-link chain."""
    from virtbackup.store import integrity
    from virtbackup.store.chain import BackupDir
    d = b.domain({"vda": disk})
    fill(d, "vda", data)
    bdir = b.work / "full-rc"
    run(*CLI, "backup", d.name, bdir, *PLAIN, "--level", "full")
    chain_dir = b.work / "chain50-rc"
    run(*CLI, "backup", d.name, chain_dir, *PLAIN, "--level", "full")
    for i in range(49):
        d.write("vda", 0x10 + i % 64, (i * 7 % (disk // MiB - 1)) * MiB, 1 * MiB)
        run(*CLI, "backup", d.name, chain_dir, *PLAIN, "--level", "inc")
    b.drop(d)
    for label, bd, point in (("full", bdir, "0001"), ("chain50", chain_dir, "latest")):
        bobj = BackupDir(bd)
        ch = bobj.load()
        pt = ch.point(point)
        rels = integrity.chain_images(ch, pt, ["vda"])
        for i in range(b.reps):
            out = b.work / f"r-{label}-{i}"
            run("sync")
            b.add(f"restore_{label}_checked_s", timed(lambda: run(*CLI, "restore", bd, out, "--point", pt.id)))
            shutil.rmtree(out)
            run("sync")
            plain = b.work / f"plain-{label}.qcow2"
            b.add(f"restore_{label}_unchecked_convert_s",
                  timed(lambda: run("qemu-img", "convert", "-O", "qcow2", bd / pt.disks["vda"].image, plain)))
            plain.unlink()
            b.add(f"restore_{label}_check_only_s", timed(lambda: integrity.check_images(bobj, ch, rels)))
        b.notes[f"restore_{label}_images"] = len(rels)
        b.notes[f"restore_{label}_image_mib"] = round(sum((bd / r).stat().st_size for r in rels) / MiB)


# -- compression (issue 24) --------------------------------------------------------------------
class ImageDomain(scratch.ScratchDomain):
    """A scratch domain whose one disk (vda) starts as a copy of an image: the cached userland."""

    def __init__(self, conn: libvirt.virConnect, name: str, workdir: Path, image: Path):
        super().__init__(conn, name, workdir, {"vda": 0})   # no DiskModel: the data is the image's
        self.image = image

    def create(self, start: bool = True) -> "ImageDomain":
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.disk_path("vda")
        shutil.copyfile(self.image, path)            # a writable copy (the cached image is 0444)
        self.dom = self.conn.defineXML(scratch.domain_xml(self.name, {"vda": path}, self.memory_mib))
        if start:
            self.dom.create()
        return self


def stored_bytes(path: Path) -> int:
    """What a backup stores: the apparent size (st_size, `du --apparent-size -b`) of the file, or of
    every regular file under the directory (images, metadata, XML, logs alike)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def userland_image() -> Path:
    """The cached Debian 12 minbase disk (scripts/userland.py builds it on first use, ~1 min)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "userland.py")],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def cli_has_option(command: str, option: str) -> bool:
    out = subprocess.run([*map(str, CLI), command, "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="200")).stdout
    return option in out


def guestfs_change(disks: List[Path], rep: int) -> None:
    """The realistic change between incrementals: `cp -a /usr/share /srv/share-REP` inside the
    guest's ext4 (about 54 MB: message catalogs, docs, man pages, zoneinfo: real files, written
    by a real kernel's ext4, journal and metadata included), through libguestfs on the shut-off
    domains' disks, one appliance for all of them. libguestfs's QEMU opens the qcow2 itself, so
    the disks' persistent dirty bitmaps record the writes as a guest's would. KVM aborts the
    appliance on this machine: TCG unless LIBGUESTFS_BACKEND_SETTINGS says otherwise."""
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    cmd: List[str] = ["guestfish"]
    for p in disks:
        cmd += ["--format=qcow2", "-a", str(p)]
    cmd.append("run")
    for i in range(len(disks)):
        dev = f"/dev/sd{chr(ord('a') + i)}"
        cmd += [":", "mount", dev, "/", ":", "cp-a", "/usr/share", f"/srv/share-{rep}", ":", "sync",
                ":", "umount-all"]
    cmd += [":", "shutdown"]
    subprocess.run(cmd, check=True, capture_output=True, env=env)


def compression(b: Bench, quick: bool) -> None:
    """Issue 24, side by side in one run, on a real Debian 12 userland (debootstrap minbase, about
    222 MiB allocated in ext4 on a 2 GiB qcow2; scripts/userland.py) attached to running scratch
    domains (no guest OS runs: the disk is data). Fulls, interleaved (alternating order), `sync`
    before each, every output removed after it is measured: virtbackup uncompressed, virtbackup
    `--compress zstd` and `zlib` (once the CLI has the option), `qemu-img convert -c` with zstd and
    with zlib (`-t writeback`: flushed at the end like a backup), and `virtnbdbackup -z` (lz4) on a
    twin domain with its own copy of the disk (virtnbdbackup refuses foreign checkpoints). Stored
    size: the apparent size of every file the command wrote (`stored_bytes`). Then incrementals:
    one chain per variant, and before each round the same realistic change on both disks
    (`guestfs_change`: the domains stopped cleanly, the change made, the domains started again;
    none of that is timed)."""
    image = userland_image()
    b.notes["compress_image"] = f"{image} ({stored_bytes(image) / MiB:.0f} MiB qcow2 file)"
    has_compress = cli_has_option("backup", "--compress")
    if not has_compress:
        b.notes["compress_missing"] = ("`virtbackup backup` has no --compress option yet: only the baselines and "
                                       "the uncompressed backups were measured, no target evaluated")
    levels = ["zstd", "zlib"] if has_compress else []
    d = ImageDomain(b.conn, f"vbcomp-{secrets.token_hex(3)}", b.work / "disks", image)
    b.domains.append(d)
    d.create()
    twin: Optional[ImageDomain] = None
    if shutil.which("virtnbdbackup"):
        b.notes["virtnbdbackup"] = subprocess.run(["virtnbdbackup", "--version"], capture_output=True,
                                                  text=True).stdout.strip()
        twin = ImageDomain(b.conn, f"vbcomptwin-{secrets.token_hex(3)}", b.work / "disks", image)
        b.domains.append(twin)
        twin.create()
    else:
        b.notes["virtnbdbackup"] = "not installed (apt-get install virtnbdbackup); its figures skipped"
    src = d.disk_path("vda")

    seen: Dict[str, Dict[str, int]] = {}

    def timed_cmd(name: str, cmd: List[object]) -> None:
        """Time a command; for virtbackup's (`--json`), count which transport and compression
        each point recorded (notes: compress_points_recorded)."""
        json_out = name.startswith("comp_") and "_virtbackup_" in name
        argv = [str(c) for c in (*cmd, "--json")] if json_out else [str(c) for c in cmd]
        holder: Dict[str, str] = {}
        b.add(f"{name}_s", timed(lambda: holder.update(
            out=subprocess.run(argv, check=True, capture_output=True, text=True).stdout)))
        if json_out:
            try:
                pt = json.loads(holder["out"])["point"]
                key = f"{pt.get('transport')}/{pt.get('compression')}"
            except (ValueError, KeyError, TypeError):
                key = "unparsed"
            counts = seen.setdefault(name, {})
            counts[key] = counts.get(key, 0) + 1
            b.notes["compress_points_recorded"] = {k: dict(v) for k, v in seen.items()}

    def measure(name: str, out: Path, cmd: List[object]) -> None:
        run("sync")
        timed_cmd(name, cmd)
        b.add(f"{name}_mib", stored_bytes(out) / MiB)
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()

    def vb_full(level: str) -> None:
        out = b.work / f"cf-{secrets.token_hex(3)}"
        # explicit `--compress none`, whatever the default is
        lv, _, mode = level.partition("_")
        extra: List[object] = ["--compress", lv] if has_compress else []
        extra += ["--mode", mode or "push"]      # no suffix: push, as these figures were first taken
        measure(f"comp_full_virtbackup_{level}", out, [*CLI, "backup", d.name, out, "--level", "full", *extra])

    def convert(ctype: str) -> None:
        out = b.work / f"cc-{secrets.token_hex(3)}.qcow2"
        opts: List[object] = ["-o", "compression_type=zstd"] if ctype == "zstd" else []   # zlib: the default
        measure(f"comp_full_convert_{ctype}", out, ["qemu-img", "convert", "-U", "-t", "writeback", "-c",
                                                    "-O", "qcow2", *opts, src, out])

    def vnb_full() -> None:
        assert twin is not None
        out = b.work / f"cv-{secrets.token_hex(3)}"
        measure("comp_full_virtnbdbackup_z", out, ["virtnbdbackup", "-d", twin.name, "-l", "full", "-z",
                                                   "-o", out, "--noprogress"])

    # each also in pull mode (`_pull`): the transport a compressed chain should default to
    steps: List[Callable[[], None]] = [functools.partial(vb_full, lv) for lv in ("none", "none_pull")]
    steps += [functools.partial(vb_full, lv) for lv in levels]
    steps += [functools.partial(vb_full, lv) for lv in ("zstd_push", "zstd_pull") if has_compress]
    steps += [lambda: convert("zstd"), lambda: convert("zlib")]
    if twin is not None:
        steps.append(vnb_full)
    for i in range(b.reps):
        for step in (steps if i % 2 == 0 else list(reversed(steps))):
            step()

    def med(name: str) -> float:
        return b.median(name)

    none_mib = med("comp_full_virtbackup_none_mib")

    def not_compressed(kind: str, lv: str, plain: float) -> None:
        """A compressed run that stored about what the uncompressed one did did not compress:
        said in the notes (the medians would hide one or two such runs)."""
        runs = b.runs[f"comp_{kind}_virtbackup_{lv}_mib"]
        bad = [round(x, 1) for x in runs if x > 0.9 * plain]
        if bad:
            b.notes[f"compress_{kind}_{lv}_runs_not_compressed"] = (f"{len(bad)} of {len(runs)} stored {bad} MiB "
                                                                    f"(uncompressed: {plain:.1f} MiB)")
    for lv in levels:
        not_compressed("full", lv, none_mib)
    b.notes["compress_convert_zstd_over_uncompressed_full_stored"] = round(med("comp_full_convert_zstd_mib")
                                                                           / none_mib, 3)
    b.notes["compress_convert_zlib_over_convert_zstd_stored"] = round(med("comp_full_convert_zlib_mib")
                                                                      / med("comp_full_convert_zstd_mib"), 3)
    b.notes["compress_convert_zstd_over_uncompressed_full_seconds"] = round(med("comp_full_convert_zstd_s")
                                                                            / med("comp_full_virtbackup_none_s"), 2)
    if twin is not None:
        b.notes["compress_virtnbdbackup_z_over_convert_zstd_stored"] = round(med("comp_full_virtnbdbackup_z_mib")
                                                                             / med("comp_full_convert_zstd_mib"), 3)
        b.notes["compress_virtnbdbackup_z_over_convert_zstd_seconds"] = round(med("comp_full_virtnbdbackup_z_s")
                                                                              / med("comp_full_convert_zstd_s"), 2)
    if has_compress:
        b.target("compressed full (zstd) stored / qemu-img convert -c zstd stored (medians)",
                 med("comp_full_virtbackup_zstd_mib") / med("comp_full_convert_zstd_mib"), 1.02, "x")
        b.target("compressed full (zstd) / uncompressed full, seconds (medians)",
                 med("comp_full_virtbackup_zstd_s") / med("comp_full_virtbackup_none_s"), 2.0, "x")
        if twin is not None:
            b.target("virtnbdbackup -z full / compressed full (zstd), seconds (medians)",
                     med("comp_full_virtnbdbackup_z_s") / med("comp_full_virtbackup_zstd_s"), 2.0, "x",
                     at_most=False)
        b.notes["compress_zlib_full_over_convert_zlib_stored"] = round(med("comp_full_virtbackup_zlib_mib")
                                                                       / med("comp_full_convert_zlib_mib"), 3)
        b.notes["compress_zlib_full_over_uncompressed_full_seconds"] = round(
            med("comp_full_virtbackup_zlib_s") / med("comp_full_virtbackup_none_s"), 2)

    # incrementals: one chain per variant (fulls untimed), the same change on both disks per round
    variants = ["none", "none_pull", *levels, *(["zstd_push", "zstd_pull"] if has_compress else [])]
    chains: Dict[str, Path] = {lv: b.work / f"ci-{lv}" for lv in variants}

    def vb_args(lv: str) -> List[object]:
        c, _, mode = lv.partition("_")
        return [*(["--compress", c] if has_compress else []), "--mode", mode or "push"]

    for lv, bdir in chains.items():
        run(*CLI, "backup", d.name, bdir, "--level", "full", *vb_args(lv))
    vnb_dir = b.work / "ci-virtnbdbackup"
    if twin is not None:
        run("virtnbdbackup", "-d", twin.name, "-l", "full", "-z", "-o", vnb_dir, "--noprogress")
    doms = [x for x in (d, twin) if x is not None]

    def inc(name: str, bdir: Path, cmd: List[object]) -> None:
        before = stored_bytes(bdir)
        run("sync")
        timed_cmd(name, cmd)
        b.add(f"{name}_mib", (stored_bytes(bdir) - before) / MiB)

    inc_steps: List[Callable[[], None]] = [
        functools.partial(inc, f"comp_inc_virtbackup_{lv}", bdir, [
            *CLI, "backup", d.name, bdir, "--level", "inc", *vb_args(lv)])
        for lv, bdir in chains.items()]
    if twin is not None:
        inc_steps.append(lambda: inc("comp_inc_virtnbdbackup_z", vnb_dir, [
            "virtnbdbackup", "-d", twin.name, "-l", "inc", "-z", "-o", vnb_dir, "--noprogress"]))
    change_s: List[float] = []
    for i in range(1 if quick else max(1, min(b.reps, 3))):
        for x in doms:
            scratch.stop_cleanly(x)
        t = time.perf_counter()
        guestfs_change([x.disk_path("vda") for x in doms], i + 1)
        change_s.append(time.perf_counter() - t)
        for x in doms:
            assert x.dom is not None
            x.dom.create()
        for step in (inc_steps if i % 2 == 0 else list(reversed(inc_steps))):
            step()
    b.notes["compress_inc_change"] = (f"cp -a /usr/share /srv/share-N in the guest fs via guestfish on the stopped "
                                      f"domains before each round ({len(change_s)} rounds, "
                                      f"{statistics.median(change_s):.0f} s each, not timed)")
    for lv in levels:
        not_compressed("inc", lv, med("comp_inc_virtbackup_none_mib"))
    if has_compress:
        for kind in ("full", "inc"):
            for lv in ("none", "zstd"):
                other = f"{lv}_push" if lv != "none" else lv
                b.notes[f"compress_{kind}_{lv}_pull_over_push_seconds"] = round(
                    med(f"comp_{kind}_virtbackup_{lv}_pull_s") / med(f"comp_{kind}_virtbackup_{other}_s"), 2)
        b.notes["compress_inc_zstd_over_inc_none_stored"] = round(med("comp_inc_virtbackup_zstd_mib")
                                                                  / med("comp_inc_virtbackup_none_mib"), 3)
        b.notes["compress_inc_zstd_over_inc_none_seconds"] = round(med("comp_inc_virtbackup_zstd_s")
                                                                   / med("comp_inc_virtbackup_none_s"), 2)
    for x in doms:
        b.drop(x)


# -- output ------------------------------------------------------------------------------------
def human(result: Dict[str, Any]) -> str:
    lines = [f"virtbackup benchmark {result['date']} on {result['machine']}",
             f"load average before {result['load_before']}, after {result['load_after']}; "
             f"{result['reps']} interleaved runs per figure", "",
             f"{'figure':<52} {'min':>8} {'median':>8} {'max':>8}"]
    for name, s in result["figures"].items():
        lines.append(f"{name:<52} {s['min']:>8.3f} {s['median']:>8.3f} {s['max']:>8.3f}")
    lines += ["", f"{'target':<62} {'value':>8} {'target':>9} {'ratio':>6}  met"]
    for t in result["targets"]:
        lines.append(f"{t['target']:<62} {t['value']:>8.3f} {t['kind'] + str(t['limit']) + t['unit']:>9} "
                     f"{t['ratio_to_target']:>6.2f}  {'yes' if t['met'] else 'NO'}")
    lines += ["", "notes:"] + [f"  {k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(lines)


def markdown(result: Dict[str, Any]) -> str:
    """docs/performance.md's tables, regenerated from a run."""
    def fmt(name: str, v: float) -> str:
        return f"{v:.2f} s" if name.endswith("_s") else f"{v:.1f} MiB" if name.endswith("_mib") else f"{v:.2f}"
    lines = [f"Run {result['date']} on {result['machine']}; load average {result['load_before']} before, "
             f"{result['load_after']} after; {result['reps']} interleaved runs per figure, median (min–max).", "",
             "| target | measured (median) | target | ratio to target | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        unit = " s" if t["unit"] == "s" else "x"
        lines.append(f"| {t['target']} | {t['value']:.2f}{unit} | {t['kind']} {t['limit']}{unit} | "
                     f"{t['ratio_to_target']:.2f} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "| figure | median (min–max) |", "|---|---|"]
    for name, st in result["figures"].items():
        lines.append(f"| `{name}` | {fmt(name, st['median'])} ({st['min']:.2f}–{st['max']:.2f}) |")
    lines += [""] + [f"- {k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small disks (a smoke run; figures not comparable)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved runs per figure (default 5)")
    ap.add_argument("--only", choices=["full", "pull", "restore", "virtnbdbackup", "guest", "jobs", "restore-check",
                                       "compress", "qemu-copy"],
                    action="append", help="run only these sections (repeatable)")
    ap.add_argument("--virtnbdbackup", action="store_true", help="also time virtnbdbackup on twin domains")
    ap.add_argument("--guest-impact", action="store_true",
                    help="also measure the guest's write throughput during a full backup")
    ap.add_argument("--jobs", action="store_true", help="only time `run` over 8 domains: parallel = 2 vs 1")
    ap.add_argument("--restore-check", action="store_true",
                    help="only the restore figures with and without the image check (full, 50-link chain)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON (else a table)")
    ap.add_argument("--markdown", action="store_true", help="print docs/performance.md's tables")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: print a saved --json run again")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(markdown(saved) if args.markdown else json.dumps(saved, indent=2) if args.json else human(saved))
        return 0
    disk = (256 if args.quick else 4096) * MiB
    data = (64 if args.quick else 768) * MiB
    sections = set(args.only or ["full", "pull", "restore"]
                   + (["virtnbdbackup"] if args.virtnbdbackup else [])
                   + (["guest"] if args.guest_impact else []))
    if args.jobs or args.restore_check:
        sections = set(args.only or []) | ({"jobs"} if args.jobs else set()) \
            | ({"restore-check"} if args.restore_check else set())
    # Bytecode compiled, as a wheel install (pip compiles at install) has it: an editable
    # checkout run with PYTHONDONTWRITEBYTECODE would compile every module on every command.
    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "virtbackup"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="virtbackup-bench-"))
    load_before = load()
    b = Bench(max(1, args.reps), work)
    runs: List[tuple] = [
        ("full", lambda: full_vs_convert(b, disk, data)),
        ("pull", lambda: pull_vs_push(b, disk, data)),
        ("restore", lambda: restore_chain(b, (256 if args.quick else 1024) * MiB)),
        ("virtnbdbackup", lambda: virtnbdbackup_cycle(b)),
        ("guest", lambda: guest_impact(b, (256 if args.quick else 2048) * MiB, (128 if args.quick else 1024) * MiB,
                                       [32 * MiB, 128 * MiB])),
        ("jobs", lambda: parallel_jobs(b, args.quick)),
        ("restore-check", lambda: restore_check(b, (256 if args.quick else 1024) * MiB,
                                                (64 if args.quick else 512) * MiB)),
        ("compress", lambda: compression(b, args.quick)),
        ("qemu-copy", lambda: qemu_side_copy(b, disk, data)),
    ]
    failed = False
    try:
        for name, section in runs:
            if name not in sections:
                continue
            try:
                section()
            except Exception as e:   # noqa: BLE001 - the other sections' figures are still worth having
                failed = True
                b.notes[f"section_{name}_failed"] = f"{type(e).__name__}: {e}"
                print(f"benchmark: section {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        b.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {platform.release()}",
        "load_before": load_before, "load_after": load(), "reps": b.reps, "quick": args.quick,
        "disk_bytes": disk, "data_bytes": data,
        "figures": {k: stats(v) for k, v in b.runs.items()},
        "targets": b.targets, "notes": b.notes,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.markdown:
        print(markdown(result))
    else:
        print(human(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
