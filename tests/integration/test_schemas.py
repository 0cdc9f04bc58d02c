"""Every command's real --json output validates against its schema in schemas/ (run: test_jobs.py).

One small domain is driven through backup, list, verify (clean and damaged), restore (copy and
instant), flatten, prune (dry run and real), status and repair, plus the error object of a bad
input, an unknown option and a missing domain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.support.helpers import cli
from tests.support.schemas import SCHEMAS, validate, validate_output

MiB = 1 << 20

COMMANDS = ("backup", "list", "restore", "verify", "prune", "flatten", "status", "repair", "run",
            "thaw", "verify-boot", "files-fs", "files-ls", "files-get")
# validated elsewhere, with what they need: thaw and verify-boot with the real guest (test_guest.py),
# files-* with the libguestfs appliance (test_files.py); here only their error objects


def test_every_command_has_a_schema():
    names = {p.name[:-len(".schema.json")] for p in SCHEMAS.glob("*.schema.json")}
    assert set(COMMANDS) | {"error"} <= names


def j(command: str, *args: object, rc: int = 0) -> dict:
    r = cli(command, *args, "--json")
    assert r.rc == rc, r
    return validate_output(command, r.out, r.rc)


def test_json_outputs_validate(make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x41, 0, MiB)
    first = j("backup", d.name, bdir)
    assert first["point"]["level"] == "full"
    assert (first["point"]["consistency"], first["point"]["frozen_seconds"]) == ("crash", None)
    d.write("vda", 0x42, MiB, MiB)
    assert j("backup", d.name, bdir, "--level", "inc")["point"]["level"] == "inc"
    assert len(j("list", bdir)["points"]) == 2
    assert j("verify", bdir)["ok"] is True
    assert j("verify", bdir, "--deep", "--point", "latest")["chains_read"] == 1
    st = j("status", d.name)
    assert st["active"] is True and st["disks"]["vda"]["bitmaps"]
    assert j("repair", d.name, bdir, "--dry-run")["dry_run"] is True
    assert j("repair", d.name, bdir)["ok"] is True
    assert j("restore", bdir, tmp_path / "r1", "--point", "0001")["point"] == "0001"
    inst = j("restore", bdir, tmp_path / "r2", "--instant")
    assert inst["instant"] is True
    assert j("flatten", inst["images"]["vda"])["standalone"] is True
    dry = j("prune", bdir, "--keep", "1", "--dry-run")
    assert dry["dry_run"] is True and dry["dropped"] == ["0001"]
    assert j("prune", bdir, "--keep-monthly", "1", "--keep", "1")["dropped"] == ["0001"]

    # a damaged copy: verify exits 1 with its result and an error member
    copy = tmp_path / "copy"
    shutil.copytree(bdir, copy)
    img = next((copy / "points").glob("*/vda*.qcow2"))
    with open(img, "r+b") as f:
        f.seek(img.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = j("verify", copy, rc=1)
    assert bad["ok"] is False and bad["error"]["kind"] == "verify-failed"

    # error objects: bad input (2), unknown option (2), failed operation (1)
    err = j("backup", f"{d.name}-missing", tmp_path / "x", rc=2)["error"]
    assert err["kind"] == "domain-not-found"
    assert j("list", tmp_path / "nothing-here", rc=2)["error"]["exit_code"] == 2
    r = cli("list", bdir, "--bogus", "--json")
    assert r.rc == 2
    assert validate("error", json.loads(r.out))["error"]["kind"] == "usage"
    # thaw, a drill and files refused before anything starts (no agent channel, bad FS:PATH)
    assert j("thaw", d.name, rc=2)["error"]["kind"] == "usage"
    r = cli("verify", bdir, "--boot", "--json")
    assert r.rc == 2 and validate_output("verify-boot", r.out, r.rc)["error"]["exit_code"] == 2
    for action in (["fs", "extra"], ["ls", "nocolon"], ["get", "vda:/x"]):
        r = cli("files", bdir, *action, "--json")
        assert r.rc == 2 and validate_output(f"files-{action[0]}", r.out, r.rc)["error"]["exit_code"] == 2, r
    r = cli("restore", bdir, tmp_path / "r1", "--json")          # exists: refused
    assert r.rc == 2 and validate("error", json.loads(r.out))["error"]["kind"] == "output-exists"
    assert Path(tmp_path / "r1" / "vda.qcow2").exists()
