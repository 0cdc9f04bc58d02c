#!/usr/bin/env python3
"""The demo's guest mode (`scripts/demo.sh --guest`): a real tiny Linux guest (tests/support/guest.py,
TCG), a file it has only in its page cache, a quiesced and a crash-consistent backup, what each
restored point holds, `list` with its consistency column, and a restore drill that boots a point.
Everything is removed at the end.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import guest  # noqa: E402
from virtbackup import api  # noqa: E402
from virtbackup.errors import VirtBackupError  # noqa: E402
from virtbackup.virt import host  # noqa: E402


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def main() -> int:
    conn = host.connect()
    work = Path(tempfile.mkdtemp(prefix="virtbackup-demo-guest-"))
    g = guest.Guest(conn, work / "guest", name=f"virtbackup-demo-guest-{secrets.token_hex(3)}")
    bdir = work / "backups"
    try:
        say(f"booting {g.name}: Debian kernel + busybox + qemu-guest-agent, TCG (first run builds the files)")
        g.create(agent_timeout=900)
        say(f"guest agent answered {g.agent_seconds:.1f}s after start")
        for name in ("one.txt", "two.txt"):
            rc, _o, err = g.exec(f"echo 'hello from {name}' > /data/{name}")   # no sync: page cache only
            if rc != 0:
                say(f"FAILED: writing /data/{name} in the guest: {err}")
                return 1
            say(f"guest wrote /data/{name} without sync (only in its page cache)")
            mode = "require" if name == "one.txt" else "off"
            r = api.backup(g.name, bdir, quiesce=mode, notify=lambda m: say(m))
            p = r.point
            frozen = f", frozen {p.frozen_seconds:.2f}s" if p.frozen_seconds is not None else ""
            say(f"backup --quiesce={mode}: point {p.id} is {p.consistency}-consistent ({p.consistency_reason}{frozen})")
            res = api.restore(bdir, work / f"restore-{p.id}", p.id)
            content = guest.read_file(res.images["vda"], f"/data/{name}")
            say(f"restored point {p.id}: /data/{name} is "
                + (f"there: {content.decode().strip()!r}" if content else "not there (it was still in the page cache)"))
        subprocess.run([sys.executable, "-m", "virtbackup.cli", "list", str(bdir)], cwd=ROOT, check=False)
        say("restore drill: booting point 0001 as a throwaway domain")
        d = api.drill(bdir, "0001", timeout=900, check="test -f /data/one.txt", notify=lambda m: say(m))
        if not d.ok:
            say(f"FAILED: drill failed at {d.stage}: {d.message}")
            return 1
        say(f"drill passed: running after {d.start_seconds:.2f}s, agent answered after {d.agent_seconds:.2f}s, "
            f"check exited {d.check_exit}")
        return 0
    except VirtBackupError as e:
        print(f"virtbackup: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        g.remove()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
        say(f"removed {g.name} and {work}")


if __name__ == "__main__":
    sys.exit(main())
