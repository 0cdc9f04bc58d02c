"""The README demo: a throwaway domain with no OS, a full, an incremental and a differential,
every point restored and compared byte for byte with what the guest saw, then everything removed.

Run: `scripts/demo.sh` (sets up the host first), or `.venv/bin/python scripts/demo.py`. The
scratch-domain code is test support (tests/support/scratch.py, not in the wheel): imported from
this repository.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo: tests.support

from tests.support import scratch  # noqa: E402
from virtbackup import api
from virtbackup.errors import VirtBackupError  # noqa: E402
from virtbackup.virt import host  # noqa: E402

MiB = 1 << 20


def main() -> int:
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="virtbackup-demo-"))
    dom = scratch.ScratchDomain(conn, f"virtbackup-demo-{secrets.token_hex(3)}", work / "disks",
                                {"vda": 128 * MiB, "vdb": 64 * MiB})
    bdir = work / "backups"
    expected: Dict[str, Dict[str, bytes]] = {}
    say = lambda msg: print(f"demo: {msg}", flush=True)  # noqa: E731
    try:
        dom.create()
        say(f"created domain {dom.name} (no OS) with disks vda 128 MiB, vdb 64 MiB in {work}")
        dom.write("vda", 0x11, 0, 8 * MiB)
        dom.write("vdb", 0x22, 16 * MiB, 4 * MiB)
        say("wrote 8 MiB of 0x11 to vda and 4 MiB of 0x22 to vdb through QEMU (HMP qemu-io)")
        for level, writes in (("full", []),
                              ("inc", [("vda", 0x33, 4 * MiB, 2 * MiB), ("vdb", 0, 16 * MiB, 1 * MiB)]),
                              ("diff", [("vda", 0x44, 100 * MiB, 1 * MiB)])):
            for disk, pat, off, length in writes:
                dom.write(disk, pat, off, length)
                what = "zeroed" if pat == 0 else f"wrote {pat:#04x} to"
                say(f"{what} {disk} at {off // MiB} MiB, {length // MiB} MiB")
            r = api.backup(dom.name, bdir, level, notify=lambda m: say(m))
            size = sum(i.size for i in r.point.disks.values())
            say(f"backup {r.point.id}: {r.point.level}, {size / MiB:.1f} MiB written, "
                f"{r.point.duration:.2f}s, checkpoint {r.point.checkpoint}")
            expected[r.point.id] = dom.expected()
        for pid, exp in expected.items():
            res = api.restore(bdir, work / f"restore-{pid}", pid)
            for disk, path in sorted(res.images.items()):
                diff = scratch.first_difference(scratch.read_raw(path), exp[disk])
                if diff is not None:
                    say(f"FAILED: point {pid} disk {disk} differs at byte {diff}")
                    return 1
            say(f"restored point {pid} ({res.point.level}): {', '.join(sorted(res.images))} "
                "identical to what the guest saw at that point")
        v = api.verify(bdir)
        say(f"verify: {'ok' if v.ok else 'DAMAGED'}, {v.images_checked} images")
        for p in api.list_points(bdir).points:
            print(f"  {p.id}  {p.level:<4}  {p.created}  parent={p.parent or '-'}  disks={','.join(sorted(p.disks))}")
        say("all points restore bit-exact")
        return 0 if v.ok else 1
    except VirtBackupError as e:
        print(f"virtbackup: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        dom.remove()
        shutil.rmtree(work, ignore_errors=True)
        say(f"removed domain {dom.name} and {work}")


if __name__ == "__main__":
    sys.exit(main())
