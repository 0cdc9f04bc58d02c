#!/usr/bin/env python3
"""Seeded random soak against the real libvirtd: faults together, invariants after every step.

A few scratch domains (no OS), each backed up into its own directory on its own small tmpfs.
The soak keeps a model of what every disk holds (every guest write goes through it) and of what
every recorded point must restore to. Each step picks one action at random:

  guest writes (data, zeroes, overwrites; online through HMP qemu-io, offline through qemu-io),
  backups (auto/full/inc/diff, online or offline), prune, restore, verify, libvirt checkpoint
  metadata loss, domain stop/start, QEMU SIGKILL, virtbackup SIGKILL at a random moment (backup,
  prune or restore), ENOSPC on the target, a flipped byte in a random recorded image, and
  (opt-in, --libvirtd-restart: it disturbs everyone using this libvirtd) a libvirtd restart.

After every step, for the directories the step touched: every recorded point restores exactly
as the model says, or, if an image it reads was corrupted by the soak, restore refuses it
(exit 1) and verify fails; never a wrong image with exit 0. No checkpoint or bitmap of
virtbackup's is orphaned once a run has had the chance to clean up. Nothing outside the named
directories changed (sentinel files, an empty working directory, no stray entries).

  scripts/soak.py --steps 150 --seed 7        # prints every step; exit 1 on any violation
Reproduce a failure by rerunning with the seed it prints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from tests.support import scratch  # noqa: E402
from virtbackup import api  # noqa: E402
from virtbackup.errors import VirtBackupError  # noqa: E402
from virtbackup.store.chain import BackupDir, Chain  # noqa: E402
from virtbackup.virt import bitmaps, checkpoints, host  # noqa: E402
from virtbackup.virt.domain import eligible_disks  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10


@dataclass
class Dom:
    sd: scratch.ScratchDomain
    mnt: Path                     # its tmpfs
    bdir: Path                    # BACKUP_DIR on it
    expected: Dict[str, Dict[str, bytes]] = field(default_factory=dict)   # point id -> disk -> content
    corrupt: Dict[str, Tuple[int, int]] = field(default_factory=dict)     # image rel -> (offset, original byte)
    settled: bool = True          # a run since the last fault had the chance to clean up

    @property
    def name(self) -> str:
        return self.sd.name

    @property
    def dom(self) -> libvirt.virDomain:
        assert self.sd.dom is not None
        return self.sd.dom


@dataclass
class Stats:
    steps: int = 0
    actions: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    restored_compared: int = 0        # point restores compared byte for byte
    refused_as_expected: int = 0      # restores of corrupted points refused (exit 1)
    wrong_restores_exit0: int = 0
    false_refusals: int = 0
    orphans: int = 0
    writes_outside: int = 0
    violations: List[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(tempfile.mkdtemp(prefix=f"vbsoak-{args.seed}-", dir=args.workdir))
        self.cwd = self.work / "cwd"                 # the runs' working directory: must stay empty
        self.sentinel = self.work / "sentinel"       # files nobody may touch
        self.outs = self.work / "restore"            # restore output dirs (removed after each check)
        self.disks = self.work / "disks"
        self.conn = host.connect(args.uri)
        self.doms: List[Dom] = []
        self.stats = Stats()
        self.pattern = 0
        self.mounts: List[Path] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "VIRTBACKUP_LOCK_WAIT": "30",
                    "VIRTBACKUP_RUN_DIR": str(self.work / "run")}

    # -- setup / teardown ----------------------------------------------------------------------
    def setup(self) -> None:
        for d in (self.cwd, self.sentinel, self.outs, self.disks, self.work / "run"):
            d.mkdir(mode=0o700)
        for i in range(3):
            (self.sentinel / f"s{i}.qcow2").write_bytes(os.urandom(4096))
        self.sentinel_state = self._tree_state(self.sentinel)
        layouts = [{"vda": 16 * MiB, "vdb": 8 * MiB}, {"vda": 16 * MiB}][: self.args.domains]
        for i, disks in enumerate(layouts):
            name = f"vbsoak-{self.args.seed}-{secrets.token_hex(2)}-{i}"
            mnt = self.work / f"mnt{i}"
            mnt.mkdir(mode=0o700)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.tmpfs_mib}m,mode=0700",
                            "tmpfs", str(mnt)], check=True)
            self.mounts.append(mnt)
            sd = scratch.ScratchDomain(self.conn, name, self.disks, disks)
            sd.create(start=True)
            self.doms.append(Dom(sd, mnt, mnt / "bk"))
        self.allowed_top = {p.name for p in self.work.iterdir()}

    def teardown(self) -> None:
        conn = host.connect(self.args.uri)
        for d in self.doms:
            d.sd.conn = conn
            d.sd.remove()
        conn.close()
        for m in self.mounts:
            subprocess.run(["umount", "-l", str(m)], check=False)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{self.stats.steps:4d}] {msg}", flush=True)

    def violation(self, msg: str) -> None:
        self.stats.violations.append(f"step {self.stats.steps} (seed {self.args.seed}): {msg}")
        print(f"VIOLATION: {msg}", flush=True)

    def cli(self, *args: object) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "virtbackup.cli", *map(str, args)], cwd=self.cwd,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args: object, timeout: float = 300) -> Tuple[int, str, str]:
        p = self.cli(*args)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err

    def chain(self, d: Dom) -> Optional[Chain]:
        b = BackupDir(d.bdir)
        return b.load() if (d.bdir / "virtbackup.json").exists() else None

    def refresh_dom(self, d: Dom) -> None:
        d.sd.dom = self.conn.lookupByName(d.name)

    def running(self, d: Dom) -> bool:
        return bool(d.dom.isActive())

    # -- actions -------------------------------------------------------------------------------
    def act_write(self, d: Dom) -> None:
        disk = self.rng.choice(sorted(d.sd.disk_sizes))
        size = d.sd.disk_sizes[disk]
        length = self.rng.choice([64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB])
        offset = self.rng.randrange(0, (size - length) // (64 * KiB) + 1) * 64 * KiB
        kind = self.rng.choice(["data", "data", "zero", "overwrite"])
        if kind == "zero":
            pattern = 0
        else:
            self.pattern = self.pattern % 250 + 1
            pattern = self.pattern
        if kind == "overwrite":            # over what the last points hold
            offset = self.rng.randrange(0, 4) * MiB % (size - length)
        if self.running(d):
            d.sd.write(disk, pattern, offset, length)
        else:
            scratch.write_offline(d.sd, disk, pattern, offset, length)
        self.stats.actions[f"write-{kind}"] += 1
        self.log(f"{d.name}: write {kind} {pattern:#04x} {disk} @{offset} +{length}"
                 f" ({'online' if self.running(d) else 'offline'})")

    def act_backup(self, d: Dom, level: Optional[str] = None, kill_after: Optional[float] = None) -> None:
        level = level or self.rng.choice(["auto", "auto", "full", "inc", "diff"])
        before = self.chain(d)
        want = d.sd.expected()
        mode = "online" if self.running(d) else "offline"
        p = self.cli("backup", d.name, d.bdir, "--level", level, "--json")
        if kill_after is not None:
            time.sleep(kill_after)
            p.kill()
            p.communicate()
            self.stats.faults["virtbackup-sigkill-backup"] += 1
            d.settled = False
            self.log(f"{d.name}: backup --level {level} ({mode}) killed after {kill_after:.2f}s")
        else:
            out, err = p.communicate(timeout=300)
            self.stats.actions[f"backup-{level}-{mode}"] += 1
            self.log(f"{d.name}: backup --level {level} ({mode}) -> {p.returncode} {err.strip().splitlines()[-1:] }")
            if p.returncode == 0:
                d.settled = True
            elif p.returncode not in (1, 2):
                self.violation(f"backup exit {p.returncode}: {err.strip()}")
            external = any(m in err for m in ("socket is closed", "connection to libvirtd", "Cannot recv data",
                                                 "unable to connect", "End of file while reading"))
            if external:        # someone else restarted libvirtd meanwhile; the chain checks still apply
                self.stats.actions["external-libvirtd-restart"] += 1
            elif p.returncode != 0 and level in ("full", "auto"):
                self.violation(f"backup --level {level} failed without a fault: {err.strip()}")
        self.reconcile(d, before, want)

    def reconcile(self, d: Dom, before: Optional[Chain], want: Dict[str, bytes]) -> None:
        """Bring the model in line with what is recorded; anything unexplained is a violation."""
        after = self.chain(d)
        old = {p.id for p in before.points} if before else set()
        now = {p.id for p in after.points} if after else set()
        for pid in sorted(now - old):
            if pid in d.expected:
                self.violation(f"{d.name}: point {pid} recorded twice")
            p = after.point(pid)  # type: ignore[union-attr]
            d.expected[pid] = {disk: want[disk] for disk in p.disks}
        for pid in sorted(old - now):
            d.expected.pop(pid, None)
        for pid in list(d.expected):
            if pid not in now:
                d.expected.pop(pid)
        recorded = {img.image for p in (after.points if after else []) for img in p.disks.values()}
        for rel in list(d.corrupt):
            if rel not in recorded:
                d.corrupt.pop(rel)      # dropped by a prune: the damage went with it

    def act_prune(self, d: Dom, kill_after: Optional[float] = None) -> None:
        before = self.chain(d)
        if before is None or not before.points:
            return self.act_backup(d)
        keep = self.rng.randint(1, 4)
        p = self.cli("prune", d.bdir, "--keep", keep)
        if kill_after is not None:
            time.sleep(kill_after)
            p.kill()
            p.communicate()
            self.stats.faults["virtbackup-sigkill-prune"] += 1
            self.log(f"{d.name}: prune --keep {keep} killed after {kill_after:.2f}s")
        else:
            out, err = p.communicate(timeout=300)
            self.stats.actions["prune"] += 1
            self.log(f"{d.name}: prune --keep {keep} -> {p.returncode} {err.strip().splitlines()[-1:]}")
            if p.returncode == 1 and not d.corrupt and "space" not in err:
                self.violation(f"prune failed without damage: {err.strip()}")
            if p.returncode not in (0, 1):
                self.violation(f"prune exit {p.returncode}: {err.strip()}")
            if p.returncode != 0 and {x.id for x in before.points} != {x.id for x in self.chain(d).points}:  # type: ignore[union-attr]
                self.violation("a failed prune changed the recorded points")
        # prune never talks to libvirt (it works on a copied dir, on another host): a checkpoint
        # it made unneeded (e.g. --keep 1, the new base takes over the full's) is retired by the
        # next backup, so orphans are only counted once one has run
        d.settled = False
        self.reconcile(d, before, {})

    def act_restore_killed(self, d: Dom, kill_after: float) -> None:
        ch = self.chain(d)
        if ch is None or not ch.points:
            return self.act_backup(d)
        out = self.outs / f"killed-{d.name}"
        p = self.cli("restore", d.bdir, out)
        time.sleep(kill_after)
        p.kill()
        p.communicate()
        self.stats.faults["virtbackup-sigkill-restore"] += 1
        if p.returncode != -signal.SIGKILL:   # it had finished (or refused) before the kill
            shutil.rmtree(out, ignore_errors=True)
        # the rerun into the same directory cleans what the dead one left, then restores
        rc, _, err = self.run("restore", d.bdir, out)
        expect_fail = bool(self.damaged_points(d, ch, ch.points[-1].id))
        if (rc != 0) != expect_fail:
            self.violation(f"{d.name}: rerun of a killed restore -> {rc}: {err.strip()}")
        leftovers = [f.name for f in out.iterdir() if f.name.startswith(".")] if out.exists() else []
        if leftovers:
            self.violation(f"{d.name}: a killed restore's files survived the rerun: {leftovers}")
        shutil.rmtree(out, ignore_errors=True)
        self.log(f"{d.name}: restore killed after {kill_after:.2f}s, rerun -> {rc}")

    def act_verify(self, d: Dom) -> None:
        if self.chain(d) is None:
            return
        rc, _, err = self.run("verify", d.bdir)
        self.stats.actions["verify"] += 1
        damaged = any(self.damaged_points(d, self.chain(d), p.id) for p in self.chain(d).points)  # type: ignore[union-attr]
        if (rc == 1) != damaged or rc not in (0, 1):
            self.violation(f"{d.name}: verify -> {rc} with {'' if damaged else 'no '}injected damage: {err.strip()}")
        self.log(f"{d.name}: verify -> {rc}")

    def fault_metadata_loss(self, d: Dom) -> None:
        xml = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        d.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.conn.defineXML(xml)
        self.refresh_dom(d)
        d.settled = False           # bitmaps without checkpoints until the next run redefines them
        self.stats.faults["libvirt-metadata-loss"] += 1
        self.log(f"{d.name}: libvirt checkpoint metadata dropped")

    def fault_stop_start(self, d: Dom) -> None:
        if self.running(d):
            scratch.stop_cleanly(d.sd)
            self._wait(lambda: not d.dom.isActive(), "domain to stop")
            self.stats.actions["domain-stop"] += 1
            self.log(f"{d.name}: stopped")
        else:
            d.dom.create()
            self.stats.actions["domain-start"] += 1
            self.log(f"{d.name}: started")

    def fault_qemu_kill(self, d: Dom) -> None:
        if not self.running(d):
            return self.fault_stop_start(d)
        pid = int(Path(f"/run/libvirt/qemu/{d.name}.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        self._wait(lambda: not d.dom.isActive(), "QEMU to die")
        self.stats.faults["qemu-sigkill"] += 1
        if self.rng.random() < 0.7:
            d.dom.create()
        self.log(f"{d.name}: QEMU killed{', restarted' if self.running(d) else ''}")

    def fault_enospc(self, d: Dom) -> None:
        filler = d.mnt / "filler"
        st = os.statvfs(d.mnt)
        free = st.f_bavail * st.f_frsize
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if free > 256 * KiB:
                os.posix_fallocate(fd, 0, free - 256 * KiB)
        finally:
            os.close(fd)
        # enough dirty data that the next point does not fit
        disk = sorted(d.sd.disk_sizes)[0]
        self.pattern = self.pattern % 250 + 1
        if self.running(d):
            d.sd.write(disk, self.pattern, 4 * MiB, 2 * MiB)
        else:
            scratch.write_offline(d.sd, disk, self.pattern, 4 * MiB, 2 * MiB)
        self.stats.faults["enospc"] += 1
        self.log(f"{d.name}: target filled up (ENOSPC)")
        try:
            before = self.chain(d)
            want = d.sd.expected()
            rc, _, err = self.run("backup", d.name, d.bdir, "--level", "auto", "--json")
            self.log(f"{d.name}: backup on a full target -> {rc} {err.strip().splitlines()[-1:]}")
            if rc not in (0, 1):
                self.violation(f"backup on a full target exit {rc}: {err.strip()}")
            self.reconcile(d, before, want)
            before = self.chain(d)
            if before is not None and before.points and self.rng.random() < 0.5:
                rc, _, err = self.run("prune", d.bdir, "--keep", "1")
                self.log(f"{d.name}: prune on a full target -> {rc} {err.strip().splitlines()[-1:]}")
                self.reconcile(d, before, {})
        finally:
            filler.unlink()

    def fault_flip(self, d: Dom) -> None:
        ch = self.chain(d)
        if ch is None or not ch.points:
            return
        imgs = [img.image for p in ch.points for img in p.disks.values() if img.image not in d.corrupt]
        if not imgs:
            return
        rel = self.rng.choice(imgs)
        path = d.bdir / rel
        size = path.stat().st_size
        off = self.rng.randrange(0, size)
        with open(path, "r+b") as f:
            f.seek(off)
            orig = f.read(1)[0]
            f.seek(off)
            f.write(bytes([orig ^ (1 << self.rng.randrange(8))]))
        d.corrupt[rel] = (off, orig)
        self.stats.faults["flipped-byte"] += 1
        self.log(f"{d.name}: flipped a bit of {rel} at {off}")

    def heal(self, d: Dom) -> None:
        """Undo one injected corruption (as a user would after restoring the file from a copy)."""
        rel = self.rng.choice(sorted(d.corrupt))
        off, orig = d.corrupt.pop(rel)
        with open(d.bdir / rel, "r+b") as f:
            f.seek(off)
            f.write(bytes([orig]))
        self.log(f"{d.name}: healed {rel}")

    def _conn_alive(self) -> bool:
        try:
            return self.conn.isAlive() == 1 and bool(self.conn.getVersion())
        except libvirt.libvirtError:
            return False

    def reconnect(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                self.conn = host.connect(self.args.uri)
                break
            except (VirtBackupError, libvirt.libvirtError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for d in self.doms:
            d.sd.conn = self.conn
            self.refresh_dom(d)

    def fault_libvirtd_restart(self) -> None:
        pid = int(Path("/run/libvirtd.pid").read_text().strip())
        os.kill(pid, signal.SIGTERM)
        self._wait(lambda: not Path(f"/proc/{pid}").exists(), "libvirtd to exit")
        subprocess.run(["libvirtd", "-d"], check=True)
        self._wait(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                          capture_output=True).returncode == 0, "libvirtd")
        self.reconnect()
        self.stats.faults["libvirtd-restart"] += 1
        self.log("libvirtd restarted")

    def _wait(self, cond: Callable[[], object], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    # -- invariants ----------------------------------------------------------------------------
    def damaged_points(self, d: Dom, ch: Optional[Chain], pid: str) -> Set[str]:
        """Corrupted images the point reads."""
        if ch is None or not d.corrupt:
            return set()
        p = ch.point(pid)
        return {rel for disk in p.disks for rel in ch.image_chain(p, disk) if rel in d.corrupt}

    def check(self, d: Dom) -> None:
        ch = self.chain(d)
        if ch is None:
            return
        for p in ch.points:
            want = d.expected.get(p.id)
            if want is None:
                self.violation(f"{d.name}: point {p.id} is recorded but the model never saw it made")
                continue
            out = self.outs / f"{d.name}-{p.id}"
            bad = self.damaged_points(d, ch, p.id)
            try:
                api.restore(d.bdir, out, p.id)
                rc, msg = 0, ""
            except VirtBackupError as e:
                rc, msg = e.exit_code, str(e)
            if bad:
                if rc == 0:
                    self.stats.wrong_restores_exit0 += 1
                    self.violation(f"{d.name}: point {p.id} reads corrupted {sorted(bad)} but restored with exit 0")
                elif rc == 1 and any(b in msg for b in bad):
                    self.stats.refused_as_expected += 1
                else:
                    self.violation(f"{d.name}: point {p.id}: refusal does not name the damage: {rc} {msg}")
            elif rc != 0:
                self.stats.false_refusals += 1
                self.violation(f"{d.name}: point {p.id} should restore, got {rc}: {msg}")
            else:
                for disk, content in want.items():
                    got = scratch.read_raw(out / f"{disk}.qcow2")
                    diff = scratch.first_difference(got, content)
                    self.stats.restored_compared += 1
                    if diff is not None:
                        self.stats.wrong_restores_exit0 += 1
                        self.violation(f"{d.name}: point {p.id} disk {disk} restored wrong (first diff at {diff})")
            shutil.rmtree(out, ignore_errors=True)
        if d.settled:
            self.check_orphans(d, ch)

    def check_orphans(self, d: Dom, ch: Chain) -> None:
        prefix = ch.checkpoint_prefix()
        needed = set(ch.needed_checkpoints())
        ours = set(checkpoints.ours(d.dom, prefix))
        extra = ours - needed
        found = bitmaps.of_domain(d.dom, eligible_disks(d.dom))
        stray = {(disk, b.name) for disk, bms in found.items() for b in bms
                 if b.name.startswith(prefix) and b.name not in ours}
        if extra or stray:
            self.stats.orphans += len(extra) + len(stray)
            self.violation(f"{d.name}: orphaned checkpoints {sorted(extra)} / bitmaps {sorted(stray)}")

    def check_outside(self) -> None:
        problems = []
        if self._tree_state(self.sentinel) != self.sentinel_state:
            problems.append("sentinel files changed")
        if list(self.cwd.iterdir()):
            problems.append(f"files in the working directory: {[p.name for p in self.cwd.iterdir()]}")
        top = {p.name for p in self.work.iterdir()}
        if top - self.allowed_top:
            problems.append(f"stray entries in the work dir: {sorted(top - self.allowed_top)}")
        for d in self.doms:
            stray = {p.name for p in d.mnt.iterdir()} - {"bk"}
            if stray:
                problems.append(f"stray entries beside {d.bdir}: {sorted(stray)}")
        if list(self.outs.iterdir()):
            problems.append(f"restore leftovers: {[p.name for p in self.outs.iterdir()]}")
        for p in problems:
            self.stats.writes_outside += 1
            self.violation(p)

    @staticmethod
    def _tree_state(path: Path) -> Dict[str, Tuple[str, int]]:
        return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(path.rglob("*")) if p.is_file()}

    # -- main loop -----------------------------------------------------------------------------
    def step(self) -> None:
        d = self.rng.choice(self.doms)
        kinds = [("write", 30), ("backup", 25), ("prune", 7), ("verify", 4), ("restore-kill", 3),
                 ("backup-kill", 5), ("prune-kill", 3), ("metadata-loss", 3), ("stop-start", 5),
                 ("qemu-kill", 3), ("enospc", 3), ("flip", 4)]
        if self.args.libvirtd_restart:
            kinds.append(("libvirtd-restart", 2))
        kind = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        if d.corrupt and self.rng.random() < 0.3:
            self.heal(d)
        if kind == "write":
            for _ in range(self.rng.randint(1, 3)):
                self.act_write(d)
        elif kind == "backup":
            self.act_backup(d)
        elif kind == "backup-kill":
            self.act_backup(d, kill_after=self.rng.uniform(0.0, 1.2))
        elif kind == "prune":
            self.act_prune(d)
        elif kind == "prune-kill":
            self.act_prune(d, kill_after=self.rng.uniform(0.0, 0.8))
        elif kind == "verify":
            self.act_verify(d)
        elif kind == "restore-kill":
            self.act_restore_killed(d, self.rng.uniform(0.0, 0.8))
        elif kind == "metadata-loss":
            self.fault_metadata_loss(d)
        elif kind == "stop-start":
            self.fault_stop_start(d)
        elif kind == "qemu-kill":
            self.fault_qemu_kill(d)
        elif kind == "enospc":
            self.fault_enospc(d)
        elif kind == "flip":
            self.fault_flip(d)
        elif kind == "libvirtd-restart":
            self.fault_libvirtd_restart()
        touched = self.doms if kind == "libvirtd-restart" else [d]
        for t in touched:
            self.check(t)
        self.check_outside()

    def main(self) -> int:
        self.setup()
        try:
            for d in self.doms:                 # every directory starts with a point
                self.act_write(d)
                self.act_backup(d, "full")
            for _ in range(self.args.steps):
                self.stats.steps += 1
                try:
                    self.step()
                except libvirt.libvirtError as e:
                    # Another user of this libvirtd restarted it under us (the soak's own
                    # restarts reconnect themselves): reconnect, then check everything.
                    if self._conn_alive():
                        raise
                    self.log(f"libvirtd connection lost ({e}); reconnecting")
                    self.stats.actions["external-libvirtd-restart"] += 1
                    self.reconnect()
                    for d in self.doms:
                        d.settled = False
                        self.check(d)
                if self.stats.violations and self.args.stop_on_violation:
                    break
            for d in self.doms:                 # end: heal, one clean backup, everything checked
                while d.corrupt:
                    self.heal(d)
                if not self.running(d):
                    d.dom.create()
                self.act_backup(d, "auto")
                self.check(d)
                self.act_verify(d)
            self.check_outside()
        finally:
            self.teardown()
        self.report()
        return 1 if self.stats.violations else 0

    def report(self) -> None:
        s = self.stats
        summary = {"seed": self.args.seed, "steps": s.steps, "faults": dict(sorted(s.faults.items())),
                   "actions": dict(sorted(s.actions.items())),
                   "points_restored_and_compared": s.restored_compared,
                   "damaged_points_refused": s.refused_as_expected,
                   "wrong_restores_exit0": s.wrong_restores_exit0, "false_refusals": s.false_refusals,
                   "orphans": s.orphans, "writes_outside": s.writes_outside, "violations": s.violations}
        if self.args.json:
            print(json.dumps(summary))
            return
        print(f"soak seed {self.args.seed}: {s.steps} steps")
        print(f"  faults: {', '.join(f'{k} {v}' for k, v in sorted(s.faults.items())) or 'none'}")
        print(f"  actions: {', '.join(f'{k} {v}' for k, v in sorted(s.actions.items()))}")
        print(f"  disk restores compared byte for byte: {s.restored_compared}; damaged points refused: "
              f"{s.refused_as_expected}")
        print(f"  wrong restores with exit 0: {s.wrong_restores_exit0}; false refusals: {s.false_refusals}; "
              f"orphans: {s.orphans}; writes outside: {s.writes_outside}")
        print(f"  violations: {len(s.violations)}")
        for v in s.violations:
            print(f"    {v}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--domains", type=int, default=2, choices=(1, 2))
    ap.add_argument("--uri", default=None)
    ap.add_argument("--workdir", default=None, help="where the soak's files go (default: $TMPDIR)")
    ap.add_argument("--tmpfs-mib", type=int, default=256, help="size of each backup dir's tmpfs")
    ap.add_argument("--libvirtd-restart", action="store_true",
                    help="also restart libvirtd as a fault (disturbs everything else using it)")
    ap.add_argument("--stop-on-violation", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (domains are always removed)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    print(f"soak: seed {args.seed}, {args.steps} steps (rerun with --seed {args.seed} to reproduce)",
          file=sys.stderr, flush=True)
    return Soak(args).main()


if __name__ == "__main__":
    sys.exit(main())
