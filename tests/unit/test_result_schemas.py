"""Results whose real --json output needs a real guest (thaw, verify --boot, quiesced points) or an
appliance (files) also match their schemas when built here; test_guest.py and test_files.py
validate the real outputs."""

from __future__ import annotations

import json

import pytest
from jsonschema import ValidationError

from tests.support.schemas import validate
from virtbackup.backup import point_json
from virtbackup.drill import DrillResult
from virtbackup.store.chain import DiskImage, Point
from virtbackup.store.digest import Digest
from virtbackup.virt.quiesce import ThawResult


def as_cli(obj: dict, failure: object = None, kind: str = "") -> dict:
    """What the CLI prints: to_json(), plus the error member when the result carries a failure."""
    out = json.loads(json.dumps(obj))
    if failure:
        out["error"] = {"kind": kind, "message": str(failure), "exit_code": 1}
    return out


def test_drill_results():
    ok = DrillResult("0003", "virtbackup-drill-x", True, start_seconds=1.5, agent_seconds=40.2, check="true",
                     check_exit=0)
    validate("verify-boot", as_cli(ok.to_json(), ok.failure, "drill-failed"))
    bad = DrillResult("0003", "virtbackup-drill-x", False, stage="agent", message="no answer within 5s",
                      start_seconds=0.4, console="[ 1.0] kernel panic")
    out = validate("verify-boot", as_cli(bad.to_json(), bad.failure, "drill-failed"))
    assert out["error"]["message"] == "drill failed at agent: no answer within 5s"


def test_thaw_result():
    validate("thaw", as_cli(ThawResult("g", 1, {"pid": 12, "since": "2026-11-30T10:00:00+00:00"}, True).to_json()))
    validate("thaw", as_cli(ThawResult("g", 0, None, False).to_json()))


def test_point_records_with_consistency():
    p = Point("0001", "full", "2026-11-30T00:00:00+00:00", "cp", None, None, "0001",
              {"vda": DiskImage("points/0001/vda.qcow2", None, 1, 7, Digest("blake3", "0" * 64))}, "d.xml", "c.xml",
              consistency="application", consistency_reason="froze 1 filesystem(s)", frozen_seconds=0.25)
    rec = as_cli(point_json(p))
    validate("list", {"domain": "d", "uuid": "u", "points": [rec]})
    validate("backup", {"domain": "d", "point": rec, "skipped": {}, "removed_checkpoints": [], "warnings": [],
                        "transfer": {}})
    old = as_cli(point_json(Point(**{**p.__dict__, "consistency": None, "consistency_reason": None,
                                     "frozen_seconds": None})))
    validate("list", {"domain": "d", "uuid": "u", "points": [old]})
    with pytest.raises(ValidationError, match="sometimes"):
        validate("list", {"domain": "d", "uuid": "u", "points": [dict(rec, consistency="sometimes")]})
