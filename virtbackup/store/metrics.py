"""Prometheus text-format metrics of a job run, for node_exporter's textfile collector.

The file is rewritten whole after every run (temp file in the same directory, fsync, rename):
the collector never reads half a file, and a domain that left the job leaves the file too.
It is mode 0644: it holds no guest data and node_exporter usually runs as another user.

The file is ours or it is left alone: its directory must be owned by root (or us) and not
writable by other users unless sticky, and what is at its name must be absent, empty or a
regular file of ours that starts with our header line (`# HELP virtbackup_`). A device node
(`/dev/null`), fifo, symlink or anybody else's file is refused (exit 2), never replaced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

from virtbackup.store.chain import check_replaceable, checked_dir, replace_file

WHAT = "a metrics file"
HEADER = b"# HELP virtbackup_"     # the first line of every file render() makes


def is_ours(head: bytes) -> bool:
    """Does a file starting with `head` look like one this module wrote?"""
    return head.startswith(HEADER)


def check_target(path: Path) -> None:
    """Refuse (UnsafePath, exit 2) a metrics file path `write` would refuse, before a run starts."""
    path = Path(path)
    dfd = checked_dir(path.parent, WHAT)
    try:
        check_replaceable(dfd, path.name, path, WHAT, is_ours)
    finally:
        os.close(dfd)


class DomainRun(Protocol):
    """What the metrics need of one domain's result (jobs.DomainResult)."""

    domain: str
    status: str
    seconds: float
    bytes: int
    points: Optional[int]
    chain_length: Optional[int]
    last_success: Optional[float]
    stored_bytes: Optional[int]             # image bytes of every point in the directory
    compression_ratio: Optional[float]      # guest data per stored byte
    offsite: Optional[Dict[str, Any]]       # the job's [offsite] push of this domain, if it ran


class RunResult(Protocol):
    """What the metrics need of a run (jobs.RunResult); jobs imports this module, not the reverse."""

    job: str
    interrupted: Optional[str]
    started_ts: float
    finished_ts: float

    @property
    def domains(self) -> Sequence[DomainRun]: ...

    @property
    def ok(self) -> bool: ...

STATUSES = ("ok", "failed", "skipped")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def render(result: RunResult) -> str:
    """The whole file's text (pure)."""
    job = result.job
    families: List[Tuple[str, str, str, List[Tuple[Dict[str, str], float]]]] = []

    def family(name: str, help_: str, samples: Iterable[Tuple[Dict[str, str], Optional[float]]],
               typ: str = "gauge") -> None:
        families.append((name, help_, typ, [(lb, v) for lb, v in samples if v is not None]))

    doms = result.domains
    family("virtbackup_job_start_time_seconds", "Unix time the job's last run started.",
           [({"job": job}, result.started_ts)])
    family("virtbackup_job_end_time_seconds", "Unix time the job's last run ended.",
           [({"job": job}, result.finished_ts)])
    family("virtbackup_job_success", "1 when no domain of the last run failed and it was not stopped.",
           [({"job": job}, 1 if result.ok else 0)])
    family("virtbackup_job_interrupted", "1 when the last run was stopped by a signal.",
           [({"job": job}, 1 if result.interrupted else 0)])
    family("virtbackup_job_domains", "Domains of the last run by status.",
           [({"job": job, "status": st}, sum(1 for d in doms if d.status == st)) for st in STATUSES])
    family("virtbackup_domain_status", "1 for the domain's status in the job's last run (ok, failed, skipped).",
           [({"job": job, "domain": d.domain, "status": st}, 1 if d.status == st else 0)
            for d in doms for st in STATUSES])
    family("virtbackup_domain_last_success_time_seconds",
           "Unix time the domain's newest recorded backup ended (any run, not only the last).",
           [({"job": job, "domain": d.domain}, d.last_success) for d in doms])
    family("virtbackup_domain_duration_seconds", "Seconds the domain's backup and prune took in the last run.",
           [({"job": job, "domain": d.domain}, d.seconds) for d in doms if d.status != "skipped"])
    family("virtbackup_domain_bytes_written", "Bytes of image files the domain's last run wrote (0 when it failed).",
           [({"job": job, "domain": d.domain}, d.bytes) for d in doms if d.status != "skipped"])
    family("virtbackup_domain_bytes_stored", "Bytes of image files all points in the domain's backup directory hold.",
           [({"job": job, "domain": d.domain}, d.stored_bytes) for d in doms])
    family("virtbackup_domain_compression_ratio",
           "Guest data bytes per stored byte in the domain's backup directory (1: uncompressed).",
           [({"job": job, "domain": d.domain}, d.compression_ratio) for d in doms])
    family("virtbackup_domain_points", "Restore points kept in the domain's backup directory.",
           [({"job": job, "domain": d.domain}, d.points) for d in doms])
    family("virtbackup_domain_chain_length",
           "Points in the domain's newest chain (its full and what is layered on it).",
           [({"job": job, "domain": d.domain}, d.chain_length) for d in doms])
    pushed = [d for d in doms if d.offsite is not None]
    family("virtbackup_domain_offsite_success",
           "1 when the domain's off-site push ([offsite]) in the last run succeeded, 0 when it failed or was stopped.",
           [({"job": job, "domain": d.domain}, 0 if (d.offsite or {}).get("error") else 1) for d in pushed])
    family("virtbackup_domain_offsite_bytes_sent", "Bytes the domain's off-site push sent in the last run.",
           [({"job": job, "domain": d.domain}, (d.offsite or {}).get("bytes_sent")) for d in pushed])
    family("virtbackup_domain_offsite_last_success_time_seconds",
           "Unix time the domain's off-site push last succeeded (in the last run; absent when it failed).",
           [({"job": job, "domain": d.domain}, (d.offsite or {}).get("last_success")) for d in pushed])
    family("virtbackup_domain_offsite_lag_points",
           "Local points the remote lacks after the last run's push (0 after a successful push).",
           [({"job": job, "domain": d.domain}, (d.offsite or {}).get("lag_points")) for d in pushed])
    lines: List[str] = []
    for name, help_, typ, samples in families:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {typ}")
        for lb, v in samples:
            lines.append(f"{name}{_labels(**lb)} {_num(v)}")
    return "\n".join(lines) + "\n"


def write(path: Path, result: RunResult) -> None:
    """Replace `path` atomically with the run's metrics."""
    # 0644 whatever the umask: it holds no guest data and the collector usually runs as another user
    replace_file(Path(path), render(result).encode(), 0o644, WHAT, ours=is_ours)
