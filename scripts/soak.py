#!/usr/bin/env python3
"""Seeded random soak against the real libvirtd: faults together, invariants after every step.

A few scratch domains (no OS, a guest agent channel nobody answers), each backed up into its own
directory on its own small tmpfs; the third one's chain is encrypted (`--encrypt --key-file K`
on its first backup, the key on every later command). The soak keeps a model of what every disk
holds (every guest write goes through it) and of what every recorded point must restore to.
Each step picks one action at random:

  guest writes (data, zeroes, overwrites; online through HMP qemu-io, offline through qemu-io),
  backups (auto/full/inc/diff; push, pull or offline), prune, restore (CLI, sometimes -v),
  verify, `run JOBFILE` over the unencrypted domains (each dir bind-mounted as
  backup_root/<name>), restore drills (`verify --boot`: they fail, there is no OS), libvirt
  checkpoint metadata loss, domain stop/start, QEMU SIGKILL, virtbackup SIGKILL at a random moment
  (backup push/pull/offline, prune, restore, encrypted or not; `run` with its children; a drill),
  ENOSPC on the target, a flipped byte in a random recorded image, hand edits (a point's
  domain.xml or checkpoint.xml, virtbackup.json fields: an image outside, images or parents
  swapped, a digest; a qcow2 header's backing name swapped), which every reader must refuse and
  which are then healed, and (opt-in, --libvirtd-restart: it disturbs everyone using this
  libvirtd) a libvirtd restart.

After every step: every recorded point of the touched directories restores exactly as the model
says, or, if an image it reads was corrupted by the soak, restore refuses it (exit 1) and verify
fails; never a wrong image with exit 0. No checkpoint or bitmap of virtbackup's is orphaned once a
run has had the chance to clean up. Nothing outside the named directories changed (sentinel
files, an empty working directory, no stray entries, no program named by a backup ever run). No
byte of the key in any output of any command (stdout, stderr, also under -v), run log or file
of the backup dirs. No guest left paused (nor a freeze marker once a later backup ran). No key
file (/dev/shm/virtbackup-key-*), libvirt secret, drill domain or drill temp dir of a killed run
left once a later run that promises to clean it up has run.

  scripts/soak.py --steps 150 --seed 7        # prints every step; exit 1 on any violation
Reproduce a failure by rerunning with the seed it prints.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
from lxml import etree  # noqa: E402

from tests.support import scratch  # noqa: E402
from virtbackup import api  # noqa: E402
from virtbackup.env import process_start  # noqa: E402
from virtbackup.errors import VirtBackupError  # noqa: E402
from virtbackup.qemu.keys import Key  # noqa: E402
from virtbackup.store.chain import BackupDir, Chain  # noqa: E402
from virtbackup.virt import bitmaps, checkpoints, host  # noqa: E402
from virtbackup.virt.domain import eligible_disks  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
AGENT_CHANNEL = "org.qemu.guest_agent.0"
KEY_DIR_PREFIX = "virtbackup-key-"            # /dev/shm/virtbackup-key-<pid>-<start>-<random>
DRILL_DIR_PREFIX = "virtbackup-drill-"        # $TMPDIR/virtbackup-drill-<pid>-<start>-<random>
_OWNED_DIR = re.compile(r"^(\d+)-(\d+)-")
_SECRET_DESC = re.compile(r"^virtbackup ephemeral key pid=(\d+) start=(\d+):")
Ident = Tuple[int, str]                       # (pid, start time): one process, even after pid reuse

# The invariants, each counted (violations) in the summary.
INVARIANTS = ("wrong_restores_exit0", "false_refusals", "tampering_accepted", "writes_outside",
              "key_bytes_in_output", "guests_left_paused_or_frozen", "key_files_left", "secrets_left",
              "drill_leftovers", "processes_left", "orphans", "unexpected_exit")


@dataclass
class Dom:
    sd: scratch.ScratchDomain
    mnt: Path                     # its tmpfs
    bdir: Path                    # BACKUP_DIR on it
    encrypted: bool = False       # its chain is LUKS-encrypted; every command gets the key
    jobdir: Optional[Path] = None  # the same directory as backup_root/<name> of the job (bind mount)
    expected: Dict[str, Dict[str, bytes]] = field(default_factory=dict)   # point id -> disk -> content
    corrupt: Dict[str, Tuple[int, int]] = field(default_factory=dict)     # image rel -> (offset, original byte)
    settled: bool = True          # a run since the last fault had the chance to clean up
    thawed: bool = True           # a backup ended normally since the last kill (no freeze marker may stay)

    @property
    def name(self) -> str:
        return self.sd.name

    @property
    def dom(self) -> libvirt.virDomain:
        assert self.sd.dom is not None
        return self.sd.dom


@dataclass
class Proc:
    p: subprocess.Popen
    argv: List[str]
    ident: Ident


@dataclass
class Stats:
    steps: int = 0
    actions: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)      # invariant -> times checked
    invariants: Counter = field(default_factory=Counter)  # invariant -> violations
    restored_compared: int = 0        # point restores compared byte for byte
    refused_as_expected: int = 0      # restores of corrupted points refused (exit 1)
    edits_refused: int = 0            # commands that refused a hand-edited backup dir
    edits_unnoticed: Counter = field(default_factory=Counter)   # accepted edits of informational fields
    # what killed runs left (key dir, secret, drill dir): seen before a cleaning run, and removed since
    leftovers_seen: Counter = field(default_factory=Counter)
    leftovers_cleaned: Counter = field(default_factory=Counter)
    key_dirs_outliving_a_backup: List[str] = field(default_factory=list)   # see check_leftovers
    outputs_scanned: int = 0          # command outputs and files searched for the key
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
        self.tmp = self.work / "tmp"                 # the runs' TMPDIR (drill overlays go there)
        self.jobroot = self.work / "jobroot"         # backup_root of the job: bind mounts of the dirs
        self.jobfile = self.work / "soak.toml"
        self.metrics = self.work / "metrics"
        self.evil = self.work / "evil"               # a program a hand-edited domain.xml names
        self.keyfile = self.work / "key"
        self.conn = host.connect(args.uri)
        self.key: Optional[Key] = None
        self.doms: List[Dom] = []
        self.stats = Stats()
        self.pattern = 0
        self.mounts: List[Path] = []
        self.passphrase = f"soak-{secrets.token_hex(20)}"
        pb = self.passphrase.encode()
        # the key as it could leak: raw, hex, base64 (both alphabets), a repr of its bytes
        self.key_forms = sorted({pb, pb.hex().encode(), base64.b64encode(pb).rstrip(b"="),
                                 base64.urlsafe_b64encode(pb).rstrip(b"="), repr(pb).encode()})
        self.started: Set[Ident] = set()                 # every virtbackup process the soak started
        self.killed: Dict[Ident, Counter] = {}           # SIGKILLed ones -> the cleaners' counts then
        self.cleaners: Counter = Counter()               # runs done that promise to clean up after killed ones
        self.reported: Set[str] = set()                  # leftovers already reported (once each)
        self.pending: Dict[str, Set[Ident]] = {"keyfile": set(), "secret": set(), "drill": set()}
        self.outlived: Set[str] = set()
        self.defined_by_us: Set[str] = set()             # names of domains a (refused?) --define might make
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "VIRTBACKUP_LOCK_WAIT": "30",
                    "VIRTBACKUP_RUN_DIR": str(self.work / "run"), "TMPDIR": str(self.tmp),
                    "VIRTBACKUP_ENCRYPT_ITER_TIME": "10"}
        self.env.pop("VIRTBACKUP_DEBUG", None)

    # -- setup / teardown ----------------------------------------------------------------------
    def setup(self) -> None:
        for path in (self.cwd, self.sentinel, self.outs, self.disks, self.work / "run", self.tmp, self.jobroot,
                     self.metrics, self.evil):
            path.mkdir(mode=0o700)
        for i in range(3):
            (self.sentinel / f"s{i}.qcow2").write_bytes(os.urandom(4096))
        emu = self.evil / "emu.sh"
        emu.write_text(f"#!/bin/sh\ntouch {self.evil / 'RAN'}\nexec qemu-system-x86_64 \"$@\"\n")
        emu.chmod(0o700)
        fd = os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, self.passphrase.encode())
        finally:
            os.close(fd)
        self.key = api.read_key(str(self.keyfile))
        self.sentinel_state = self._tree_state(self.sentinel)
        layouts: List[Tuple[Dict[str, int], bool]] = [({"vda": 16 * MiB, "vdb": 8 * MiB}, False),
                                                      ({"vda": 16 * MiB}, False), ({"vda": 16 * MiB}, True)]
        for i, (disks, encrypted) in enumerate(layouts[: self.args.domains]):
            name = f"vbsoak-{self.args.seed}-{secrets.token_hex(2)}-{i}"
            mnt = self.work / f"mnt{i}"
            mnt.mkdir(mode=0o700)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.tmpfs_mib}m,mode=0700",
                            "tmpfs", str(mnt)], check=True)
            self.mounts.append(mnt)
            bdir = mnt / "bk"
            bdir.mkdir(mode=0o700)
            jobdir = None
            if not encrypted:       # the job has no key: it backs up the unencrypted domains
                jobdir = self.jobroot / name
                jobdir.mkdir(mode=0o700)
                subprocess.run(["mount", "--bind", str(bdir), str(jobdir)], check=True)
                self.mounts.append(jobdir)
            sd = scratch.ScratchDomain(self.conn, name, self.disks, disks)
            d = Dom(sd, mnt, bdir, encrypted, jobdir)
            self.doms.append(d)
            sd.create(start=False)
            self.add_agent_channel(d)
            d.dom.create()
        plain = [d.name for d in self.doms if not d.encrypted]
        self.jobfile.write_text(
            f'backup_root = "{self.jobroot}"\ndomains = {json.dumps(plain)}\nlevel = "auto"\nparallel = 2\n'
            f'metrics_file = "{self.metrics / "soak.prom"}"\n[retention]\nkeep = 4\n')
        self.allowed_top = {p.name for p in self.work.iterdir()}

    def add_agent_channel(self, d: Dom) -> None:
        """A guest agent channel (nobody answers: there is no OS), so that drills are possible and
        `--quiesce auto` meets an agent that is not connected."""
        root = etree.fromstring(d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        devices = root.find("devices")
        assert devices is not None
        ch = etree.SubElement(devices, "channel", type="unix")
        etree.SubElement(ch, "target", type="virtio", name=AGENT_CHANNEL)
        self.conn.defineXML(etree.tostring(root, encoding="unicode"))
        self.refresh_dom(d)

    def teardown(self) -> None:
        conn = host.connect(self.args.uri)
        for d in self.doms:
            d.sd.conn = conn
            d.sd.remove()
        for name in sorted(self.defined_by_us):
            scratch.remove_domain(conn, name)
        self._remove_foreign_domains(conn)
        self._remove_our_secrets(conn)
        conn.close()
        self._kill_stragglers()
        self._end(self._stray_processes())      # helpers that outlived a killed run (reported already)
        for m in reversed(self.mounts):         # the bind mounts first, then the tmpfs under them
            subprocess.run(["umount", "-l", str(m)], check=False)
        for ident in self.started:              # key dirs of killed runs nobody cleaned (they hold the key)
            for p in self._owned_dirs(Path("/dev/shm"), KEY_DIR_PREFIX).get(ident, []):
                shutil.rmtree(p, ignore_errors=True)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def _remove_foreign_domains(self, conn: libvirt.virConnect) -> List[str]:
        """Domains not of the soak whose XML names a file of ours (a drill's throwaway domain, a
        --define that should have been refused): destroyed; returns their names."""
        ours = {d.name for d in self.doms}
        found = []
        for dom in conn.listAllDomains(0):
            try:
                name = dom.name()
                if name in ours or str(self.work) not in dom.XMLDesc(0):
                    continue
                found.append(name)
                scratch.remove_domain(conn, name)
            except libvirt.libvirtError:
                continue
        return found

    def _remove_our_secrets(self, conn: libvirt.virConnect) -> None:
        for sec in conn.listAllSecrets(0):
            try:
                m = _SECRET_DESC.match(self._secret_desc(sec) or "")
                if m and (int(m.group(1)), m.group(2)) in self.started:
                    sec.undefine()
            except libvirt.libvirtError:
                continue

    def _kill_stragglers(self) -> None:
        """A child of a killed `run` that never ended (reported already): ended by its pid."""
        for pid, start in self.started:
            if process_start(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- helpers -------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{self.stats.steps:4d}] {msg}", flush=True)

    def violation(self, msg: str, invariant: str = "unexpected_exit") -> None:
        self.stats.invariants[invariant] += 1
        self.stats.violations.append(f"step {self.stats.steps} (seed {self.args.seed}) [{invariant}]: {msg}")
        print(f"VIOLATION [{invariant}]: {msg}", flush=True)

    def key_args(self, d: Dom, new_chain: bool = False) -> List[str]:
        if not d.encrypted:
            return []
        return [*(["--encrypt"] if new_chain else []), "--key-file", str(self.keyfile)]

    def cli(self, *args: object, verbose: bool = False) -> Proc:
        argv = [sys.executable, "-m", "virtbackup.cli", *(["-v"] if verbose else []), *map(str, args)]
        p = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, errors="replace")
        ident = (p.pid, process_start(p.pid) or "?")
        self.started.add(ident)
        return Proc(p, argv, ident)

    def finish(self, pr: Proc, timeout: float = 300) -> Tuple[int, str, str]:
        out, err = pr.p.communicate(timeout=timeout)
        self.stats.checks["unexpected_exit"] += 1
        self.scan(pr, out, err)
        return pr.p.returncode, out, err

    def kill(self, pr: Proc) -> None:
        """SIGKILL a run; what it printed is still searched for the key. A helper it started
        that outlives it keeps its output pipes open: reported, then ended by its pid."""
        pr.p.kill()
        pr.p.wait()
        self.killed[pr.ident] = Counter(self.cleaners)
        try:
            out, err = pr.p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            stray = self._stray_processes()
            self.violation(f"`{' '.join(pr.argv[3:])}` was SIGKILLed, and 20 s later processes it started still "
                           f"run, holding its output pipes: {stray}", "processes_left")
            self._end(stray)
            out, err = pr.p.communicate(timeout=60)
        self.scan(pr, out, err)

    def _stray_processes(self) -> List[Tuple[int, str, str]]:
        """Processes naming a file of the soak's, other than the soak and its domains' QEMUs:
        (pid, start, command line). None may run between steps."""
        guests = [f"guest={d.name}," for d in self.doms]
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.work) in cmd and not any(g in cmd for g in guests):
                start = process_start(int(entry))
                if start is not None:
                    found.append((int(entry), start, cmd[:300]))
        return found

    def _end(self, procs: Sequence[Tuple[int, str, str]]) -> None:
        for pid, start, _cmd in procs:
            if process_start(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def check_processes(self) -> None:
        """Nothing a run started outlives it (a killed run's helpers end with it): 10 s of grace."""
        self.stats.checks["processes_left"] += 1
        deadline = time.monotonic() + 10
        stray = self._stray_processes()
        while stray and time.monotonic() < deadline:
            time.sleep(0.2)
            stray = self._stray_processes()
        if stray:
            self.violation(f"processes outlived the run that started them: {stray}", "processes_left")
            self._end(stray)

    def run(self, *args: object, timeout: float = 300, verbose: bool = False) -> Tuple[int, str, str]:
        return self.finish(self.cli(*args, verbose=verbose), timeout)

    def scan(self, pr: Proc, out: str, err: str) -> None:
        """No key byte in any output; no crash (a traceback or an 'internal error') either."""
        cmd = " ".join(pr.argv[3:])
        self.stats.outputs_scanned += 1
        self.stats.checks["key_bytes_in_output"] += 1
        text = (out + "\n" + err).encode(errors="replace")
        for form in self.key_forms:
            if form in text:
                self.violation(f"the key ({form[:8]!r}...) in the output of `{cmd}`", "key_bytes_in_output")
        if re.search(r"^virtbackup: error: internal error|^Traceback \(most recent call last\)", err, re.M):
            self.violation(f"`{cmd}` crashed: {err.strip()[-600:]}")

    def scan_files(self, where: Path) -> None:
        """No key byte in any file under `where` (run logs, metadata, images, markers)."""
        for p in sorted(where.rglob("*")) if where.exists() else []:
            if not p.is_file() or p.is_symlink():
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            self.stats.outputs_scanned += 1
            for form in self.key_forms:
                if form in data:
                    self.violation(f"the key ({form[:8]!r}...) in {p}", "key_bytes_in_output")

    @staticmethod
    def last(err: str) -> List[str]:
        return err.strip().splitlines()[-1:]

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

    def act_backup(self, d: Dom, level: Optional[str] = None, kill_after: Optional[float] = None,
                   mode: Optional[str] = None, kill_at_key: bool = False) -> None:
        level = level or self.rng.choice(["auto", "auto", "full", "inc", "diff"])
        before = self.chain(d)
        want = d.sd.expected()
        online = self.running(d)
        mode = mode or ("pull" if self.rng.random() < 0.35 else "push")
        transport = mode if online else "offline"
        enc = "-encrypted" if d.encrypted else ""
        args: List[object] = ["backup", d.name, d.bdir, "--level", level, "--json",
                              "--mode", mode,
                              *self.key_args(d, new_chain=before is None or not before.points)]
        pr = self.cli(*args, verbose=d.encrypted and self.rng.random() < 0.4)
        what = f"backup --level {level} ({transport}{', encrypted' if d.encrypted else ''})"
        if kill_at_key:
            # the moment the key exists outside the process (its key file, its libvirt secret): a
            # random moment rarely hits those few milliseconds
            kill_after = self._wait_for_key(pr)
            if kill_after is None:
                self.stats.actions["key-window-missed"] += 1
        if kill_after is not None:
            if not kill_at_key:         # (at the key: killed the moment it was seen)
                time.sleep(kill_after)
            self.kill(pr)
            self.stats.faults[f"virtbackup-sigkill-backup-{transport}{enc}{'-at-key' if kill_at_key else ''}"] += 1
            d.settled = False
            d.thawed = False
            at = " (its key had appeared)" if kill_at_key else ""
            self.log(f"{d.name}: {what} killed after {kill_after:.2f}s{at}")
        else:
            rc, out, err = self.finish(pr)
            self.stats.actions[f"backup-{level}-{transport}{enc}"] += 1
            self.log(f"{d.name}: {what} -> {rc} {self.last(err)}")
            if rc == 0:
                d.settled = True
                d.thawed = True
                if d.encrypted:
                    self._count_cleaner(transport, out)
            elif rc not in (1, 2):
                self.violation(f"backup exit {rc}: {err.strip()}")
            external = any(m in err for m in ("socket is closed", "connection to libvirtd", "Cannot recv data",
                                                 "unable to connect", "End of file while reading"))
            if external:        # someone else restarted libvirtd meanwhile; the chain checks still apply
                self.stats.actions["external-libvirtd-restart"] += 1
            elif rc != 0 and level in ("full", "auto"):
                self.violation(f"{what} failed without a fault: {err.strip()}")
        self.reconcile(d, before, want)

    def _count_cleaner(self, transport: str, out: str) -> None:
        """What an encrypted backup that ended well cleans up after killed runs, by what the code
        promises: a push defines a libvirt secret (and first removes those of dead runs); a
        private QEMU (offline) or a pull incremental's qemu-nbd target gets a key file (and the
        key dirs of dead runs go first). A pull full writes through qemu-img with a pipe: no key
        file, no cleaning. Every one counts as "a later run" for the strict reading of D7."""
        self.cleaners["any-encrypted-backup"] += 1
        try:
            result = json.loads(out.strip().splitlines()[-1])
            level = (result.get("point") or {}).get("level")
            moved = sum(int(v) for t in (result.get("transfer") or {}).values() for k, v in t.items()
                        if k in ("read", "written", "zeroed"))
        except (ValueError, IndexError, AttributeError, TypeError):
            level, moved = None, 0
        if transport == "push":
            self.cleaners["secret"] += 1
        elif transport == "offline" or (level in ("inc", "diff") and moved > 0):
            # (a pull incremental with nothing dirty opens no target: no key file either)
            self.cleaners["keyfile"] += 1

    def _wait_for_key(self, pr: Proc, timeout: float = 120) -> Optional[float]:
        """Seconds until the run's key dir or libvirt secret appeared (None: it ended first)."""
        t0 = time.monotonic()
        mine = f"{KEY_DIR_PREFIX}{pr.p.pid}-"
        n = 0
        while pr.p.poll() is None and time.monotonic() - t0 < timeout:
            if any(e.startswith(mine) for e in os.listdir("/dev/shm")):
                return time.monotonic() - t0
            n += 1
            if n % 20 == 0:
                for sec in self.conn.listAllSecrets(0):
                    m = _SECRET_DESC.match(self._secret_desc(sec) or "")
                    if m and int(m.group(1)) == pr.p.pid:
                        return time.monotonic() - t0
            time.sleep(0.0005)
        return None

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
        enc = "-encrypted" if d.encrypted else ""
        pr = self.cli("prune", d.bdir, "--keep", keep, *self.key_args(d),
                      verbose=d.encrypted and self.rng.random() < 0.4)
        if kill_after is not None:
            time.sleep(kill_after)
            self.kill(pr)
            self.stats.faults[f"virtbackup-sigkill-prune{enc}"] += 1
            self.log(f"{d.name}: prune --keep {keep} killed after {kill_after:.2f}s")
        else:
            rc, out, err = self.finish(pr)
            self.stats.actions[f"prune{enc}"] += 1
            self.log(f"{d.name}: prune --keep {keep} -> {rc} {self.last(err)}")
            if rc == 1 and not d.corrupt and "space" not in err:
                self.violation(f"prune failed without damage: {err.strip()}")
            if rc not in (0, 1):
                self.violation(f"prune exit {rc}: {err.strip()}")
            if rc != 0 and {x.id for x in before.points} != {x.id for x in self.chain(d).points}:  # type: ignore[union-attr]
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
        pr = self.cli("restore", d.bdir, out, *self.key_args(d))
        time.sleep(kill_after)
        self.kill(pr)
        self.stats.faults[f"virtbackup-sigkill-restore{'-encrypted' if d.encrypted else ''}"] += 1
        if pr.p.returncode != -signal.SIGKILL:   # it had finished (or refused) before the kill
            shutil.rmtree(out, ignore_errors=True)
        # the rerun into the same directory cleans what the dead one left, then restores
        rc, _, err = self.run("restore", d.bdir, out, *self.key_args(d), verbose=self.rng.random() < 0.3)
        expect_fail = bool(self.damaged_points(d, ch, ch.points[-1].id))
        if (rc != 0) != expect_fail:
            self.violation(f"{d.name}: rerun of a killed restore -> {rc}: {err.strip()}")
        leftovers = [f.name for f in out.iterdir() if f.name.startswith(".")] if out.exists() else []
        if leftovers:
            self.violation(f"{d.name}: a killed restore's files survived the rerun: {leftovers}", "writes_outside")
        shutil.rmtree(out, ignore_errors=True)
        self.log(f"{d.name}: restore killed after {kill_after:.2f}s, rerun -> {rc}")

    def act_restore(self, d: Dom) -> None:
        """A restore through the CLI (sometimes -v): its output is searched for the key too."""
        ch = self.chain(d)
        if ch is None or not ch.points:
            return self.act_backup(d)
        p = self.rng.choice(ch.points)
        out = self.outs / f"cli-{d.name}"
        verbose = self.rng.random() < 0.5
        rc, _, err = self.run("restore", d.bdir, out, "--point", p.id, "--no-progress", *self.key_args(d),
                              verbose=verbose)
        self.stats.actions[f"restore-cli{'-v' if verbose else ''}{'-encrypted' if d.encrypted else ''}"] += 1
        self.log(f"{d.name}: restore --point {p.id}{' -v' if verbose else ''} -> {rc} {self.last(err)}")
        self.judge_restore(d, ch, p.id, rc, err, out)
        shutil.rmtree(out, ignore_errors=True)

    def judge_restore(self, d: Dom, ch: Chain, pid: str, rc: int, msg: str, out: Path) -> None:
        """A restore of point `pid` into `out` ended with `rc`: right, or a violation."""
        want = d.expected.get(pid)
        if want is None:
            self.violation(f"{d.name}: point {pid} is recorded but the model never saw it made")
            return
        bad = self.damaged_points(d, ch, pid)
        self.stats.checks["wrong_restores_exit0"] += 1
        self.stats.checks["false_refusals"] += 1
        if bad:
            if rc == 0:
                self.stats.wrong_restores_exit0 += 1
                self.violation(f"{d.name}: point {pid} reads corrupted {sorted(bad)} but restored with exit 0",
                               "wrong_restores_exit0")
            elif rc == 1 and any(b in msg for b in bad):
                self.stats.refused_as_expected += 1
            else:
                self.violation(f"{d.name}: point {pid}: refusal does not name the damage: {rc} {msg}")
        elif rc != 0:
            self.stats.false_refusals += 1
            self.violation(f"{d.name}: point {pid} should restore, got {rc}: {msg}", "false_refusals")
        else:
            for disk, content in want.items():
                got = scratch.read_raw(out / f"{disk}.qcow2")
                diff = scratch.first_difference(got, content)
                self.stats.restored_compared += 1
                if diff is not None:
                    self.stats.wrong_restores_exit0 += 1
                    self.violation(f"{d.name}: point {pid} disk {disk} restored wrong (first diff at {diff})",
                                   "wrong_restores_exit0")

    def act_verify(self, d: Dom) -> None:
        if self.chain(d) is None:
            return
        deep = d.encrypted and self.rng.random() < 0.5
        verbose = self.rng.random() < 0.4
        rc, _, err = self.run("verify", d.bdir, *(["--deep"] if deep else []), *self.key_args(d), verbose=verbose)
        self.stats.actions[f"verify{'-deep' if deep else ''}{'-encrypted' if d.encrypted else ''}"] += 1
        damaged = any(self.damaged_points(d, self.chain(d), p.id) for p in self.chain(d).points)  # type: ignore[union-attr]
        if (rc == 1) != damaged or rc not in (0, 1):
            self.violation(f"{d.name}: verify -> {rc} with {'' if damaged else 'no '}injected damage: {err.strip()}")
        self.log(f"{d.name}: verify{' --deep' if deep else ''} -> {rc}")

    # -- whole-host job ------------------------------------------------------------------------
    def act_job(self, kill_after: Optional[float] = None) -> None:
        """`run JOBFILE` over the unencrypted domains; killed: its children finish (or roll back) on
        their own, and every recorded point still restores."""
        plain = [d for d in self.doms if not d.encrypted]
        if not plain:
            return
        befores = {d.name: (self.chain(d), d.sd.expected()) for d in plain}
        pr = self.cli("run", self.jobfile, "--json", "--no-progress")
        if kill_after is not None:
            time.sleep(kill_after)
            kids = self._children(pr.p.pid)
            self.kill(pr)
            self.stats.faults["virtbackup-sigkill-run-job"] += 1
            self.started.update(kids)
            gone = self._wait_gone(kids, 300)
            if not gone:
                self.violation(f"children of a killed run still running after 300 s: {kids}")
                self._kill_stragglers()
            for d in plain:
                d.settled = False
                d.thawed = False
            self.log(f"run {self.jobfile.name} killed after {kill_after:.2f}s ({len(kids)} running backup(s) "
                     "left to finish on their own)")
        else:
            rc, out, err = self.finish(pr, timeout=600)
            self.stats.actions["run-job"] += 1
            status: Dict[str, str] = {}
            try:
                for r in json.loads(out.strip().splitlines()[-1])["domains"]:
                    status[r["domain"]] = r["status"]
            except (ValueError, KeyError, IndexError, TypeError):
                pass
            self.log(f"run {self.jobfile.name} -> {rc} {status} {self.last(err)}")
            for d in plain:
                if status.get(d.name) == "ok":
                    d.thawed = True
                d.settled = False            # its prune may have made a checkpoint unneeded
            if rc != 0 and not any(d.corrupt for d in plain):
                self.violation(f"run failed without a fault: {rc} {err.strip()[-800:]}")
        for d in plain:
            before, want = befores[d.name]
            self.reconcile(d, before, want)

    @staticmethod
    def _children(pid: int) -> List[Ident]:
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                rest = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(rest[1]) == pid:
                kids.append((int(entry), rest[19]))
        return kids

    @staticmethod
    def _wait_gone(idents: Sequence[Ident], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(process_start(pid) == start for pid, start in idents):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    # -- restore drills ------------------------------------------------------------------------
    def act_drill(self, d: Dom, kill_after: Optional[float] = None) -> None:
        """`verify --boot`: a scratch domain has no OS, so the drill fails on its own (exit 1 at
        the agent stage); killed, its throwaway domain goes with its libvirt connection
        (AUTODESTROY) and its overlays dir is removed by the next drill."""
        if d.encrypted:                     # refused (exit 2): the drill would need the key in libvirt
            d = self.rng.choice([x for x in self.doms if not x.encrypted] or [d])
        ch = self.chain(d)
        if d.encrypted or ch is None or not ch.points:
            return self.act_backup(d)
        timeout = self.rng.choice([2, 3])
        pr = self.cli("verify", d.bdir, "--boot", "--timeout", timeout, "--json", "--no-progress")
        if kill_after is not None:
            time.sleep(kill_after)
            self.kill(pr)
            self.stats.faults["virtbackup-sigkill-drill"] += 1
            left = self._wait_no_foreign_domain(20)
            if left:
                self.violation(f"a killed drill's domain outlived it by 20 s: {left}", "drill_leftovers")
            self.log(f"{d.name}: drill killed after {kill_after:.2f}s")
            return
        rc, out, err = self.finish(pr)
        self.stats.actions["drill"] += 1
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {}
        if isinstance(result, dict) and "ok" in result:
            self.cleaners["drill"] += 1        # it got as far as cleaning what killed drills left
        damaged = bool(self.damaged_points(d, ch, ch.points[-1].id))
        stage = result.get("stage") if isinstance(result, dict) else None
        self.log(f"{d.name}: drill (--timeout {timeout}) -> {rc} {stage or ''} {self.last(err)}")
        if rc == 0:
            self.violation(f"{d.name}: a drill of a domain without an OS passed: {out.strip()[-400:]}")
        elif rc != 1:
            self.violation(f"{d.name}: drill exit {rc}{' (damaged point)' if damaged else ''}: {err.strip()}")
        left = self._foreign_domains()
        if left:
            self.violation(f"a finished drill left its domain: {left}", "drill_leftovers")
            self._remove_foreign_domains(self.conn)

    def _foreign_domains(self) -> List[str]:
        ours = {d.name for d in self.doms}
        found = []
        for dom in self.conn.listAllDomains(0):
            try:
                if dom.name() not in ours and str(self.work) in dom.XMLDesc(0):
                    found.append(dom.name())
            except libvirt.libvirtError:
                continue        # gone while we looked
        return found

    def _wait_no_foreign_domain(self, timeout: float) -> List[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = self._foreign_domains()
            if not left or time.monotonic() > deadline:
                if left:
                    self._remove_foreign_domains(self.conn)
                return left
            time.sleep(0.2)

    # -- hand edits ----------------------------------------------------------------------------
    def act_tamper(self, d: Dom) -> None:
        """Edit the backup dir by hand (a point's XML, metadata fields, an image header's backing
        name): every reader must refuse it (non-zero), write nothing outside and change nothing
        in the dir; then the originals are put back."""
        ch = self.chain(d)
        if ch is None or not ch.points:
            return self.act_backup(d)
        meta = json.loads((d.bdir / "virtbackup.json").read_text())
        kinds = ["domain-xml", "checkpoint-xml", "meta-image-outside", "meta-digest"]
        if len(ch.points) >= 2:
            kinds.append("meta-image-swap")
        if any(p["parent"] is not None for p in meta["points"]) and len(ch.points) >= 3:
            kinds.append("meta-parent")
        if any(dk.get("backing") for p in meta["points"] for dk in p["disks"].values()):
            kinds.append("meta-backing")
        backed = [(p.id, img.image) for p in ch.points for img in p.disks.values() if p.parent is not None]
        if backed:
            kinds.append("header-backing")
        kind = self.rng.choice(kinds)
        pid = self.rng.choice(ch.points).id
        saved: Dict[Path, bytes] = {}

        def edit(path: Path, data: bytes) -> None:
            saved.setdefault(path, path.read_bytes())
            path.write_bytes(data)

        point = ch.point(pid)
        if kind == "domain-xml":
            path = d.bdir / point.domain_xml
            text = path.read_text()
            new = re.sub(r"<emulator>[^<]*</emulator>", f"<emulator>{self.evil / 'emu.sh'}</emulator>", text)
            edit(path, (new if new != text else text.replace("</devices>", "<!-- edited --></devices>")).encode())
        elif kind == "checkpoint-xml":
            path = d.bdir / point.checkpoint_xml
            text = path.read_text()
            new = re.sub(r"<name>([^<]*)</name>", lambda m: f"<name>{m.group(1)}x</name>", text, count=1)
            edit(path, (new if new != text else text + "<!-- edited -->").encode())
        elif kind == "header-backing":
            pid, rel = self.rng.choice(backed)
            if not self._edit_backing(d, ch, rel, edit):
                kind = "meta-digest"
        if kind.startswith("meta-"):
            recs = {p["id"]: p for p in meta["points"]}
            rec = recs[pid]
            disk = self.rng.choice(sorted(rec["disks"]))
            if kind == "meta-image-outside":
                rec["disks"][disk]["image"] = self.rng.choice(
                    ["../../../sentinel/s0.qcow2", str(self.sentinel / "s1.qcow2"), "points/../../x.qcow2"])
            elif kind == "meta-digest":
                dg = rec["disks"][disk]["digest"]
                v = dg["value"]
                dg["value"] = ("0" if v[0] != "0" else "1") + v[1:]
            elif kind == "meta-image-swap":
                others = [p for p in meta["points"] if p["id"] != pid and disk in p["disks"]]
                if others:
                    o = self.rng.choice(others)
                    rec["disks"][disk]["image"], o["disks"][disk]["image"] = \
                        o["disks"][disk]["image"], rec["disks"][disk]["image"]
                else:
                    rec["disks"][disk]["image"] = "points/0000/vda.qcow2"
            elif kind == "meta-backing":         # the record says another image (or none) lies below
                backed_recs = [(p["id"], k) for p in meta["points"] for k, dk in p["disks"].items()
                               if dk.get("backing")]
                pid, disk = self.rng.choice(backed_recs)
                brec = recs[pid]["disks"][disk]
                others = sorted({dk["image"] for p in meta["points"] for dk in p["disks"].values()}
                                - {brec["image"], brec["backing"]})
                brec["backing"] = self.rng.choice([*others, None])
            elif kind == "meta-parent":
                cands = [p for p in meta["points"] if p["parent"] is not None]
                rec = self.rng.choice(cands)
                pid = rec["id"]
                earlier = [p["id"] for p in meta["points"] if p["id"] < pid and p["id"] != rec["parent"]]
                rec["parent"] = self.rng.choice(earlier) if earlier else None
            edit(d.bdir / "virtbackup.json", (json.dumps(meta, indent=2) + "\n").encode())
        self.stats.faults[f"hand-edit-{kind}"] += 1
        self.log(f"{d.name}: hand-edited {kind} (point {pid})")
        edited_state = self._tree_state(d.bdir, skip=("logs", ".virtbackup.lock"))
        try:
            self._expect_refusals(d, ch, pid, kind)
            now = self._tree_state(d.bdir, skip=("logs", ".virtbackup.lock"))
            changed = sorted(k for k in set(now) | set(edited_state) if now.get(k) != edited_state.get(k))
            # a killed backup's unfinished point dir is the next backup's to remove: not judged here
            recorded = [c for c in changed if not any(part.endswith(".partial") for part in Path(c).parts)]
            if recorded:
                self.violation(f"{d.name}: a command refusing the hand edit changed {recorded}", "writes_outside")
            elif changed:
                self.log(f"{d.name}:   (a killed run's unfinished point changed meanwhile: {changed})")
        finally:
            for path, data in saved.items():          # heal: the originals back
                path.write_bytes(data)

    def _edit_backing(self, d: Dom, ch: Chain, rel: str, edit: Callable[[Path, bytes], None]) -> bool:
        """Swap the backing file name in a qcow2 header for another image's (same length, so the
        header stays valid), else change one character of it."""
        path = d.bdir / rel
        data = bytearray(path.read_bytes())
        off, size = struct.unpack(">QI", bytes(data[8:20]))
        if not off or not size:
            return False
        name = bytes(data[off:off + size]).decode(errors="replace")
        here = os.path.dirname(rel)
        cands = sorted({os.path.relpath(img.image, here) for p in ch.points for img in p.disks.values()})
        same = [c for c in cands if len(c.encode()) == size and c != name and os.path.join(here, c) != rel]
        if same:
            new = self.rng.choice(same).encode()
        else:
            i = max(0, name.rfind("0"))
            new = (name[:i] + ("1" if name[i:i + 1] != "1" else "2") + name[i + 1:]).encode()
        data[off:off + size] = new
        edit(path, bytes(data))
        return True

    def _expect_refusals(self, d: Dom, ch: Chain, pid: str, kind: str) -> None:
        out = self.outs / f"tamper-{d.name}"
        checks: List[Tuple[str, List[object]]] = [
            ("verify", ["verify", d.bdir, *self.key_args(d)]),
            ("restore", ["restore", d.bdir, out, "--point", pid, "--no-progress", *self.key_args(d)]),
        ]
        if kind == "domain-xml":
            name = f"vbsoak-tamper-{secrets.token_hex(3)}"
            self.defined_by_us.add(name)
            checks.append(("restore --define", ["restore", d.bdir, out, "--point", pid, "--define", name,
                                                "--no-progress", *self.key_args(d)]))
            if not d.encrypted:         # a drill of an encrypted dir is refused anyway
                checks.append(("verify --boot", ["verify", d.bdir, "--boot", "--point", pid, "--timeout", "2"]))
        for what, args in checks:
            rc, _, err = self.run(*args, verbose=d.encrypted and self.rng.random() < 0.4)
            self.stats.checks["tampering_accepted"] += 1
            if rc == 0 and kind == "meta-parent":
                # `parent` is informational: restores and prunes follow each image's own recorded
                # backing (checked against the image headers). Accepted, the data must still be right.
                self.stats.edits_unnoticed[f"{kind}: {what}"] += 1
                self.log(f"{d.name}:   {what} -> 0 (an edited `parent` is not data; noted, not a violation)")
                if what == "restore":
                    self.judge_restore(d, ch, pid, rc, err, out)
                shutil.rmtree(out, ignore_errors=True)
                continue
            if rc == 0:
                self.violation(f"{d.name}: {what} accepted a hand-edited {kind} (point {pid})", "tampering_accepted")
                if what == "restore":
                    self.judge_restore(d, ch, pid, rc, err, out)
            elif rc not in (1, 2):
                self.violation(f"{d.name}: {what} of a hand-edited {kind}: exit {rc}: {err.strip()}")
            else:
                self.stats.edits_refused += 1
            self.log(f"{d.name}:   {what} -> {rc} {self.last(err)}")
            if (self.evil / "RAN").exists():
                self.violation(f"{d.name}: {what} ran the program a hand-edited domain.xml names", "writes_outside")
                (self.evil / "RAN").unlink()
            if out.exists():
                stray = sorted(p.name for p in out.iterdir())
                if stray and rc != 0:
                    self.violation(f"{d.name}: a refused {what} left {stray} in its OUTPUT_DIR", "writes_outside")
                shutil.rmtree(out, ignore_errors=True)
        for name in sorted(self.defined_by_us):
            try:
                self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            self.violation(f"{d.name}: a refused --define left domain {name} defined", "writes_outside")
            scratch.remove_domain(self.conn, name)
        left = self._wait_no_foreign_domain(10)
        if left:
            self.violation(f"a refused drill left its domain: {left}", "drill_leftovers")

    # -- faults --------------------------------------------------------------------------------
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
            rc, _, err = self.run("backup", d.name, d.bdir, "--level", "auto", "--json", *self.key_args(d))
            self.log(f"{d.name}: backup on a full target -> {rc} {self.last(err)}")
            if rc not in (0, 1):
                self.violation(f"backup on a full target exit {rc}: {err.strip()}")
            if rc == 0:
                d.thawed = True
            self.reconcile(d, before, want)
            before = self.chain(d)
            if before is not None and before.points and self.rng.random() < 0.5:
                rc, _, err = self.run("prune", d.bdir, "--keep", "1", *self.key_args(d))
                self.log(f"{d.name}: prune on a full target -> {rc} {self.last(err)}")
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
            if p.id not in d.expected:
                self.violation(f"{d.name}: point {p.id} is recorded but the model never saw it made")
                continue
            out = self.outs / f"{d.name}-{p.id}"
            try:
                api.restore(d.bdir, out, p.id, key=self.key if d.encrypted else None)
                rc, msg = 0, ""
            except VirtBackupError as e:
                rc, msg = e.exit_code, str(e)
            self.judge_restore(d, ch, p.id, rc, msg, out)
            shutil.rmtree(out, ignore_errors=True)
        if d.settled:
            self.check_orphans(d, ch)

    def check_orphans(self, d: Dom, ch: Chain) -> None:
        self.stats.checks["orphans"] += 1
        prefix = ch.checkpoint_prefix()
        needed = set(ch.needed_checkpoints())
        ours = set(checkpoints.ours(d.dom, prefix))
        extra = ours - needed
        found = bitmaps.of_domain(d.dom, eligible_disks(d.dom))
        stray = {(disk, b.name) for disk, bms in found.items() for b in bms
                 if b.name.startswith(prefix) and b.name not in ours}
        if extra or stray:
            self.stats.orphans += len(extra) + len(stray)
            self.violation(f"{d.name}: orphaned checkpoints {sorted(extra)} / bitmaps {sorted(stray)}", "orphans")

    def check_outside(self) -> None:
        self.stats.checks["writes_outside"] += 1
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
        jobstray = {p.name for p in self.jobroot.iterdir()} - {d.jobdir.name for d in self.doms if d.jobdir}
        if jobstray:
            problems.append(f"stray entries in the job's backup_root: {sorted(jobstray)}")
        metstray = {p.name for p in self.metrics.iterdir()} - {"soak.prom"}
        if metstray:
            problems.append(f"stray entries beside the metrics file: {sorted(metstray)}")
        if {p.name for p in self.evil.iterdir()} != {"emu.sh"}:
            left = sorted(p.name for p in self.evil.iterdir())
            problems.append(f"the hand-edited emulator ran or left files: {left}")
        # beside the guests' disks: pull scratch files only while a killed pull's mess is not yet cleaned
        disks = {d.sd.disk_path(t).name for d in self.doms for t in d.sd.disk_sizes}
        if all(d.settled for d in self.doms):
            extra = {p.name for p in self.disks.iterdir()} - disks
            if extra:
                problems.append(f"stray files beside the guests' disks: {sorted(extra)}")
        # TMPDIR: only drill dirs (judged in check_leftovers)
        tmpstray = {p.name for p in self.tmp.iterdir() if not p.name.startswith(DRILL_DIR_PREFIX)}
        if tmpstray:
            problems.append(f"stray entries in TMPDIR: {sorted(tmpstray)}")
        for p in problems:
            self.stats.writes_outside += 1
            self.violation(p, "writes_outside")

    def check_guests(self) -> None:
        """No guest left paused (by an I/O error or by us), no freeze marker once a backup ran since."""
        for d in self.doms:
            self.stats.checks["guests_left_paused_or_frozen"] += 1
            try:
                state, reason = d.dom.state()
            except libvirt.libvirtError:
                continue
            if state == libvirt.VIR_DOMAIN_PAUSED:
                self.violation(f"{d.name}: guest left paused (reason {reason})", "guests_left_paused_or_frozen")
                d.dom.resume()
            marker = self.work / "run" / f"frozen-{d.dom.UUIDString()}.json"
            if marker.exists() and d.thawed:
                self.violation(f"{d.name}: freeze marker {marker.name} left after a backup ended normally",
                               "guests_left_paused_or_frozen")

    @staticmethod
    def _owned_dirs(base: Path, prefix: str) -> Dict[Ident, List[Path]]:
        found: Dict[Ident, List[Path]] = {}
        try:
            entries = list(base.iterdir())
        except OSError:
            return found
        for p in entries:
            if not p.name.startswith(prefix):
                continue
            m = _OWNED_DIR.match(p.name[len(prefix):])
            if m:
                found.setdefault((int(m.group(1)), m.group(2)), []).append(p)
        return found

    @staticmethod
    def _secret_desc(sec: libvirt.virSecret) -> Optional[str]:
        try:
            node = etree.fromstring(sec.XMLDesc(0)).find("description")
        except (libvirt.libvirtError, etree.LxmlError):
            return None
        return node.text if node is not None else None

    def check_leftovers(self, final: bool = False) -> None:
        """What a killed run of ours left (key dir, libvirt secret, drill dir) must be gone once
        a later run that cleans it up has run; a run that ended by itself leaves nothing."""
        found: Dict[str, Dict[Ident, List[str]]] = {"keyfile": {}, "secret": {}, "drill": {}}
        for ident, paths in self._owned_dirs(Path("/dev/shm"), KEY_DIR_PREFIX).items():
            found["keyfile"][ident] = [str(p) for p in paths]
        for ident, paths in self._owned_dirs(self.tmp, DRILL_DIR_PREFIX).items():
            found["drill"][ident] = [str(p) for p in paths]
        for sec in self.conn.listAllSecrets(0):
            m = _SECRET_DESC.match(self._secret_desc(sec) or "")
            if m:
                found["secret"].setdefault((int(m.group(1)), m.group(2)), []).append(sec.UUIDString())
        inv = {"keyfile": "key_files_left", "secret": "secrets_left", "drill": "drill_leftovers"}
        for kind, by_owner in found.items():
            self.stats.checks[inv[kind]] += 1
            for ident, what in by_owner.items():
                if ident not in self.started or process_start(ident[0]) == ident[1]:
                    continue                # another user's, or a live run's
                tag = f"{kind}:{ident}"
                if tag in self.reported:
                    continue
                if ident not in self.killed:
                    why = "left by a run that ended by itself"
                elif self.cleaners[kind] > self.killed[ident][kind]:
                    why = "left by a killed run, and still there after a later run that cleans them up"
                else:                       # killed; no cleaning run since
                    if ident not in self.pending[kind]:
                        self.pending[kind].add(ident)
                        self.stats.leftovers_seen[kind] += 1
                    if kind == "keyfile" and tag not in self.outlived and \
                            self.cleaners["any-encrypted-backup"] > self.killed[ident]["any-encrypted-backup"]:
                        # the issue asks "removed by the next run"; the code removes them in the
                        # next run that writes a key file itself: noted, with where it was seen
                        self.outlived.add(tag)
                        self.stats.key_dirs_outliving_a_backup.append(
                            f"step {self.stats.steps} (seed {self.args.seed}): {what} of killed pid {ident[0]} "
                            "still there after a later encrypted backup ended with exit 0")
                        self.log(f"NOTE: key dir {what} outlived a later encrypted backup (exit 0)")
                    continue
                self.reported.add(tag)
                self.violation(f"{kind} {what} {why}", inv[kind])
            for ident in sorted(self.pending[kind] - set(by_owner)):
                self.pending[kind].discard(ident)
                self.stats.leftovers_cleaned[kind] += 1
        if self._foreign_domains():
            self.violation(f"domains of ours left behind: {self._foreign_domains()}", "drill_leftovers")
            self._remove_foreign_domains(self.conn)

    def check_key_in_files(self, d: Dom) -> None:
        """The run logs (and every other file) in an encrypted dir, and the run dir, hold no key byte."""
        if d.encrypted:
            self.scan_files(d.bdir)
        self.scan_files(self.work / "run")
        self.scan_files(self.tmp)

    @staticmethod
    def _tree_state(path: Path, skip: Tuple[str, ...] = ()) -> Dict[str, Tuple[str, int]]:
        return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part in skip for part in p.relative_to(path).parts)}

    # -- main loop -----------------------------------------------------------------------------
    def step(self) -> None:
        d = self.rng.choice(self.doms)
        kinds = [("write", 30), ("backup", 25), ("prune", 7), ("verify", 4), ("restore", 3), ("restore-kill", 3),
                 ("backup-kill", 5), ("pull-kill", 4), ("prune-kill", 3), ("metadata-loss", 3), ("stop-start", 5),
                 ("qemu-kill", 3), ("enospc", 3), ("flip", 4), ("tamper", 8)]
        if any(not x.encrypted for x in self.doms):
            kinds += [("job", 3), ("job-kill", 3), ("drill", 2), ("drill-kill", 3)]
        if any(x.encrypted for x in self.doms):
            kinds += [("encrypted-kill", 8)]
        if self.args.libvirtd_restart:
            kinds.append(("libvirtd-restart", 2))
        kind = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        if d.corrupt and self.rng.random() < 0.3:
            self.heal(d)
        touched = [d]
        if kind == "write":
            for _ in range(self.rng.randint(1, 3)):
                self.act_write(d)
        elif kind == "backup":
            self.act_backup(d)
        elif kind == "backup-kill":
            self.act_backup(d, kill_after=self.rng.uniform(0.0, 1.2))
        elif kind == "pull-kill":
            self.act_backup(d, kill_after=self.rng.uniform(0.0, 2.0), mode="pull")
        elif kind == "encrypted-kill":
            d = self.rng.choice([x for x in self.doms if x.encrypted])
            touched = [d]
            what = self.rng.choice(["backup", "backup", "backup-at-key", "backup-at-key", "prune", "restore"])
            if what == "backup-at-key":
                self.act_backup(d, kill_at_key=True)
            elif what == "backup":
                self.act_backup(d, kill_after=self.rng.uniform(0.0, 2.5))
            elif what == "prune":
                self.act_prune(d, kill_after=self.rng.uniform(0.0, 1.5))
            else:
                self.act_restore_killed(d, self.rng.uniform(0.0, 1.5))
        elif kind == "prune":
            self.act_prune(d)
        elif kind == "prune-kill":
            self.act_prune(d, kill_after=self.rng.uniform(0.0, 0.8))
        elif kind == "verify":
            self.act_verify(d)
        elif kind == "restore":
            self.act_restore(d)
        elif kind == "restore-kill":
            self.act_restore_killed(d, self.rng.uniform(0.0, 0.8))
        elif kind in ("job", "job-kill"):
            touched = [x for x in self.doms if not x.encrypted]
            self.act_job(kill_after=self.rng.uniform(0.0, 4.0) if kind == "job-kill" else None)
        elif kind in ("drill", "drill-kill"):
            touched = []
            self.act_drill(d, kill_after=self.rng.uniform(0.0, 5.0) if kind == "drill-kill" else None)
        elif kind == "tamper":
            self.act_tamper(d)
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
            touched = self.doms
        for t in touched:
            self.check(t)
        self.check_after_step()

    def check_after_step(self) -> None:
        self.check_processes()
        self.check_outside()
        self.check_guests()
        self.check_leftovers()
        for t in self.doms:
            self.check_key_in_files(t)

    def main(self) -> int:
        t0 = time.monotonic()
        try:
            self.setup()
            for d in self.doms:                 # every directory starts with a point
                self.act_write(d)
                self.act_backup(d, "full", mode="push")
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
            self.finale()
        finally:
            self.teardown()
        self.report(time.monotonic() - t0)
        return 1 if self.stats.violations else 0

    def finale(self) -> None:
        """Heal, one clean backup per dir (for the encrypted one a push and, after a write, a
        pull incremental: between them they clean every secret and key file a killed run left),
        a drill if one was killed, and everything checked once more."""
        for d in self.doms:
            while d.corrupt:
                self.heal(d)
            if not self.running(d):
                d.dom.create()
            self.act_backup(d, "auto", mode="push")
            if d.encrypted:             # a pull incremental with data to copy writes (and cleans) key files
                self.act_write(d)
                self.act_backup(d, "auto", mode="pull")
            self.check(d)
            self.act_verify(d)
        if self.stats.faults["virtbackup-sigkill-drill"]:
            self.act_drill(self.doms[0])
        self.check_after_step()

    def report(self, seconds: float) -> None:
        s = self.stats
        inv = {k: s.invariants.get(k, 0) for k in INVARIANTS}
        summary = {"seed": self.args.seed, "steps": s.steps, "seconds": round(seconds, 1),
                   "domains": [{"name": d.name, "encrypted": d.encrypted, "disks": sorted(d.sd.disk_sizes)}
                               for d in self.doms],
                   "faults": dict(sorted(s.faults.items())), "actions": dict(sorted(s.actions.items())),
                   "points_restored_and_compared": s.restored_compared,
                   "damaged_points_refused": s.refused_as_expected, "hand_edits_refused": s.edits_refused,
                   "hand_edits_unnoticed": dict(sorted(s.edits_unnoticed.items())),
                   "key_dirs_outliving_a_later_encrypted_backup": s.key_dirs_outliving_a_backup,
                   "killed_run_leftovers": {k: {"seen": s.leftovers_seen[k], "cleaned_by_a_later_run":
                                                s.leftovers_cleaned[k]} for k in ("keyfile", "secret", "drill")},
                   "outputs_scanned_for_key": s.outputs_scanned,
                   "wrong_restores_exit0": s.wrong_restores_exit0, "false_refusals": s.false_refusals,
                   "orphans": s.orphans, "writes_outside": s.writes_outside,
                   "invariants": {k: {"checked": s.checks.get(k, 0), "violations": v} for k, v in inv.items()},
                   "violations": s.violations}
        if self.args.json:
            print(json.dumps(summary))
            return
        print(f"soak seed {self.args.seed}: {s.steps} steps in {seconds:.0f} s, "
              f"{len(self.doms)} domains ({sum(d.encrypted for d in self.doms)} encrypted)")
        print(f"  faults: {', '.join(f'{k} {v}' for k, v in sorted(s.faults.items())) or 'none'}")
        print(f"  actions: {', '.join(f'{k} {v}' for k, v in sorted(s.actions.items()))}")
        print(f"  disk restores compared byte for byte: {s.restored_compared}; damaged points refused: "
              f"{s.refused_as_expected}; hand edits refused: {s.edits_refused}; outputs and files searched "
              f"for the key: {s.outputs_scanned}")
        print("  left by killed runs, seen / removed by a later run: " + ", ".join(
            f"{k} {s.leftovers_seen[k]} / {s.leftovers_cleaned[k]}" for k in ("keyfile", "secret", "drill")))
        for note in s.key_dirs_outliving_a_backup:
            print(f"  NOTE key dir of a killed run outlived a later encrypted backup: {note}")
        if s.edits_unnoticed:
            print(f"  informational edits accepted (data checked): "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(s.edits_unnoticed.items()))}")
        print("  invariants (violations / times checked):")
        for k, v in inv.items():
            print(f"    {k:30s} {v} / {s.checks.get(k, 0)}")
        print(f"  violations: {len(s.violations)}")
        for line in s.violations:
            print(f"    {line}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--domains", type=int, default=3, choices=(1, 2, 3),
                    help="scratch domains; the third one's chain is encrypted (default 3)")
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
