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
