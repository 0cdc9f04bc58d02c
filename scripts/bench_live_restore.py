#!/usr/bin/env python3
"""One-off measurement of live restore on this machine: a 1 GiB disk (768 MiB data by default).

Prints, per run: time to running and time to independence of `restore --live` (block pull),
the same copy done by libvirt's blockcopy + pivot (the alternative that was not chosen), and a
plain `restore` (qemu-img convert) for scale. Medians over --reps runs, interleaved.

Run as root after scripts/setup-host.sh:  .venv/bin/python scripts/bench_live_restore.py
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo: tests.support
from tests.support import scratch  # noqa: E402
from virtbackup.virt import host  # noqa: E402

MiB = 1 << 20
CLI = [sys.executable, "-m", "virtbackup.cli"]


def cli(*args: object) -> str:
    return subprocess.run([*CLI, *map(str, args)], check=True, capture_output=True, text=True).stdout


def blockcopy_run(conn: libvirt.virConnect, bdir: Path, out: Path, name: str) -> Dict[str, float]:
    """restore --instant --define --start, then blockcopy (TRANSIENT_JOB: needed on libvirt 9.0
    for a persistent domain) of the whole chain into a new file, then pivot."""
    t0 = time.perf_counter()
    cli("restore", bdir, out, "--instant", "--define", name, "--start")
    running = time.perf_counter() - t0
    dom = conn.lookupByName(name)
    dest = f"<disk type='file'><source file='{out}/vda.copy.qcow2'/><driver type='qcow2'/></disk>"
    dom.blockCopy("vda", dest, {}, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
    while True:
        info = dom.blockJobInfo("vda", 0)
        if info and info["end"] > 0 and info["cur"] == info["end"]:
            break
        time.sleep(0.01)
    dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    return {"running": running, "independent": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=768)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="virtbackup-livebench-"))
    src = scratch.ScratchDomain(conn, f"vblb-{secrets.token_hex(3)}", work / "disks",
                                {"vda": args.disk_mib * MiB})
    names: List[str] = []
    res: Dict[str, List[float]] = {k: [] for k in ("live_running", "live_independent", "copy_running",
                                                    "copy_independent", "convert_restore")}
    try:
        src.create()
        for off in range(0, args.data_mib * MiB, 64 * MiB):
            src.write("vda", 0x40 + off // (64 * MiB), off, min(64 * MiB, args.data_mib * MiB - off))
        bdir = work / "bk"
        cli("backup", src.name, bdir, "--level", "full")
        scratch.stop_cleanly(src)
        for i in range(args.reps):
            subprocess.run(["sync"], check=True)
            name = f"vblb-live-{secrets.token_hex(3)}"
            names.append(name)
            out = work / f"live{i}"
            t0 = time.perf_counter()
            stdout = cli("restore", bdir, out, "--live", "--define", name, "--no-progress")
            res["live_independent"].append(time.perf_counter() - t0)
            m = re.search(r"running after ([0-9.]+)s", stdout)
            assert m, stdout
            res["live_running"].append(float(m.group(1)) + 0.0)
            scratch.remove_domain(conn, name)
            shutil.rmtree(out)

            subprocess.run(["sync"], check=True)
            name = f"vblb-copy-{secrets.token_hex(3)}"
            names.append(name)
            out = work / f"copy{i}"
            r = blockcopy_run(conn, bdir, out, name)
            res["copy_running"].append(r["running"])
            res["copy_independent"].append(r["independent"])
            scratch.remove_domain(conn, name)
            shutil.rmtree(out)

            subprocess.run(["sync"], check=True)
            out = work / f"conv{i}"
            t0 = time.perf_counter()
            cli("restore", bdir, out)
            res["convert_restore"].append(time.perf_counter() - t0)
            shutil.rmtree(out)
        med = {k: round(statistics.median(v), 2) for k, v in res.items()}
        print(json.dumps({"disk_mib": args.disk_mib, "data_mib": args.data_mib, "reps": args.reps,
                          "runs": {k: [round(x, 2) for x in v] for k, v in res.items()}, "median": med},
                         indent=1))
        print("note: 'live_running' is what the command prints (from its start inside Python, "
              "interpreter start-up not included); the other times are wall clock of whole commands")
    finally:
        for n in names:
            scratch.remove_domain(conn, n)
        src.remove()
        shutil.rmtree(work, ignore_errors=True)
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
