#!/usr/bin/env python3
"""Off-site push and pull against a plain boto3 transfer of the same bytes to the same server,
side by side in one run (docs/offsite.md, targets of issue 25):

- push: `virtbackup offsite push` of a full point (a qcow2 image of --data-mib random data, its
  two XML files and the manifest) vs boto3's `upload_file` (s3transfer's default multipart
  upload, 8 MiB parts, 10 threads) of the same files; target ratio >= 0.8 (throughput).
- incremental: the bytes a push of the next point (an inc image over --inc-mib) sends: that
  point's files only.
- pull + restore: `offsite pull` + `virtbackup restore` vs boto3's `download_file` of the same
  objects + the same local restore; target ratio <= 1.5 (time).

The server is a throwaway Ceph RGW (scripts/s3lab.sh, memstore: data in RAM) on 127.0.0.1,
started and removed by this script. The backup dir is built with qemu-img (no libvirt needed):
one full and one inc point recorded the way a backup records them. Medians of --reps runs,
interleaved (push, plain, pull, plain ...); every run writes a fresh prefix and deletes it after.

Run after scripts/setup-host.sh:  .venv/bin/python scripts/bench_offsite.py [--data-mib 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo: tests.support
from tests.support import s3lab  # noqa: E402
from virtbackup import api  # noqa: E402
from virtbackup.store.chain import BackupDir, Chain, DiskImage, Point, now_iso  # noqa: E402
from virtbackup.store.digest import Digest  # noqa: E402

MiB = 1 << 20


def qemu_img(*args: object) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def make_backup_dir(bdir: Path, data_mib: int, inc_mib: int) -> None:
    """A backup dir as virtbackup records it: 0001 full (random data), 0002 inc on it."""
    disk = 2 * data_mib * MiB
    bdir.mkdir(mode=0o700)
    raw = bdir / "data.raw"
    with open(raw, "wb") as f:
        f.truncate(disk)
        for off in range(0, data_mib * MiB, 64 * MiB):
            f.seek(off)
            f.write(os.urandom(min(64 * MiB, data_mib * MiB - off)))
    chain = Chain("bench", "00000000-0000-0000-0000-0000000000be", "be0c4be0", next_seq=1)
    for pid, level in (("0001", "full"), ("0002", "inc")):
        pdir = bdir / "points" / pid
        pdir.mkdir(parents=True, mode=0o700)
        img = pdir / "vda.qcow2"
        if level == "full":
            qemu_img("convert", "-O", "qcow2", "-o", "compat=1.1", raw, img)
        else:
            qemu_img("create", "-f", "qcow2", "-o", "compat=1.1", "-b", "../0001/vda.qcow2", "-F", "qcow2", img)
            with open(bdir / "inc.raw", "wb") as f:
                f.write(os.urandom(inc_mib * MiB))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {inc_mib}M", str(img)], check=True,
                           capture_output=True)
        for name in ("domain.xml", "checkpoint.xml"):
            (pdir / name).write_text(f"<{name.split('.')[0]}><name>bench-{pid}</name></{name.split('.')[0]}>\n")
        chain.points.append(Point(
            pid, level, now_iso(), f"virtbackup-be0c4be0-{pid}",
            None if level == "full" else "virtbackup-be0c4be0-0001",
            None if level == "full" else "0001", "0001",
            {"vda": DiskImage(f"points/{pid}/vda.qcow2", None if level == "full" else "points/0001/vda.qcow2",
                              disk, img.stat().st_size, Digest.of_file(img))},
            f"points/{pid}/domain.xml", f"points/{pid}/checkpoint.xml", level, 0.0, "crash",
            domain_xml_digest=Digest.of_file(pdir / "domain.xml"),
            checkpoint_xml_digest=Digest.of_file(pdir / "checkpoint.xml")))
        chain.next_seq += 1
    raw.unlink()
    (bdir / "inc.raw").unlink()
    BackupDir(bdir).save(chain)


def empty_prefix(s3: Any, bucket: str, prefix: str) -> None:
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-mib", type=int, default=512, help="random data in the full image (MiB)")
    ap.add_argument("--inc-mib", type=int, default=32, help="data written for the incremental (MiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args()
    why = s3lab.available()
    if why:
        print(f"bench_offsite: {why}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-"))
    times: Dict[str, List[float]] = {"push": [], "plain_upload": [], "pull_restore": [], "plain_download_restore": []}
    inc_sent: List[int] = []
    try:
        bdir = work / "bk"
        make_backup_dir(bdir, a.data_mib, a.inc_mib)
        chain = BackupDir(bdir).load()
        full = chain.points[0]
        files = [full.disks["vda"].image, full.domain_xml, full.checkpoint_xml]
        full_bytes = sum((bdir / r).stat().st_size for r in files)
        inc = chain.points[1]
        inc_bytes = sum((bdir / r).stat().st_size for r in (inc.disks["vda"].image, inc.domain_xml,
                                                             inc.checkpoint_xml))
        # RGW frees deleted objects lazily (its garbage collector waits hours): room for every run
        with s3lab.Lab(memstore_bytes=(2 * a.reps + 2) * full_bytes + (1 << 30)) as lab:
            os.environ.update(lab.cli_env())
            s3 = lab.client()
            bucket = lab.make_bucket(lock=False)
            from boto3.s3.transfer import TransferConfig
            plain_cfg = TransferConfig()            # s3transfer's defaults: what a plain boto3 script gets
            one = work / "one"                      # the full point alone (its metadata rewritten)
            shutil.copytree(bdir, one)
            c1 = BackupDir(one).load()
            c1.points = c1.points[:1]
            c1.next_seq = 2
            BackupDir(one).save(c1)
            shutil.rmtree(one / "points" / "0002")
            for rep in range(a.reps):
                # push of the full point vs plain boto3 multipart uploads of the same files
                prefix = f"r{rep}-{secrets.token_hex(3)}"
                t0 = time.perf_counter()
                api.offsite_push(one, f"s3://{bucket}/{prefix}")
                times["push"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for rel in files:
                    s3.upload_file(str(one / rel), bucket, f"plain-{prefix}/{rel}", Config=plain_cfg)
                times["plain_upload"].append(time.perf_counter() - t0)
                # the incremental: only its point's files go up
                inc_sent.append(api.offsite_push(bdir, f"s3://{bucket}/{prefix}").bytes_sent)
                # pull + restore of the inc point vs a plain download of the same objects + restore
                out = work / f"pull-{rep}"
                t0 = time.perf_counter()
                api.offsite_pull(f"s3://{bucket}/{prefix}", out)
                api.restore(out, work / f"restored-{rep}")
                times["pull_restore"].append(time.perf_counter() - t0)
                plain = work / f"plain-{rep}"
                t0 = time.perf_counter()
                for p in chain.points:
                    for rel in (p.disks["vda"].image, p.domain_xml, p.checkpoint_xml):
                        (plain / rel).parent.mkdir(parents=True, exist_ok=True)
                        s3.download_file(bucket, f"{prefix}/{rel}", str(plain / rel), Config=plain_cfg)
                shutil.copy(bdir / "virtbackup.json", plain / "virtbackup.json")
                api.restore(plain, work / f"plain-restored-{rep}")
                times["plain_download_restore"].append(time.perf_counter() - t0)
                for d in (out, plain, work / f"restored-{rep}", work / f"plain-restored-{rep}"):
                    shutil.rmtree(d)
                empty_prefix(s3, bucket, f"{prefix}/")
                empty_prefix(s3, bucket, f"plain-{prefix}/")
            lab.remove_bucket(bucket)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mib = full_bytes / MiB
    figures = {
        "full_point_mib": round(mib, 1), "reps": a.reps,
        "push_s": round(med["push"], 3), "plain_upload_s": round(med["plain_upload"], 3),
        "push_mib_s": round(mib / med["push"], 1), "plain_upload_mib_s": round(mib / med["plain_upload"], 1),
        "push_throughput_ratio": round(med["plain_upload"] / med["push"], 2),
        "inc_point_bytes": inc_bytes, "inc_push_bytes_sent": statistics.median(inc_sent),
        "pull_restore_s": round(med["pull_restore"], 3),
        "plain_download_restore_s": round(med["plain_download_restore"], 3),
        "pull_restore_time_ratio": round(med["pull_restore"] / med["plain_download_restore"], 2),
        "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    if a.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"full point {mib:.0f} MiB, medians of {a.reps} interleaved runs, Ceph RGW on 127.0.0.1 (memstore)")
        print(f"  offsite push        {med['push']:7.2f} s  {figures['push_mib_s']:7.1f} MiB/s")
        print(f"  boto3 upload_file   {med['plain_upload']:7.2f} s  {figures['plain_upload_mib_s']:7.1f} MiB/s"
              f"   -> push throughput ratio {figures['push_throughput_ratio']} (target >= 0.8)")
        print(f"  incremental push sent {figures['inc_push_bytes_sent']} bytes; the inc point's files are "
              f"{inc_bytes} bytes")
        print(f"  offsite pull + restore            {med['pull_restore']:7.2f} s")
        print(f"  boto3 download_file + restore     {med['plain_download_restore']:7.2f} s"
              f"   -> time ratio {figures['pull_restore_time_ratio']} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
