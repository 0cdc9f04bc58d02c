"""Image records: one shape, `"digest": {"algorithm", "value"}` (metadata schema 3, 4 encrypted);
every older layout still loads (schema 1 with "sha256" records, with "sha256"/"blake3" records,
schema 2 encrypted), converted in memory; hand-edited records are refused as corrupt.

The older layouts are the real metadata of tests/fixtures/old-backup-dir (written by earlier
releases; its README says how), and records shaped like them.
"""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from tests.support.schemas import validate
from virtbackup.errors import ChainCorrupt
from virtbackup.store.chain import SCHEMA_ENCRYPTED, SCHEMA_VERSION, BackupDir, Chain, DiskImage, Point, point_json
from virtbackup.store.digest import Digest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "old-backup-dir"
HEX = "0123456789abcdef" * 4
# variant -> (schema it was written with, algorithm of its records, encrypted)
VARIANTS = {"plain": (1, "blake3", False), "sha256": (1, "sha256", False), "encrypted": (2, "blake3", True)}


def old_metadata(variant: str) -> Dict[str, Any]:
    """virtbackup.json as the earlier release wrote it."""
    with tarfile.open(FIXTURE / f"{variant}.tar.xz") as tar:
        f = tar.extractfile(f"{variant}/virtbackup.json")
        assert f is not None
        data: Dict[str, Any] = json.load(f)
    return data


def new_metadata() -> Dict[str, Any]:
    """The plain fixture's chain as this code writes it (schema 3)."""
    return json.loads(json.dumps(Chain.from_json(old_metadata("plain")).to_json()))


def load(tmp_path: Path, data: Any) -> Chain:
    (tmp_path / "virtbackup.json").write_text(json.dumps(data))
    return BackupDir(tmp_path).load()


def rec(data: Dict[str, Any], point: int = 1) -> Dict[str, Any]:
    r: Dict[str, Any] = data["points"][point]["disks"]["vda"]
    return r


# -- older layouts ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_older_layout_loads_and_is_written_in_the_new_one(tmp_path, variant):
    schema, alg, encrypted = VARIANTS[variant]
    old = old_metadata(variant)
    assert old["schema"] == schema
    chain = load(tmp_path, old)
    assert chain.schema == schema and (chain.encryption is not None) == encrypted
    for p, raw in zip(chain.points, old["points"], strict=True):
        assert p.disks["vda"].digest == Digest(alg, raw["disks"]["vda"][alg])
        assert p.disks["vda"].image == raw["disks"]["vda"]["image"]
    # the first save writes the new layout: schema 3 (4 encrypted), a digest per image, nothing else
    BackupDir(tmp_path).save(chain)
    new = json.loads((tmp_path / "virtbackup.json").read_text())
    assert new["schema"] == (SCHEMA_ENCRYPTED if encrypted else SCHEMA_VERSION)
    for p, raw in zip(new["points"], old["points"], strict=True):
        r = p["disks"]["vda"]
        assert r["digest"] == {"algorithm": alg, "value": raw["disks"]["vda"][alg]}
        assert "sha256" not in r and "blake3" not in r
        # fields added since (data_size) are written as null: unknown for older images
        assert {k: v for k, v in r.items() if k != "digest" and not (k == "data_size" and v is None)} == \
            {k: v for k, v in raw["disks"]["vda"].items() if k not in ("sha256", "blake3")}
    again = BackupDir(tmp_path).load()
    assert again.points == chain.points and again.encryption == chain.encryption
    assert again.schema == new["schema"]
    for p in again.points:      # and as `list --json` / `backup --json` print it
        validate("list", {"domain": "d", "uuid": "u", "points": [json.loads(json.dumps(point_json(p)))]})


def test_sha256_record_rewritten_by_a_blake3_release_loads(tmp_path):
    """A release with BLAKE3 re-saving a pre-BLAKE3 record wrote "sha256": HEX, "blake3": ""."""
    old = old_metadata("sha256")
    rec(old, 0)["blake3"] = ""
    assert load(tmp_path, old).points[0].disks["vda"].digest == Digest("sha256", rec(old, 0)["sha256"])


def test_new_versions_are_unknown_to_older_releases():
    """Older releases accept schema 1 and 2 only: they refuse the new layout by its number, and
    a release without encryption (schema 1 only) refuses encrypted chains."""
    assert {SCHEMA_VERSION, SCHEMA_ENCRYPTED}.isdisjoint({1, 2}) and SCHEMA_VERSION != SCHEMA_ENCRYPTED


def test_new_layout_round_trips(tmp_path):
    data = new_metadata()
    chain = load(tmp_path, data)
    assert chain.schema == SCHEMA_VERSION
    assert json.loads(json.dumps(chain.to_json())) == data


# -- hostile records ----------------------------------------------------------------------------
Mutation = Callable[[Dict[str, Any]], Any]

NEW_LAYOUT: Dict[str, Mutation] = {
    "unknown algorithm": lambda d: rec(d)["digest"].update(algorithm="md5"),
    "algorithm not a string": lambda d: rec(d)["digest"].update(algorithm=["blake3"]),
    "value too short": lambda d: rec(d)["digest"].update(value=HEX[:-1]),
    "value too long": lambda d: rec(d)["digest"].update(value=HEX + "0"),
    "value not hex": lambda d: rec(d)["digest"].update(value="g" * 64),
    "value upper case": lambda d: rec(d)["digest"].update(value=HEX.upper()),
    "value a number": lambda d: rec(d)["digest"].update(value=7),
    "value empty": lambda d: rec(d)["digest"].update(value=""),
    "value huge": lambda d: rec(d)["digest"].update(value="a" * 1_000_000),
    "digest missing": lambda d: rec(d).pop("digest"),
    "digest null": lambda d: rec(d).update(digest=None),
    "digest a string": lambda d: rec(d).update(digest=HEX),
    "digest without value": lambda d: rec(d)["digest"].pop("value"),
    "digest with more": lambda d: rec(d)["digest"].update(note="x"),
    "old and new fields": lambda d: rec(d).update(sha256=HEX),
    "old empty field beside the new": lambda d: rec(d).update(blake3=""),
    "unknown field": lambda d: rec(d).update(md5=HEX[:32]),
    "plain chain as schema 4": lambda d: d.update(schema=SCHEMA_ENCRYPTED),
}
NEW_MESSAGES = {
    "unknown algorithm": "point 0002 disk vda: digest algorithm 'md5' is not one of blake3, sha256",
    "algorithm not a string": "is not one of blake3, sha256",
    "value too short": "point 0002 disk vda: blake3 digest .* is not 64 lowercase hex digits",
    "value too long": "is not 64 lowercase hex digits",
    "value not hex": "is not 64 lowercase hex digits",
    "value upper case": "is not 64 lowercase hex digits",
    "value a number": "blake3 digest 7 is not 64 lowercase hex digits",
    "value empty": "is not 64 lowercase hex digits",
    "value huge": "is not 64 lowercase hex digits",
    "digest missing": "point 0002 disk vda: no content hash recorded",
    "digest null": 'digest is not an object of exactly "algorithm" and "value"',
    "digest a string": "digest is not an object",
    "digest without value": "digest is not an object",
    "digest with more": "digest is not an object",
    "old and new fields": 'a schema 3 image record has sha256, not just a "digest"',
    "old empty field beside the new": 'has blake3, not just a "digest"',
    "unknown field": "md5",
    "plain chain as schema 4": "schema version and encryption do not match",
}


@pytest.mark.parametrize("case", sorted(NEW_LAYOUT))
def test_hostile_new_records_are_refused(tmp_path, case):
    data = new_metadata()
    NEW_LAYOUT[case](data)
    with pytest.raises(ChainCorrupt, match="is corrupt: .*" + NEW_MESSAGES[case]) as e:
        load(tmp_path, data)
    assert len(str(e.value)) < 400, "a hostile value is not echoed whole"


OLD_LAYOUT: Dict[str, Mutation] = {
    "a digest in an old record": lambda d: rec(d).update(digest={"algorithm": "blake3", "value": HEX}),
    "both hashes": lambda d: rec(d).update(sha256=HEX),
    "no hash": lambda d: rec(d).update(blake3=""),
    "no sha256 field": lambda d: rec(d).pop("sha256"),
    "sha256 not a string": lambda d: rec(d).update(sha256=None),
    "blake3 not a string": lambda d: rec(d).update(blake3=7),
    "blake3 too short": lambda d: rec(d).update(blake3=HEX[:40]),
    "sha256 not hex": lambda d: rec(d).update(sha256="x", blake3=""),
    "plain chain as schema 2": lambda d: d.update(schema=2),
}
OLD_MESSAGES = {
    "a digest in an old record": 'point 0002 disk vda: a schema 1 image record has a "digest"',
    "both hashes": "both a sha256 and a blake3 hash recorded",
    "no hash": "point 0002 disk vda: no content hash recorded",
    "no sha256 field": 'no "sha256" field',
    "sha256 not a string": "wrong field types of sha256/blake3",
    "blake3 not a string": "wrong field types of sha256/blake3",
    "blake3 too short": "point 0002 disk vda: blake3 digest .* is not 64 lowercase hex digits",
    "sha256 not hex": "sha256 digest 'x' is not 64 lowercase hex digits",
    "plain chain as schema 2": "schema version and encryption do not match",
}


@pytest.mark.parametrize("case", sorted(OLD_LAYOUT))
def test_hostile_old_records_are_refused(tmp_path, case):
    data = old_metadata("plain")
    OLD_LAYOUT[case](data)
    with pytest.raises(ChainCorrupt, match="is corrupt: .*" + OLD_MESSAGES[case]):
        load(tmp_path, data)


@pytest.mark.parametrize("schema", [0, 5, 99, "3", 3.0, True, None, [3]])
def test_unknown_schema_versions_are_refused(tmp_path, schema):
    data = new_metadata()
    data["schema"] = schema
    with pytest.raises(ChainCorrupt, match="unsupported schema version"):
        load(tmp_path, data)


def test_encrypted_chain_as_plain_version_is_refused(tmp_path):
    data = json.loads(json.dumps(Chain.from_json(old_metadata("encrypted")).to_json()))
    assert data["schema"] == SCHEMA_ENCRYPTED
    for schema in (1, SCHEMA_VERSION):
        with pytest.raises(ChainCorrupt, match="schema version and encryption do not match"):
            load(tmp_path, dict(data, schema=schema))


# -- images without a digest --------------------------------------------------------------------
def test_an_image_without_digest_is_never_saved(tmp_path):
    """Backup and prune hash an image before the commit; a save of one without a digest is a bug
    and writes nothing. A prune's plan (images not written yet) may validate without."""
    chain = Chain.from_json(new_metadata())
    pending: Point = copy.deepcopy(chain.points[1])
    pending.disks["vda"].digest = None
    chain.points[1] = pending
    chain.validate(hashed=False)
    with pytest.raises(ValueError, match="point 0002 disk vda: no content hash recorded"):
        BackupDir(tmp_path).save(chain)
    assert not (tmp_path / "virtbackup.json").exists()


def test_a_digest_of_the_wrong_type_is_refused():
    chain = Chain.from_json(new_metadata())
    img: DiskImage = chain.points[0].disks["vda"]
    img.digest = HEX       # type: ignore[assignment]
    with pytest.raises(ValueError, match="wrong field types"):
        chain.validate()
    img.digest = Digest("sha1", HEX[:40])
    with pytest.raises(ValueError, match="digest algorithm 'sha1' is not one of"):
        chain.validate()
