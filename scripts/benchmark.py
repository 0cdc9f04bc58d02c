#!/usr/bin/env python3
"""Side-by-side speed measurements of virtbackup on this machine (ratios, not absolute times).

Targets from DESIGN.md: full backup <= 1.0x `qemu-img convert -O qcow2` of the same disk;
incremental with nothing dirty <= 0.3 s for the whole command; incremental cost grows with
dirty bytes, not disk size or chain length; restore of a 50-link chain <= 1.3x converting the
flattened image; full + 3 inc + restore >= 5x faster than virtnbdbackup (if installed:
`apt-get install virtnbdbackup`, then pass --virtnbdbackup).

Run as root after scripts/setup-host.sh:  .venv/bin/python scripts/benchmark.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo: tests.support

from tests.support import scratch  # noqa: E402
from virtbackup import host  # noqa: E402

MiB = 1 << 20
CLI = [sys.executable, "-m", "virtbackup.cli"]


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(*cmd: object) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller disk and fewer repeats")
    ap.add_argument("--virtnbdbackup", action="store_true", help="also time virtnbdbackup on a twin domain")
    ap.add_argument("--jobs", action="store_true", help="only time `run` over 8 domains: parallel = 2 vs 1")
    ap.add_argument("--restore-check", action="store_true",
                    help="only the restore figures with and without the image check (full, 50-link chain)")
    args = ap.parse_args()
    if args.jobs:
        print(json.dumps(compare_parallel(quick=args.quick), indent=2))
        return 0
    disk = (256 if args.quick else 1024) * MiB
    data = (64 if args.quick else 512) * MiB
    reps = 2 if args.quick else 3
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="virtbackup-bench-"))
    results: Dict[str, object] = {"disk_bytes": disk, "data_bytes": data}
    d = scratch.ScratchDomain(conn, f"vbbench-{secrets.token_hex(3)}", work / "disks", {"vda": disk})
    try:
        d.create()
        for off in range(0, data, 64 * MiB):
            d.write("vda", 0x40 + off // (64 * MiB), off, min(64 * MiB, data - off))

        if args.restore_check:
            bdir = work / "full-rc"
            run(*CLI, "backup", d.name, bdir, "--level", "full")
            chain_dir = work / "chain50"
            run(*CLI, "backup", d.name, chain_dir, "--level", "full")
            for i in range(49):
                d.write("vda", 0x10 + i % 64, (i * 7 % (disk // MiB - 1)) * MiB, 1 * MiB)
                run(*CLI, "backup", d.name, chain_dir, "--level", "inc")
            reps = 5
            restore_check_figures(results, work, bdir, chain_dir, reps)
            print(json.dumps(results, indent=2))
            print_restore_check(results)
            return 0

        # 1. full backup vs qemu-img convert of the same disk, alternating, median of reps.
        # A backup is flushed to disk before it is recorded; plain `qemu-img convert` is not
        # (its default target cache mode is 'unsafe'), so `-t writeback` (flushes at the end) is
        # the fair baseline; both are reported. `sync` first, so each starts with no dirty pages.
        t_full, t_conv, t_conv_flush = [], [], []
        for i in range(reps):
            out = work / f"conv{i}.qcow2"
            run("sync")
            t_conv.append(timed(lambda: run("qemu-img", "convert", "-U", "-O", "qcow2", d.disk_path("vda"), out)))
            out.unlink()
            run("sync")
            t_conv_flush.append(timed(lambda: run("qemu-img", "convert", "-U", "-t", "writeback", "-O", "qcow2",
                                                  d.disk_path("vda"), out)))
            out.unlink()
            b = work / f"full{i}"
            run("sync")
            t_full.append(timed(lambda: run(*CLI, "backup", d.name, b, "--level", "full")))
            if i < reps - 1:
                shutil.rmtree(b)
        results["full_s"] = median(t_full)
        results["convert_s"] = median(t_conv)
        results["convert_flushed_s"] = median(t_conv_flush)
        results["full_vs_convert"] = median(t_full) / median(t_conv)
        results["full_vs_convert_flushed"] = median(t_full) / median(t_conv_flush)
        bdir = work / f"full{reps - 1}"

        # 2. incremental with nothing dirty: the whole command
        t_empty = [timed(lambda: run(*CLI, "backup", d.name, bdir, "--level", "inc")) for _ in range(5)]
        results["inc_nothing_dirty_s"] = median(t_empty)

        # 3. incremental cost vs dirty bytes
        per_dirty = {}
        for mib in (4, 32, 128):
            d.write("vda", 0x90, 0, mib * MiB)
            per_dirty[mib] = timed(lambda: run(*CLI, "backup", d.name, bdir, "--level", "inc"))
        results["inc_s_by_dirty_mib"] = per_dirty

        # 4. restore of a 50-link chain vs converting the flattened image
        chain_dir = work / "chain50"
        run(*CLI, "backup", d.name, chain_dir, "--level", "full")
        for i in range(49):
            d.write("vda", 0x10 + i % 64, (i * 7 % (disk // MiB - 1)) * MiB, 1 * MiB)
            run(*CLI, "backup", d.name, chain_dir, "--level", "inc")
        r1 = work / "restore50"
        t_restore = timed(lambda: run(*CLI, "restore", chain_dir, r1))
        flat = r1 / "vda.qcow2"
        t_flat = timed(lambda: run("qemu-img", "convert", "-O", "qcow2", flat, work / "flat-again.qcow2"))
        results["restore50_s"] = t_restore
        results["convert_flat_s"] = t_flat
        results["restore50_vs_convert"] = t_restore / t_flat
        restore_check_figures(results, work, bdir, chain_dir, reps)

        # chain length must not make incrementals slower
        d.write("vda", 0x77, 0, 4 * MiB)
        results["inc_4mib_after_50_links_s"] = timed(lambda: run(*CLI, "backup", d.name, chain_dir, "--level", "inc"))

        if args.virtnbdbackup and shutil.which("virtnbdbackup"):
            results.update(compare_virtnbdbackup(conn, work))
    finally:
        d.remove()
        shutil.rmtree(work, ignore_errors=True)

    print(json.dumps(results, indent=2))
    print(f"full backup / qemu-img convert: {results['full_vs_convert']:.2f}x (target <= 1.0); "
          f"/ convert -t writeback: {results['full_vs_convert_flushed']:.2f}x")
    print(f"incremental, nothing dirty:    {results['inc_nothing_dirty_s']:.3f} s (target <= 0.3)")
    print(f"restore 50 links / convert:    {results['restore50_vs_convert']:.2f}x (target <= 1.3)")
    print_restore_check(results)
    return 0


def compare_parallel(quick: bool) -> Dict[str, float]:
    """`run` of one job over 8 domains (full backups), parallel = 2 against parallel = 1.

    Target (DESIGN.md): >= 1.6x on 2 cores. Interleaved, fresh backup roots each time, medians.
    """
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="virtbackup-bench-jobs-"))
    prefix = f"vbbenchjob-{secrets.token_hex(3)}"
    size, data, reps = (64 * MiB, 32 * MiB, 2) if quick else (256 * MiB, 128 * MiB, 5)
    doms = [scratch.ScratchDomain(conn, f"{prefix}-{i}", work / "disks", {"vda": size}) for i in range(8)]
    times: Dict[int, List[float]] = {1: [], 2: []}
    try:
        for d in doms:
            d.create()
            d.write("vda", 0x50, 0, data)
        for rep in range(reps):
            for par in (1, 2):
                root = work / f"root-{par}-{rep}"
                root.mkdir()
                job = work / f"job{par}.toml"
                job.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nlevel = "full"\n'
                               f"parallel = {par}\n")
                run("sync")
                times[par].append(timed(lambda: run(*CLI, "run", job)))
                shutil.rmtree(root)
    finally:
        for d in doms:
            d.remove()
        shutil.rmtree(work, ignore_errors=True)
    one, two = median(times[1]), median(times[2])
    return {"run_8_domains_parallel1_s": one, "run_8_domains_parallel2_s": two, "parallel2_speedup": one / two}

def restore_check_figures(results: Dict[str, object], work: Path, bdir: Path, chain_dir: Path, reps: int) -> None:
    """What checking every image before a restore costs (size, backing link and SHA-256 of each
    image, hashed while the copy is made): the restore command with the check, the plain
    `qemu-img convert` of the point's image (a restore without any check), and the check alone
    (in-process); medians of interleaved runs, `sync` before each."""
    from virtbackup import integrity
    from virtbackup.chain import BackupDir
    for label, bd, point in (("full", bdir, "0001"), ("chain50", chain_dir, "latest")):
        bobj = BackupDir(bd)
        ch = bobj.load()
        pt = ch.point(point)
        rels = integrity.chain_images(ch, pt, ["vda"])
        t_with, t_plain, t_check = [], [], []
        for i in range(reps):
            out = work / f"r-{label}-{i}"
            run("sync")
            t_with.append(timed(lambda: run(*CLI, "restore", bd, out, "--point", pt.id)))
            shutil.rmtree(out)
            run("sync")
            t_plain.append(timed(lambda: run("qemu-img", "convert", "-O", "qcow2", bd / pt.disks["vda"].image,
                                             work / f"plain-{label}.qcow2")))
            (work / f"plain-{label}.qcow2").unlink()
            t_check.append(timed(lambda: integrity.check_images(bobj, ch, rels)))
        results[f"restore_{label}_checked_s"] = median(t_with)
        results[f"restore_{label}_unchecked_convert_s"] = median(t_plain)
        results[f"restore_{label}_check_only_s"] = median(t_check)
        results[f"restore_{label}_images"] = len(rels)
        results[f"restore_{label}_image_bytes"] = sum((bd / r).stat().st_size for r in rels)


def print_restore_check(results: Dict[str, object]) -> None:
    for label in ("full", "chain50"):
        print(f"restore {label}: {results[f'restore_{label}_checked_s']:.2f} s with the image check "
              f"(the check alone {results[f'restore_{label}_check_only_s']:.2f} s for "
              f"{results[f'restore_{label}_images']} image(s), "
              f"{results[f'restore_{label}_image_bytes'] / MiB:.0f} MiB); plain qemu-img convert "  # type: ignore[operator]
              f"{results[f'restore_{label}_unchecked_convert_s']:.2f} s")


def compare_virtnbdbackup(conn: object, work: Path) -> Dict[str, float]:
    """full + 3 inc + restore on twin domains (1 GiB disk, 100 MiB data, 20 MiB per inc)."""
    out: Dict[str, float] = {}
    for tool in ("virtbackup", "virtnbdbackup"):
        d = scratch.ScratchDomain(conn, f"vbtwin-{secrets.token_hex(3)}", work / "twin", {"vda": 1024 * MiB})
        try:
            d.create()
            d.write("vda", 0x21, 0, 100 * MiB)
            bdir = work / f"twin-{tool}"
            spent = 0.0     # the tools' commands only; the guest writes are the same for both
            for i in range(4):
                if i:
                    d.write("vda", 0x30 + i, (200 + 20 * i) * MiB, 20 * MiB)
                if tool == "virtbackup":
                    cmd = [*CLI, "backup", d.name, bdir, "--level", "full" if i == 0 else "inc"]
                else:
                    cmd = ["virtnbdbackup", "-d", d.name, "-l", "full" if i == 0 else "inc", "-o", bdir,
                           "--noprogress"]
                spent += timed(lambda: run(*cmd))
            if tool == "virtbackup":
                cmd = [*CLI, "restore", bdir, work / f"twin-restore-{tool}"]
            else:
                cmd = ["virtnbdrestore", "-i", bdir, "-o", work / f"twin-restore-{tool}", "--noprogress"]
            spent += timed(lambda: run(*cmd))
            out[f"cycle_{tool}_s"] = spent
        finally:
            d.remove()
    out["virtnbdbackup_vs_virtbackup"] = out["cycle_virtnbdbackup_s"] / out["cycle_virtbackup_s"]
    return out


if __name__ == "__main__":
    sys.exit(main())
