"""Whole-host backup jobs: the job file (TOML), domain selection, planning and the runner.

A job file names a backup root and which domains to back up; `run` backs up each selected
domain into `backup_root/<domain name>` (then prunes it), `parallel` at a time.

Each domain's backup runs as its own `virtbackup backup --json` child process (and its prune
as `virtbackup prune --json`), not as a thread. That keeps every guarantee of a single backup
exactly as tested for it: the signal handling that aborts a running libvirt job and rolls back
works only in a process's main thread (`host.signals_noted`), a libvirt connection has a
single close callback (one `JobWatch` per connection), and a crash or hang in one domain's
backup cannot take another down. The runner forwards SIGINT/SIGTERM to its running children
(which abort and roll back as `backup` does; see _CHILD for when a child takes a signal) and
starts nothing new: queued domains are reported `skipped`. Children run in their own session,
so a terminal's Ctrl-C reaches them through the runner only.

A job's key files (`key_file`, per domain in `[domain."NAME"]`) are checked when the job file is
loaded, and reach a child as `--key-file PATH` only: the runner never holds on to a key.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from virtbackup import observe
from virtbackup.errors import BackupDirError, ChainCorrupt, UsageError, VirtBackupError
from virtbackup.options import BACKUP_MODES, COMPRESSIONS, QUIESCE_MODES, REQUESTED_LEVELS, has_control_chars
from virtbackup.store.chain import BackupDir, Chain, FileLock, Point, data_ratio, now_iso, point_time
from virtbackup.store.retention import Policy

MAX_PARALLEL = 64


class JobFileError(UsageError):
    """The job file is missing, not TOML, or has an unknown key, a wrong type or a bad value."""

    kind = "job-file"


# --- the job file ------------------------------------------------------------------------------
@dataclass
class Job:
    path: Path
    name: str                                 # the file's stem: `nightly` for nightly.toml (systemd's %i)
    backup_root: Path
    domains: List[str]
    exclude: List[str] = field(default_factory=list)
    level: str = "auto"
    full_every_days: int = 0                  # 0: no age limit
    max_chain: int = 0                        # 0: no length limit
    quiesce: str = "auto"
    parallel: int = 1
    metrics_file: Optional[Path] = None
    retention: Optional[Policy] = None
    allow_empty: bool = False                 # a selection of no domain is a failed run unless this is set
    offsite: Optional["OffsiteTarget"] = None  # [offsite]: push each domain's dir after its backup and prune
    settings: "DomainSettings" = field(default_factory=lambda: DomainSettings())   # every domain's
    per_domain: Dict[str, "DomainSettings"] = field(default_factory=dict)   # [domain."NAME"], merged

    def for_domain(self, name: str) -> "DomainSettings":
        """What this domain's backup gets: its [domain."NAME"] table over the job's top level."""
        return self.per_domain.get(name, self.settings)


@dataclass(frozen=True)
class DomainSettings:
    """The encryption, compression and transport settings a job passes to one domain's `backup`
    (and its prune): the path of the key file, never the key; the child reads and checks it itself."""

    key_file: Optional[Path] = None
    encrypt: bool = False                     # start an encrypted chain in a new directory
    compress: Optional[str] = None            # None: backup's own default (no --compress)
    mode: Optional[str] = None                # auto | push | pull; None: backup's own choice (no --mode: auto)
    scratch_dir: Optional[str] = None         # pull's scratch files (--scratch-dir)

    def backup_args(self) -> List[str]:
        args: List[str] = []
        if self.key_file is not None:
            args += ["--key-file", str(self.key_file)]
        if self.encrypt:
            args.append("--encrypt")
        if self.compress is not None:
            args += ["--compress", self.compress]
        if self.mode is not None:
            args += ["--mode", self.mode]
        if self.scratch_dir is not None:
            args += ["--scratch-dir", self.scratch_dir]
        return args

    def prune_args(self) -> List[str]:
        return ["--key-file", str(self.key_file)] if self.key_file is not None else []

    def chain_problem(self, chain: Optional[Chain], bdir: Path, job_path: Path) -> Optional[str]:
        """Why the backup would be refused for its key (said in the job file's terms; the child
        checks the same and the key itself), None when it fits the directory."""
        has_points = chain is not None and bool(chain.points)
        encrypted = chain is not None and chain.encryption is not None
        if has_points and encrypted and self.key_file is None:
            return f"{bdir} is encrypted; job file {job_path} gives this domain no key_file"
        if has_points and not encrypted and self.key_file is not None:
            return (f"{bdir} holds unencrypted backups, but job file {job_path} gives this domain key_file "
                    f"{self.key_file}; an encrypted chain needs a new backup directory")
        if not has_points and self.key_file is not None and not self.encrypt:
            return (f"{bdir} holds no backups yet; set encrypt = true in job file {job_path} to start "
                    f"an encrypted chain with key_file {self.key_file}")
        return None


@dataclass
class OffsiteTarget:
    """The job's [offsite] table: every domain's backup dir is pushed to URL/<domain name>."""

    url: str
    lock_days: Optional[int] = None
    profile: Optional[str] = None
    endpoint_url: Optional[str] = None

    def domain_url(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def push_args(self, backup_dir: Path, name: str) -> List[str]:
        args = ["offsite", "push", str(backup_dir), self.domain_url(name), "--json", "--no-progress"]
        if self.lock_days is not None:
            args.append(f"--lock-days={self.lock_days}")
        if self.profile is not None:
            args.append(f"--profile={self.profile}")
        if self.endpoint_url is not None:
            args.append(f"--endpoint-url={self.endpoint_url}")
        return args


# Bounds of the whole-number keys (beyond them a value is a typo, and timedelta overflows)
MAX_FULL_EVERY_DAYS = 36_500
MAX_CHAIN = 100_000

# key -> (python type(s), description for messages)
_TOP: Dict[str, Tuple[type, str]] = {
    "backup_root": (str, "a string (an absolute path)"),
    "domains": (list, "a list of names or globs"),
    "exclude": (list, "a list of names or globs"),
    "level": (str, "one of " + ", ".join(REQUESTED_LEVELS)),
    "full_every_days": (int, f"a whole number of days from 0 (no limit) to {MAX_FULL_EVERY_DAYS}"),
    "max_chain": (int, f"a whole number of points from 0 (no limit) to {MAX_CHAIN}"),
    "quiesce": (str, "one of " + ", ".join(QUIESCE_MODES)),
    "parallel": (int, f"a whole number from 1 to {MAX_PARALLEL}"),
    "metrics_file": (str, "a string (an absolute path)"),
    "retention": (dict, "a table ([retention])"),
    "allow_empty": (bool, "true or false"),
    "offsite": (dict, "a table ([offsite])"),
    "key_file": (str, "a string (the absolute path of a key file)"),
    "encrypt": (bool, "true or false"),
    "compress": (str, "one of " + ", ".join(COMPRESSIONS)),
    "mode": (str, "one of " + ", ".join(BACKUP_MODES)),
    "scratch_dir": (str, "a string (an absolute path on the hypervisor)"),
    "domain": (dict, 'tables of domain names ([domain."NAME"])'),
}
# [domain."NAME"] key -> (python type, description): these override the top-level keys of that name
_DOMAIN: Dict[str, Tuple[type, str]] = {k: _TOP[k] for k in ("key_file", "encrypt", "compress", "mode",
                                                               "scratch_dir")}
_RETENTION = ("keep", "keep_daily", "keep_weekly", "keep_monthly")
# [offsite] key -> (python type, description)
_OFFSITE: Dict[str, Tuple[type, str]] = {
    "url": (str, "a string (s3://BUCKET/PREFIX; each domain goes to PREFIX/<domain name>)"),
    "lock_days": (int, "a whole number of days (S3 Object Lock, COMPLIANCE)"),
    "profile": (str, "a string (a credentials profile of ~/.aws/config)"),
    "endpoint_url": (str, "a string (the S3 server, e.g. http://rgw.example:7480)"),
}


def _header_path(line: str) -> Optional[Tuple[str, ...]]:
    """The table a `[a."b"]` header line opens, as a key path (None: not a header)."""
    import tomllib

    if not line.lstrip().startswith("["):
        return None
    try:
        table: Any = tomllib.loads(line)
    except tomllib.TOMLDecodeError:
        return None
    path: List[str] = []
    while isinstance(table, dict) and len(table) == 1:
        name, table = next(iter(table.items()))
        path.append(name)
        if isinstance(table, list):            # [[array of tables]]
            table = table[-1] if table else {}
    return tuple(path) or None


def _line_of(text: str, section: Optional[Union[str, Tuple[str, ...]]], key: str) -> Optional[int]:
    """Line number of `key = ...` in `[section]` (None: top level; a tuple: a nested table such
    as ("domain", "vm1")), or of the header `[key]`/`[section.key]` of a table; None when not found."""
    want: Tuple[str, ...] = () if section is None else (section,) if isinstance(section, str) else section
    current: Tuple[str, ...] = ()
    key_re = re.compile(r'^\s*(?:"%s"|\'%s\'|%s)\s*=' % ((re.escape(key),) * 3))
    for n, line in enumerate(text.splitlines(), 1):
        header = _header_path(line)
        if header is not None:
            current = header
            if current[:len(want) + 1] == (*want, key):
                return n
            continue
        if current == want and key_re.match(line):
            return n
    return None


_UNSAFE_GLOB = re.compile(r"[\x00-\x1f\x7f/]")


def glob_problem(pattern: str) -> Optional[str]:
    """Why a name/glob can never select a domain sensibly (None = it is fine)."""
    if not pattern.strip():
        return "is empty"
    if _UNSAFE_GLOB.search(pattern):
        return "contains '/' or a control character"
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            # fnmatch would take an unclosed '[' literally; in a job file it is a typo
            start = i + 1 + (pattern[i + 1:i + 2] == "!")
            close = pattern.find("]", start + 1)
            if close < 0:
                return "has an unclosed '['"
            i = close
        i += 1
    return None


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def unsafe_dir_name(name: str) -> Optional[str]:
    """Why a domain name cannot be used as-is as a directory name (None = it can).

    Never guessed into something else: two domains could map to the same directory."""
    if name in ("", ".", ".."):
        return f"its name {name!r} is not a usable directory name"
    if "/" in name or "\x00" in name:
        return "its name contains '/'"
    if re.search(r"[\x01-\x1f\x7f]", name):
        return "its name contains a control character"
    if len(name.encode()) > 255:
        return "its name is longer than 255 bytes"
    return None


def load_job(path: Path) -> Job:
    """Read and validate a job file; JobFileError (exit 2) names the file, line and key."""
    import tomllib

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise JobFileError(f"cannot read job file {path}: {e.strerror}") from None
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise JobFileError(f"job file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise JobFileError(f"job file {path}: invalid TOML: {e}") from None

    def fail(section: Optional[Union[str, Tuple[str, ...]]], key: str, what: str) -> JobFileError:
        line = _line_of(text, section, key)
        where = f"{path}:{line}" if line else str(path)
        if isinstance(section, tuple):          # ("domain", "vm1") and key: domain."vm1".key
            full = ".".join(json.dumps(p, ensure_ascii=False) if i == 1 else p
                            for i, p in enumerate([*section, key]))
        else:
            full = f"{section}.{key}" if section else key
        return JobFileError(f"job file {where}: key '{full}' {what}")

    for key, value in data.items():
        if key not in _TOP:
            raise fail(None, key, f"is unknown (known keys: {', '.join(_TOP)})")
        typ, desc = _TOP[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise fail(None, key, f"must be {desc}, not {_toml_type(value)}")
    for key in ("backup_root", "domains"):
        if key not in data:
            raise JobFileError(f"job file {path}: key '{key}' is missing")

    root = Path(data["backup_root"])
    if not root.is_absolute():
        raise fail(None, "backup_root", f"must be an absolute path, not {str(root)!r}")
    if not root.is_dir():
        raise fail(None, "backup_root", f"names {root}, which is not an existing directory")
    globs: Dict[str, List[str]] = {}
    for key in ("domains", "exclude"):
        items = data.get(key, [])
        if key == "domains" and not items:
            raise fail(None, key, "must name at least one domain or glob")
        for item in items:
            if not isinstance(item, str):
                raise fail(None, key, f"must be a list of strings, not a list holding {_toml_type(item)}")
            problem = glob_problem(item)
            if problem:
                raise fail(None, key, f"has a bad name or glob {item!r}: it {problem}")
        globs[key] = list(items)
    level = data.get("level", "auto")
    if level not in REQUESTED_LEVELS:
        raise fail(None, "level", f"must be one of {', '.join(REQUESTED_LEVELS)}, not {level!r}")
    quiesce = data.get("quiesce", "auto")
    if quiesce not in QUIESCE_MODES:
        raise fail(None, "quiesce", f"must be one of {', '.join(QUIESCE_MODES)}, not {quiesce!r}")
    for key, most in (("full_every_days", MAX_FULL_EVERY_DAYS), ("max_chain", MAX_CHAIN)):
        if not 0 <= data.get(key, 0) <= most:
            raise fail(None, key, f"must be from 0 (no limit) to {most}, not {data[key]}")
    parallel = data.get("parallel", 1)
    if not 1 <= parallel <= MAX_PARALLEL:
        raise fail(None, "parallel", f"must be from 1 to {MAX_PARALLEL}, not {parallel}")
    metrics: Optional[Path] = None
    if "metrics_file" in data:
        metrics = Path(data["metrics_file"])
        if not metrics.is_absolute():
            raise fail(None, "metrics_file", f"must be an absolute path, not {str(metrics)!r}")
        if not metrics.parent.is_dir():
            raise fail(None, "metrics_file", f"names a file in {metrics.parent}, which is not an existing directory")
        if metrics.is_dir():
            raise fail(None, "metrics_file", f"names {metrics}, which is a directory")
        from virtbackup.store import metrics as metrics_store
        try:        # a device node, a fifo, a symlink or another file at the name: refused, not replaced
            metrics_store.check_target(metrics)
        except VirtBackupError as e:
            raise fail(None, "metrics_file", f"is refused: {e}") from None
    retention: Optional[Policy] = None
    if "retention" in data:
        r = data["retention"]
        for key, value in r.items():
            if key not in _RETENTION:
                raise fail("retention", key, f"is unknown (known keys: {', '.join(_RETENTION)})")
            if not isinstance(value, int) or isinstance(value, bool):
                raise fail("retention", key, f"must be a whole number, not {_toml_type(value)}")
            if value < 0:
                raise fail("retention", key, f"must not be negative, not {value}")
        retention = Policy(**{k: r.get(k, 0) for k in _RETENTION})
        if not any(r.get(k, 0) for k in _RETENTION):
            raise fail(None, "retention", "keeps nothing: set keep, keep_daily, keep_weekly and/or keep_monthly")
    offsite_target: Optional[OffsiteTarget] = None
    if "offsite" in data:
        from virtbackup.offsite import MAX_LOCK_DAYS, parse_url
        o = data["offsite"]
        for key, value in o.items():
            if key not in _OFFSITE:
                raise fail("offsite", key, f"is unknown (known keys: {', '.join(_OFFSITE)})")
            typ, desc = _OFFSITE[key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise fail("offsite", key, f"must be {desc}, not {_toml_type(value)}")
        if "url" not in o:
            raise JobFileError(f"job file {path}: key 'offsite.url' is missing")
        try:
            parse_url(o["url"])
        except UsageError as e:
            raise fail("offsite", "url", f"is not usable: {e}") from None
        if "lock_days" in o and not 1 <= o["lock_days"] <= MAX_LOCK_DAYS:
            raise fail("offsite", "lock_days", f"must be from 1 to {MAX_LOCK_DAYS}, not {o['lock_days']}")
        for key in ("profile", "endpoint_url"):
            if key in o and not o[key].strip():
                raise fail("offsite", key, "must not be empty")
        offsite_target = OffsiteTarget(o["url"], o.get("lock_days"), o.get("profile"), o.get("endpoint_url"))
    settings, per_domain = _load_settings(data, globs["domains"], fail)
    return Job(path=path, name=path.stem, backup_root=root, domains=globs["domains"],
               exclude=globs.get("exclude", []), level=level,
               full_every_days=data.get("full_every_days", 0), max_chain=data.get("max_chain", 0),
               quiesce=quiesce, parallel=parallel, metrics_file=metrics, retention=retention,
               allow_empty=data.get("allow_empty", False), offsite=offsite_target,
               settings=settings, per_domain=per_domain)


_Fail = Callable[[Optional[Union[str, Tuple[str, ...]]], str, str], JobFileError]


def _load_settings(data: Dict[str, Any], domains: Sequence[str],
                   fail: _Fail) -> Tuple[DomainSettings, Dict[str, DomainSettings]]:
    """key_file, encrypt, compress, mode and scratch_dir of the top level and of each
    [domain."NAME"] table (merged over the top level). Every key file is checked here, so a bad
    one stops the run before any domain is touched (also `run --dry-run`)."""
    checked: Dict[Path, Optional[str]] = {}

    def one(table: Dict[str, Any], section: Optional[Tuple[str, ...]], base: DomainSettings) -> DomainSettings:
        key_file = base.key_file
        if "key_file" in table:
            key_file = Path(table["key_file"])
            if not key_file.is_absolute():
                raise fail(section, "key_file", f"must be an absolute path, not {str(key_file)!r}")
            if key_file not in checked:
                checked[key_file] = key_file_problem(key_file)
            problem = checked[key_file]
            if problem:
                raise fail(section, "key_file", f"is refused: {problem}")
        compress = table.get("compress", base.compress)
        if compress is not None and compress not in COMPRESSIONS:
            raise fail(section, "compress", f"must be one of {', '.join(COMPRESSIONS)}, not {compress!r}")
        mode = table.get("mode", base.mode)
        if mode is not None and mode not in BACKUP_MODES:
            raise fail(section, "mode", f"must be one of {', '.join(BACKUP_MODES)}, not {mode!r}")
        scratch_dir = table.get("scratch_dir", base.scratch_dir)
        if "scratch_dir" in table and not os.path.isabs(str(scratch_dir)):
            raise fail(section, "scratch_dir", f"must be an absolute path on the hypervisor, not {scratch_dir!r}")
        if "scratch_dir" in table and has_control_chars(str(scratch_dir)):
            raise fail(section, "scratch_dir", f"must not contain control characters: {scratch_dir!r}")
        if scratch_dir is not None and mode == "push":
            if "scratch_dir" not in table:
                scratch_dir = None          # the top level's, for its pull domains: not this push one's
            elif "mode" in table or section is None:
                # backup refuses it too: say it in the job file's terms, before any domain is touched
                raise fail(section, "scratch_dir", f'is {scratch_dir!r}, but mode is "push" here: scratch files '
                                                   'are for pull mode; set mode = "pull" or leave mode out')
            else:
                raise fail(section, "scratch_dir", f'is {scratch_dir!r}, but the top level\'s mode = "push" '
                                                   'applies here: scratch files are for pull mode; set '
                                                   'mode = "pull" in this table')
        out = DomainSettings(key_file, table.get("encrypt", base.encrypt), compress, mode, scratch_dir)
        if out.encrypt and out.key_file is None:
            raise fail(section, "encrypt", "is true, but there is no key_file to encrypt with")
        if out.key_file is not None and out.compress not in (None, "none"):
            # backup refuses it too (QEMU 7.2 writes no compressed clusters into LUKS qcow2): say it now
            why = "encrypted images are stored uncompressed (QEMU writes no compressed clusters into LUKS qcow2)"
            if "compress" in table:
                raise fail(section, "compress", f'is "{out.compress}", but key_file {out.key_file} applies here: '
                                                f'{why}; set compress = "none" or leave it out')
            raise fail(section, "key_file", f'encrypts, but compress = "{out.compress}" applies here: {why}; '
                                            'set compress = "none" beside it')
        return out

    top = one(data, None, DomainSettings())
    per_domain: Dict[str, DomainSettings] = {}
    for name, table in data.get("domain", {}).items():
        section = ("domain", name)
        if not isinstance(table, dict):
            raise fail(("domain",), name, f"must be a table, not {_toml_type(table)}")
        problem = unsafe_dir_name(name)
        if problem:
            raise fail(("domain",), name, f"names a domain a job never backs up: {problem}")
        if not any(pat == name or fnmatch.fnmatchcase(name, pat) for pat in domains):
            raise fail(("domain",), name, "names a domain that key 'domains' does not select (by name or glob)")
        for key, value in table.items():
            if key not in _DOMAIN:
                raise fail(section, key, f"is unknown (known keys: {', '.join(_DOMAIN)})")
            typ, desc = _DOMAIN[key]
            if not isinstance(value, typ):
                raise fail(section, key, f"must be {desc}, not {_toml_type(value)}")
        per_domain[name] = one(table, section, top)
    return top, per_domain


def key_file_problem(path: Path) -> Optional[str]:
    """Why a job's key file is refused (None: it is fine): what `backup --key-file` refuses
    (crypto.read_key: missing, a symlink, not a regular file, accessible by other users, empty,
    not a passphrase), and a file owned by anyone but root or us (they could change our key).
    The key read here is dropped at once: the child reads the file itself."""
    from virtbackup.store import crypto
    try:
        crypto.read_key(str(path))
        st = os.lstat(path)
    except UsageError as e:
        return str(e)
    except OSError as e:
        return f"cannot read key file {path}: {e.strerror}"
    if st.st_uid not in (0, os.geteuid()):
        return f"key file {path} is owned by uid {st.st_uid}, not by root or by this user (uid {os.geteuid()})"
    return None


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table"}
    return next((n for t, n in names.items() if type(value) is t), f"a {type(value).__name__}")


# --- selection ---------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A libvirt domain as selection sees it."""

    name: str
    uuid: str
    active: bool
    persistent: bool


@dataclass
class Selected:
    name: str
    uuid: str
    active: bool
    backup_dir: Optional[Path]                 # None when the domain is not backed up (see `problem`)
    problem: Optional[str] = None              # why it is reported instead of backed up
    fails: bool = False                        # the problem makes the run fail (named explicitly)


def select(job: Job, candidates: Sequence[Candidate], only: Sequence[str] = ()) -> List[Selected]:
    """Which domains the job backs up, in name order (pure).

    A domain matched only by a glob but transient or unsafely named is reported `skipped`; one
    the job (or `--domain`) names explicitly fails the run instead: it was asked for. A name in
    the file that matches no domain fails too (a deleted domain must not go unnoticed).
    """
    by_name = {c.name: c for c in candidates}

    def matches(pat: str) -> List[str]:
        # an exact name wins over a glob: "hx-g[1]" is the domain of that name when there is one,
        # not the glob that would pick "hx-g1"
        return [pat] if pat in by_name else [n for n in by_name if fnmatch.fnmatchcase(n, pat)]

    picked: Dict[str, bool] = {}               # name -> named explicitly
    missing: List[str] = []
    for pat in job.domains:
        hits = matches(pat)
        if not is_glob(pat) and not hits:
            missing.append(pat)
        for n in hits:
            picked[n] = picked.get(n, False) or not is_glob(pat) or pat == n
    excluded = {n for pat in job.exclude for n in matches(pat)}
    for n in list(picked):
        if n in excluded:
            del picked[n]
    for name in only:
        if name not in picked and name not in missing:
            raise UsageError(f"domain '{name}' is not selected by job file {job.path} "
                             "(or is excluded there)")
    out: List[Selected] = []
    for name in missing:
        if not only or name in only:
            out.append(Selected(name, "", False, None, f"domain '{name}' not found", fails=True))
    for name in sorted(picked):
        if only and name not in only:
            continue
        c = by_name[name]
        explicit = picked[name] or name in only
        problem = unsafe_dir_name(name)
        if problem:
            problem = f"domain {name!r} is not backed up: {problem}"
        elif not c.persistent:
            problem = (f"domain '{name}' is transient (not defined in libvirt): it cannot keep "
                       "checkpoints across restarts; define it to back it up")
        bdir = None if problem else job.backup_root / name
        out.append(Selected(name, c.uuid, c.active, bdir, problem, fails=bool(problem) and explicit))
    return sorted(out, key=lambda s: s.name)


def list_candidates(uri: Optional[str]) -> List[Candidate]:
    import libvirt

    from virtbackup.virt import host
    out = []
    with host.connection(uri) as conn:
        for d in host.call(conn.listAllDomains, 0):
            try:
                out.append(Candidate(d.name(), d.UUIDString(), bool(d.isActive()), bool(d.isPersistent())))
            except libvirt.libvirtError:
                continue            # undefined between the listing and the question: not a candidate
    return out


# --- planning ----------------------------------------------------------------------------------
def choose_level(job: Job, chain: Optional[Chain], now: Optional[datetime] = None) -> Tuple[str, Optional[str]]:
    """The level to ask `backup` for, and why when the job's limits force a new chain (pure).

    `auto` stays `auto` unless full_every_days or max_chain say the current chain is done:
    backup's own auto then still decides inc or full from the bitmaps' health.
    """
    if job.level != "auto" or chain is None or not chain.points:
        return job.level, None
    last = chain.points[-1]
    full = chain.chain_full(last)
    length = sum(1 for p in chain.points if p.chain == full.id)
    if job.max_chain and length >= job.max_chain:
        return "full", f"new chain: chain of point {full.id} has {length} point(s) (max_chain = {job.max_chain})"
    now = now or datetime.now(timezone.utc)
    if job.full_every_days and now - point_time(full) >= timedelta(days=job.full_every_days):
        age = (now - point_time(full)).total_seconds() / 86400
        return "full", (f"new chain: full point {full.id} is {age:.1f} days old "
                        f"(full_every_days = {job.full_every_days})")
    return "auto", None


def prune_preview(chain: Optional[Chain], retention: Optional[Policy],
                  now: Optional[datetime] = None) -> List[str]:
    """Point ids the prune after the next backup would drop (pure; the new point counts)."""
    from virtbackup.store.retention import decide
    if retention is None or chain is None:
        return []
    when = (now or datetime.now(timezone.utc)).replace(microsecond=0).isoformat()
    upcoming = Point(id="next", level="inc", created=when, checkpoint="", base_checkpoint=None, parent=None,
                     chain="next", disks={}, domain_xml="", checkpoint_xml="")
    return [d.point for d in decide([*chain.points, upcoming], retention) if not d.keep]


def _owned_chain(s: Selected) -> Tuple[Optional[Chain], Optional[str]]:
    """This domain's chain in its directory, or the reason its backup will fail (read only)."""
    assert s.backup_dir is not None
    bdir = BackupDir(s.backup_dir)
    try:
        chain = bdir.load_or_none()
        if chain is not None:
            bdir.check_owner(chain, s.name, s.uuid)
    except (BackupDirError, ChainCorrupt) as e:
        return None, str(e)
    return chain, None


@dataclass
class PlannedDomain:
    domain: str
    action: str                                # backup | skip | fail
    backup_dir: Optional[str]
    level: Optional[str]
    why: Optional[str]
    prune_drops: List[str] = field(default_factory=list)
    error: Optional[str] = None


def plan(job: Job, selected: Sequence[Selected], now: Optional[datetime] = None) -> List[PlannedDomain]:
    """What `run` would do for each domain, and why (reads only; changes nothing)."""
    out = []
    for s in selected:
        if s.problem:
            out.append(PlannedDomain(s.name, "fail" if s.fails else "skip", None, None, None, error=s.problem))
            continue
        assert s.backup_dir is not None
        chain, problem = _owned_chain(s)
        settings = job.for_domain(s.name)
        problem = problem or settings.chain_problem(chain, s.backup_dir, job.path)
        if problem:
            out.append(PlannedDomain(s.name, "fail", str(s.backup_dir), None, None, error=problem))
            continue
        level, why = choose_level(job, chain, now)
        if why is None:
            if level == "auto":
                last = chain.points[-1] if chain and chain.points else None
                why = (f"incremental on point {last.id} if its checkpoint's bitmaps are intact, else a full"
                       if last else "full: no previous backup in this directory")
            else:
                why = f"level = {level}"
        how = "running" if s.active else "shut off: private QEMU"
        if settings.key_file is not None:
            how += f", encrypted with key file {settings.key_file}"
        if settings.compress is not None:
            how += f", compress {settings.compress}"
        mode = settings.mode if settings.mode not in (None, "auto") else \
            ("pull" if settings.scratch_dir is not None else settings.mode)   # as backup decides
        if s.active and mode is not None:
            how += f", mode {mode}"
        if s.active and settings.scratch_dir is not None:
            how += f", scratch files in {settings.scratch_dir!r}"
        out.append(PlannedDomain(s.name, "backup", str(s.backup_dir), level, f"{why} ({how})",
                                 prune_preview(chain, job.retention, now)))
    return out


# --- running -----------------------------------------------------------------------------------
@dataclass
class DomainResult:
    domain: str
    status: str                                # ok | failed | skipped
    level: Optional[str] = None
    point: Optional[str] = None
    bytes: int = 0
    seconds: float = 0.0
    error: Optional[str] = None
    backup_dir: Optional[str] = None
    reason: Optional[str] = None               # why the level (a new chain forced by the job)
    pruned: List[str] = field(default_factory=list)
    points: Optional[int] = None               # points in the directory after the run
    chain_length: Optional[int] = None         # points in the newest chain after the run
    last_success: Optional[float] = None       # unix time the newest recorded point finished
    stored_bytes: Optional[int] = None         # image bytes the directory's points hold after the run
    compression_ratio: Optional[float] = None  # guest data per stored byte (chain.data_ratio)
    warnings: List[str] = field(default_factory=list)
    # the [offsite] push after the backup and prune: {"url", "bytes_sent", "points_sent",
    # "lag_points" (local points the remote lacks), "last_success" (unix time) or "error"}
    offsite: Optional[Dict[str, Any]] = None


@dataclass
class RunResult:
    job: str
    started: str
    finished: str
    domains: List[DomainResult]
    interrupted: Optional[str] = None          # the signal that stopped the run
    started_ts: float = 0.0
    finished_ts: float = 0.0
    error: Optional[str] = None                # a problem of the run itself (the metrics file)

    def to_json(self) -> Dict[str, Any]:
        """The `run --json` output (schemas/run.schema.json)."""
        return result_json(self)

    @property
    def ok(self) -> bool:
        """No domain failed and the run was not stopped (domains reported `skipped` for what
        they are, e.g. transient, do not fail a run)."""
        return self.error is None and self.interrupted is None and all(d.status != "failed" for d in self.domains)


# What a running domain's backup is doing, for progress displays: name -> phase
Watcher = Callable[[str, str, Optional[str]], None]      # (domain, phase, uuid)


# A child ignores SIGINT/SIGTERM from its first line on, except where a backup takes them itself:
# while its job runs (host.signals_noted: abort, roll back) and while it commits (noted only).
# So a stop reaches a child either before it did anything (killed during interpreter start-up:
# nothing to undo) or while its job runs (aborted and rolled back, as `backup` does); between
# those it goes on to the next of them, and the runner repeats the signal until the child ends.
IGNORE_SIGNALS = ("import signal, sys\n"
                  "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n")
_CHILD = IGNORE_SIGNALS + "sys.argv[0] = 'virtbackup'\nfrom virtbackup.cli import main\nmain()\n"
RESEND_SECONDS = 0.5


def _cli(uri: Optional[str], *args: str) -> List[str]:
    return [sys.executable, "-c", _CHILD, *(["-c", uri] if uri else []), *args]


def backup_args(job: Job, s: Selected, level: str, reason: Optional[str]) -> List[str]:
    """The `virtbackup backup` arguments of one domain of a job (the key by its file's path only)."""
    assert s.backup_dir is not None
    args = ["backup", s.uuid, str(s.backup_dir), "--level", level, "--json"]
    if reason:
        args.append(f"--reason={reason}")        # `list` then says why the chain broke
    args.append(f"--quiesce={job.quiesce}")
    return [*args, *job.for_domain(s.name).backup_args()]


def _child_error(out: str, err: str, rc: int) -> str:
    """The child's one-line error: from its JSON, else its `virtbackup: error:` line."""
    try:
        data = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return str(data["error"].get("message"))
    except ValueError:
        pass
    lines = [ln[len("virtbackup: error: "):] for ln in err.splitlines() if ln.startswith("virtbackup: error: ")]
    if lines:
        return lines[-1]
    if rc < 0:
        return f"virtbackup was killed by {signal.Signals(-rc).name}"
    tail = [ln for ln in err.splitlines() if ln.strip()]
    return tail[-1] if tail else f"exit status {rc}"


def _finish_stats(r: DomainResult, s: Selected) -> None:
    """Points and chain length after the run, and when the last good backup ended (read only)."""
    if s.backup_dir is None:
        return
    chain, problem = _owned_chain(s)
    if problem or chain is None or not chain.points:
        return
    last = chain.points[-1]
    r.points = len(chain.points)
    r.chain_length = sum(1 for p in chain.points if p.chain == last.chain)
    r.last_success = point_time(last).timestamp() + last.duration
    images = [i for p in chain.points for i in p.disks.values()]
    r.stored_bytes = sum(i.size for i in images)
    r.compression_ratio = data_ratio(images)


class JobRun:
    """Runs the selected domains' backups (`parallel` child processes at a time)."""

    def __init__(self, job: Job, selected: Sequence[Selected], uri: Optional[str],
                 watch: Optional[Watcher] = None):
        self.job = job
        self.selected = list(selected)
        self.uri = uri
        self.watch = watch or (lambda _d, _p, _u: None)
        self._lock = threading.Lock()
        self._procs: Dict[str, subprocess.Popen] = {}
        self._stop: Optional[str] = None

    # -- signals (main thread) -----------------------------------------------------------------
    def stop(self, why: str) -> None:
        """Start nothing new; pass the signal to every running child (it aborts and rolls back)."""
        with self._lock:
            self._stop = self._stop or why
        self._signal_children()

    def _signal_children(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        sig = signal.SIGINT if self._stop == "SIGINT" else signal.SIGTERM
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    # -- one domain (worker thread) ------------------------------------------------------------
    def _spawn(self, s: Selected, args: List[str], progress_fd: Optional[int] = None) -> Optional[subprocess.Popen]:
        with self._lock:
            if self._stop is not None:
                return None
            if progress_fd is not None:
                args = [*args, "--progress-fd", str(progress_fd)]
            # own session: a terminal's Ctrl-C reaches the child once, forwarded by stop()
            proc = subprocess.Popen(_cli(self.uri, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                    pass_fds=() if progress_fd is None else (progress_fd,))
            self._procs[s.name] = proc
            return proc

    def _progress_pipe(self, s: Selected) -> Tuple[Optional[int], Optional[threading.Thread]]:
        """When someone listens: a pipe the child's backup writes its progress events into (JSON
        lines, `backup --progress-fd`), forwarded as this run's events with `domain` set by a
        thread that ends when the child closes it. Returns the child's end and the thread."""
        if not observe.listening():
            return None, None
        rfd, wfd = os.pipe()

        def forward() -> None:
            with os.fdopen(rfd, "r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        ev = observe.ProgressEvent.from_json(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue
                    observe.forward(observe.ProgressEvent(ev.operation, ev.phase, ev.disk, ev.done, ev.total,
                                                          ev.unit, s.name))

        t = observe.thread(forward, f"progress-{s.name}")
        t.start()
        return wfd, t

    def _communicate(self, s: Selected, proc: subprocess.Popen) -> Tuple[int, str, str]:
        out, err = proc.communicate()
        with self._lock:
            self._procs.pop(s.name, None)
        return proc.returncode, out, err

    def run_one(self, s: Selected) -> DomainResult:
        r = DomainResult(s.name, "skipped", backup_dir=str(s.backup_dir) if s.backup_dir else None)
        if s.problem:
            r.status, r.error = ("failed" if s.fails else "skipped"), s.problem
            return r
        if self._stop is not None:              # a worker freed by a stopped backup: start nothing
            r.error = f"not started: the run was stopped by {self._stop}"
            _finish_stats(r, s)
            self.watch(s.name, "skipped", s.uuid)
            return r
        t0 = time.monotonic()
        try:
            assert s.backup_dir is not None
            chain, problem = _owned_chain(s)
            settings = self.job.for_domain(s.name)
            key_problem = None if problem else settings.chain_problem(chain, s.backup_dir, self.job.path)
            if key_problem:                 # refused before a child is started: nothing touched
                r.status, r.error = "failed", key_problem
                return r
            level, r.reason = ("auto", None) if problem else choose_level(self.job, chain)
            self.watch(s.name, "backup", s.uuid)
            args = backup_args(self.job, s, level, r.reason)
            wfd, forwarding = self._progress_pipe(s)
            try:
                proc = self._spawn(s, args, wfd)
            finally:
                if wfd is not None:
                    os.close(wfd)           # the child has its own copy: EOF when it ends
            if proc is None:
                r.error = f"not started: the run was stopped by {self._stop}"
                return r
            rc, out, err = self._communicate(s, proc)
            if forwarding is not None:
                forwarding.join(10)         # its last events are delivered before the result
            r.warnings = [ln[len("virtbackup: "):] for ln in err.splitlines()
                          if ln.startswith("virtbackup: warning: ")]
            if rc in (-signal.SIGINT, -signal.SIGTERM) and self._stop is not None:
                # killed in interpreter start-up, before it ignored the signal: it did nothing
                r.error = f"not started: the run was stopped by {self._stop}"
                return r
            if rc != 0:
                r.status, r.error = "failed", _child_error(out, err, rc)
                return r
            point = json.loads(out)["point"]
            r.status, r.level, r.point, r.bytes = "ok", point["level"], point["id"], int(point["size"])
            if self.job.retention is not None:
                self.watch(s.name, "prune", s.uuid)
                proc = self._spawn(s, ["prune", str(s.backup_dir), *self.job.retention.prune_args(),
                                       *settings.prune_args(), "--json"])
                if proc is None:
                    r.warnings.append(f"prune not run: the run was stopped by {self._stop}")
                    return r
                rc, out, err = self._communicate(s, proc)
                if rc != 0 and self._stop is not None:
                    # a prune is crash-safe: stopped anywhere, the directory holds the old or the
                    # new chain and the next prune finishes the job; the backup itself is recorded
                    r.warnings.append(f"prune stopped by {self._stop}; the next run prunes")
                    return r
                if rc != 0:
                    r.status = "failed"
                    r.error = f"point {r.point} was recorded, but prune failed: {_child_error(out, err, rc)}"
                    return r
                r.pruned = list(json.loads(out)["dropped"])
            if self.job.offsite is not None:
                self._push_offsite(s, r, self.job.offsite)
            return r
        except (OSError, ValueError, KeyError, VirtBackupError) as e:
            r.status, r.error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, VirtBackupError) else str(e)
            return r
        finally:
            r.seconds = round(time.monotonic() - t0, 3)
            _finish_stats(r, s)
            self.watch(s.name, r.status, s.uuid)

    def _push_offsite(self, s: Selected, r: DomainResult, target: OffsiteTarget) -> None:
        """`offsite push` of the domain's dir (the point is recorded whatever happens here). The
        child takes SIGINT/SIGTERM (it is not started with them ignored): a push killed anywhere
        leaves the remote's previous chain, and the next run resumes its parts."""
        assert s.backup_dir is not None
        url = target.domain_url(s.name)
        with self._lock:
            if self._stop is not None:
                r.warnings.append(f"offsite push not run: the run was stopped by {self._stop}")
                return
            self.watch(s.name, "offsite", s.uuid)
            cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'virtbackup'\n"
                   "from virtbackup.cli import main\nmain()\n", *target.push_args(s.backup_dir, s.name)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    text=True, start_new_session=True)
            self._procs[s.name] = proc
        rc, out, err = self._communicate(s, proc)
        if rc != 0 and self._stop is not None:
            r.warnings.append(f"offsite push stopped by {self._stop}; the next run resumes it")
            r.offsite = {"url": url, "error": f"stopped by {self._stop}"}
            return
        if rc != 0:
            r.status = "failed"
            r.error = f"point {r.point} was recorded, but the offsite push failed: {_child_error(out, err, rc)}"
            r.offsite = {"url": url, "error": r.error}
            return
        data = json.loads(out)
        r.offsite = {"url": data["url"], "bytes_sent": data["bytes_sent"], "points_sent": data["points_sent"],
                     "lag_points": 0, "last_success": time.time()}

    def _skipped(self, name: str) -> DomainResult:
        s = next(x for x in self.selected if x.name == name)
        r = DomainResult(name, "skipped", error=f"not started: the run was stopped by {self._stop}",
                         backup_dir=str(s.backup_dir) if s.backup_dir else None)
        _finish_stats(r, s)
        self.watch(name, "skipped", s.uuid)
        return r

    # -- the whole run (main thread) -----------------------------------------------------------
    def run(self) -> RunResult:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        started, t0 = now_iso(), time.time()
        results: Dict[str, DomainResult] = {}
        for s in self.selected:
            self.watch(s.name, "queued", s.uuid)
        # a cancel of the run (observe.Cancel, any thread) stops it like a signal does
        with _forward_signals(self.stop), observe.cancel_handle().on_cancel(self.stop):
            with ThreadPoolExecutor(max_workers=self.job.parallel, thread_name_prefix="job") as pool:
                # each domain's progress events go to this run's callback (its context, copied per task)
                futures = {s.name: observe.submit(pool, self.run_one, s) for s in self.selected}
                pending = dict(futures)
                resent = 0.0
                while pending:
                    # short waits: the signal handlers run in this thread between them
                    wait(list(pending.values()), timeout=0.2, return_when=FIRST_COMPLETED)
                    if self._stop is not None and time.monotonic() - resent >= RESEND_SECONDS:
                        self._signal_children()    # a child past start-up ignores it until its job runs
                        resent = time.monotonic()
                    if self._stop is not None:
                        for name, fut in list(pending.items()):
                            if fut.cancel():              # queued, never started
                                results[name] = self._skipped(name)
                                del pending[name]
                    for name, fut in list(pending.items()):
                        if fut.done():
                            results[name] = fut.result()
                            del pending[name]
        return RunResult(self.job.name, started, now_iso(), [results[s.name] for s in self.selected],
                         self._stop, started_ts=t0, finished_ts=time.time())


class _forward_signals:
    """SIGINT/SIGTERM call `stop(name)` while a run is in progress (main thread only)."""

    def __init__(self, stop: Callable[[str], None]):
        self._stop = stop
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: object) -> None:
            self._stop(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, handler)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(job: Job, uri: Optional[str] = None, only: Sequence[str] = (),
        watch: Optional[Watcher] = None) -> RunResult:
    """Back up and prune every selected domain; write the metrics file when the job names one."""
    with job_lock(job):
        selected = select(job, list_candidates(uri), only)
        result = JobRun(job, selected, uri, watch).run()
    if not selected and not job.allow_empty:
        # a typo in `domains`, or an `exclude` that covers everything: not a successful night
        result.error = (f"job file {job.path} selects no domain (its domains and exclude match none); "
                        "set allow_empty = true if that is expected")
    if job.metrics_file is not None:
        from virtbackup.store import metrics
        try:
            metrics.write(job.metrics_file, result)
        except VirtBackupError as e:
            result.error = str(e)
    return result


def job_lock(job: Job) -> FileLock:
    """One run of a job file at a time (a timer and a hand-started run would race for every
    domain's lock and for the metrics file); flock, so a killed run never leaves it stale."""
    import hashlib

    from virtbackup import env
    key = hashlib.sha256(str(job.path.resolve()).encode()).hexdigest()[:16]
    return FileLock(env.run_dir() / f"job-{key}.lock", f"job file {job.path}", run_dir=True)


@dataclass
class JobPlan:
    """What `run --dry-run` reports: per domain what would be done and why."""

    job: Job
    domains: List[PlannedDomain]

    def to_json(self) -> Dict[str, Any]:
        return plan_json(self.job, self.domains)


def dry_run(job: Job, uri: Optional[str] = None, only: Sequence[str] = ()) -> JobPlan:
    return JobPlan(job, plan(job, select(job, list_candidates(uri), only)))


def domain_json(d: DomainResult) -> Dict[str, Any]:
    return {"domain": d.domain, "status": d.status, "level": d.level, "point": d.point, "bytes": d.bytes,
            "seconds": d.seconds, "error": d.error, "backup_dir": d.backup_dir, "reason": d.reason,
            "pruned": d.pruned, "points": d.points, "chain_length": d.chain_length,
            "stored_bytes": d.stored_bytes, "compression_ratio": d.compression_ratio, "warnings": d.warnings,
            **({"offsite": d.offsite} if d.offsite is not None else {})}


def result_json(r: RunResult) -> Dict[str, Any]:
    return {"job": r.job, "started": r.started, "finished": r.finished, "interrupted": r.interrupted,
            "ok": r.ok, "error": r.error, "domains": [domain_json(d) for d in r.domains]}


def plan_json(job: Job, planned: Sequence[PlannedDomain]) -> Dict[str, Any]:
    return {"job": job.name, "dry_run": True,
            "domains": [{"domain": p.domain, "action": p.action, "backup_dir": p.backup_dir, "level": p.level,
                         "why": p.why, "prune_drops": p.prune_drops, "error": p.error} for p in planned]}


