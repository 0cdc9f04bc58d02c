"""The public Python API (what the CLI and management stacks call).

Every function raises a `virtbackup.errors.VirtBackupError` subclass on failure; its
`exit_code` and one-line message are what the CLI prints.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .backup import BackupResult, Notify
from .backup import backup as _backup
from .chain import BackupDir, Chain, Point
from .restore import RestoreResult
from .restore import restore as _restore
from .verify import VerifyResult
from .verify import verify as _verify

__all__ = ["backup", "list_points", "restore", "verify", "point_json", "chain_json"]


def backup(domain: str, backup_dir: Path, level: str = "auto", disks: Sequence[str] = (),
           uri: Optional[str] = None, notify: Optional[Notify] = None) -> BackupResult:
    """Take one backup of a running domain into BACKUP_DIR (level auto|full|inc|diff)."""
    return _backup(uri, domain, Path(backup_dir), level, disks, notify)


def list_points(backup_dir: Path) -> Chain:
    return BackupDir(Path(backup_dir)).load()


def restore(backup_dir: Path, output_dir: Path, point: Optional[str] = None,
            disks: Sequence[str] = ()) -> RestoreResult:
    return _restore(Path(backup_dir), Path(output_dir), point, disks)


def verify(backup_dir: Path, point: Optional[str] = None) -> VerifyResult:
    return _verify(Path(backup_dir), point)


def point_json(p: Point) -> Dict[str, Any]:
    d = asdict(p)
    d["size"] = sum(img.size for img in p.disks.values())
    return d


def chain_json(chain: Chain) -> Dict[str, Any]:
    return {"domain": chain.domain_name, "uuid": chain.domain_uuid,
            "points": [point_json(p) for p in chain.points]}


# --- restore as a domain, instant restore, deep verify, retention ------------------------------
from .restore import flatten as _flatten  # noqa: E402
from .retention import Policy, PruneResult  # noqa: E402
from .retention import prune as _prune  # noqa: E402


def restore_point(backup_dir: Path, output_dir: Path, point: Optional[str] = None, disks: Sequence[str] = (),
                  instant: bool = False, define: Optional[str] = None, start: bool = False,
                  uri: Optional[str] = None) -> RestoreResult:
    """`restore` plus: `instant` (overlays on the backup images, no copy) and `define` NAME
    (a new domain on the restored disks: new UUID and MACs), `start` it.

    `point` is an id, `latest`, or an ISO 8601 time (the newest point at or before it).
    """
    return _restore(Path(backup_dir), Path(output_dir), point, disks, instant=instant, define=define,
                    start=start, uri=uri)


def verify_backup(backup_dir: Path, point: Optional[str] = None, deep: bool = False) -> VerifyResult:
    """`verify`; `deep` also reads every point's whole chain through qemu."""
    return _verify(Path(backup_dir), point, deep=deep)


def prune(backup_dir: Path, keep: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
          dry_run: bool = False) -> PruneResult:
    """Drop the points the policy does not keep, merging them into kept points that depend on them."""
    return _prune(Path(backup_dir), Policy(keep, keep_daily, keep_weekly), dry_run)


def flatten(image: Path) -> Path:
    """Copy an overlay's backing data into it and drop the backing link (e.g. after --instant)."""
    return _flatten(Path(image))
