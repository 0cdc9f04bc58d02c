"""Pure logic of virtbackup.offsite: URLs, the remote manifest's validation (hostile input), which
files and points a pull takes, part sizes and ETags, the rate limit; and that boto3 is loaded only
by offsite commands (and a clear error when it is missing). The S3 behaviour itself is tested
against the real RGW in tests/integration/test_offsite.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from typing import Any, Dict

import pytest

from virtbackup import offsite
from virtbackup.errors import ChainCorrupt, UsageError
from virtbackup.store.chain import Chain, DiskImage, Point
from virtbackup.store.digest import Digest

MiB = 1 << 20


def make_chain() -> Chain:
    def point(pid: str, level: str, parent: Any, backing: Any) -> Point:
        return Point(pid, level, f"2026-12-0{pid[-1]}T00:00:00+00:00", f"virtbackup-abcd0123-{pid}",
                     None if parent is None else f"virtbackup-abcd0123-{parent}", parent, "0001",
                     {"vda": DiskImage(f"points/{pid}/vda.qcow2", backing, 64 * MiB, 1000 + int(pid),
                                       Digest("blake3", pid[-1] * 64))},
                     f"points/{pid}/domain.xml", f"points/{pid}/checkpoint.xml",
                     domain_xml_digest=Digest("blake3", "a" * 64), checkpoint_xml_digest=Digest("blake3", "b" * 64))
    return Chain("vm", "uuid-1", "abcd0123", [
        point("0001", "full", None, None),
        point("0002", "inc", "0001", "points/0001/vda.qcow2"),
        point("0003", "diff", "0001", "points/0001/vda.qcow2"),
    ], next_seq=4)


def manifest_json(chain: Chain) -> Dict[str, Any]:
    objects = {rel: offsite.RemoteObject(ref.size or 10, "0" * 32, "v1")
               for rel, ref in offsite.chain_files(chain).items()}
    return offsite.Manifest(chain, objects, "2026-12-06T10:00:00+00:00", "COMPLIANCE", 7).to_json()


def test_urls():
    r = offsite.parse_url("s3://my-bucket/hosts/h1/vm/")
    assert (r.bucket, r.prefix, r.url) == ("my-bucket", "hosts/h1/vm", "s3://my-bucket/hosts/h1/vm")
    assert r.key("points/0001/vda.qcow2") == "hosts/h1/vm/points/0001/vda.qcow2"
    assert offsite.parse_url("s3://bk1").key("virtbackup-offsite.json") == "virtbackup-offsite.json"
    for bad in ("/tmp/x", "s3://", "s3://UPPER/x", "s3://a/x", "s3://bucket/a/../b", "s3://bucket/a//b",
                "s3://bucket/a/\nb", "http://bucket/x", ""):
        with pytest.raises(UsageError):
            offsite.parse_url(bad)


def test_manifest_round_trip_and_files_in_chain_order():
    chain = make_chain()
    m = offsite.parse_manifest(json.dumps(manifest_json(chain)).encode(), "s3://b/m")
    assert [p.id for p in m.chain.points] == ["0001", "0002", "0003"]
    assert list(offsite.chain_files(chain))[:3] == ["points/0001/vda.qcow2", "points/0001/domain.xml",
                                                    "points/0001/checkpoint.xml"]
    assert m.lock_mode == "COMPLIANCE" and m.lock_days == 7 and m.objects["points/0002/vda.qcow2"].size == 1002


def edited(fn: Any) -> bytes:
    data = manifest_json(make_chain())
    fn(data)
    return json.dumps(data).encode()


def _traverse(d: Dict[str, Any]) -> None:
    img = d["chain"]["points"][0]["disks"]["vda"]
    d["objects"]["../../etc/x"] = d["objects"].pop(img["image"])
    img["image"] = "../../etc/x"
    d["chain"]["points"][1]["disks"]["vda"]["backing"] = "../../etc/x"
    d["chain"]["points"][2]["disks"]["vda"]["backing"] = "../../etc/x"


def _hidden(d: Dict[str, Any]) -> None:
    p = d["chain"]["points"][2]
    d["objects"]["points/0003/.virtbackup.json"] = d["objects"].pop(p["domain_xml"])
    p["domain_xml"] = "points/0003/.virtbackup.json"


def _top(d: Dict[str, Any]) -> None:
    p = d["chain"]["points"][2]
    d["objects"]["virtbackup.json"] = d["objects"].pop(p["domain_xml"])
    p["domain_xml"] = "virtbackup.json"


def _shared(d: Dict[str, Any]) -> None:      # an XML file named like an image: two contents, one name
    p = d["chain"]["points"][2]
    del d["objects"][p["domain_xml"]]
    p["domain_xml"] = p["disks"]["vda"]["image"]


@pytest.mark.parametrize("edit", [
    _traverse, _hidden, _top, _shared,
    lambda d: d.update(format="other"),
    lambda d: d.update(version=2),
    lambda d: d.update(extra=1),
    lambda d: d["objects"].pop("points/0002/vda.qcow2"),
    lambda d: d["objects"].update({"points/0009/x.qcow2": d["objects"]["points/0002/vda.qcow2"]}),
    lambda d: d["objects"]["points/0002/vda.qcow2"].update(etag="zz"),
    lambda d: d["objects"]["points/0002/vda.qcow2"].update(size=5),
    lambda d: d["objects"]["points/0002/vda.qcow2"].update(version_id="a b"),
    lambda d: d["objects"]["points/0002/vda.qcow2"].update(more=1),
    lambda d: d.update(lock={"mode": "NONE", "days": 1}),
    lambda d: d["chain"]["points"][1].update(parent="0009"),
    lambda d: d["chain"].update(schema=99),
    lambda d: d["chain"]["points"][0]["disks"].update({"../x": d["chain"]["points"][0]["disks"]["vda"]}),
], ids=["traversal", "hidden-file", "top-level-file", "name-twice", "format", "version", "extra-member",
        "object-missing", "object-extra", "etag", "size", "version-id", "object-member", "lock-mode", "parent",
        "schema", "disk-name"])
def test_hostile_manifests_are_refused(edit):
    with pytest.raises(ChainCorrupt, match="remote metadata s3://b/m is corrupt"):
        offsite.parse_manifest(edited(edit), "s3://b/m")


def test_deep_nesting_and_garbage_are_refused():
    for raw in (b"[" * 100000 + b"]" * 100000, b"\xff\xfe", b"null", b"{}"):
        with pytest.raises(ChainCorrupt):
            offsite.parse_manifest(raw, "s3://b/m")


def test_pull_takes_a_point_and_what_it_depends_on():
    chain = make_chain()
    assert [p.id for p in offsite.closure(chain, chain.point("0003"))] == ["0001", "0003"]
    assert [p.id for p in offsite.closure(chain, chain.point("0002"))] == ["0001", "0002"]
    assert [p.id for p in offsite.closure(chain, chain.point("0001"))] == ["0001"]


def test_part_sizes_and_multipart_etag(monkeypatch):
    monkeypatch.delenv(offsite.PART_SIZE_ENV, raising=False)
    assert offsite.part_size(10 * MiB) == 8 * MiB
    assert offsite.part_size(1 << 40) >= (1 << 40) // 10_000 and offsite.part_size(1 << 40) % MiB == 0
    monkeypatch.setenv(offsite.PART_SIZE_ENV, "1")
    assert offsite.part_size(10 * MiB) == offsite.MIN_PART          # S3's minimum
    parts = [b"a" * 10, b"b" * 5]
    md5s = [hashlib.md5(p).digest() for p in parts]
    assert offsite.multipart_etag(md5s) == hashlib.md5(b"".join(md5s)).hexdigest() + "-2"


def test_throttle_keeps_the_average_rate():
    t = offsite.Throttle(4 * MiB)
    t0 = time.monotonic()
    for _ in range(4):
        t.take(MiB // 4)
    assert 0.2 <= time.monotonic() - t0 < 0.6
    offsite.Throttle(None).take(1 << 40)        # no limit: no wait


def test_missing_boto3_is_one_clear_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(UsageError, match=r"need boto3: pip install 'virtbackup\[s3\]'"):
        offsite.S3(offsite.parse_url("s3://bucket/x"))


def test_boto3_is_not_loaded_by_other_commands():
    code = ("import sys; from virtbackup import cli, api; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')], 'boto3 loaded'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _job(tmp_path: Any, table: str) -> Any:
    from virtbackup.jobs import load_job
    f = tmp_path / "j.toml"
    f.write_text(f'backup_root = "{tmp_path}"\ndomains = ["vm*"]\n[offsite]\n{table}\n')
    return load_job(f)


def test_job_file_offsite_table(tmp_path):
    job = _job(tmp_path, 'url = "s3://backups/host1"\nlock_days = 30\nprofile = "offsite"\n'
                         'endpoint_url = "http://rgw:7480"')
    o = job.offsite
    assert o is not None and o.domain_url("vm1") == "s3://backups/host1/vm1"
    assert o.push_args(tmp_path / "vm1", "vm1") == [
        "offsite", "push", str(tmp_path / "vm1"), "s3://backups/host1/vm1", "--json", "--no-progress",
        "--lock-days=30", "--profile=offsite", "--endpoint-url=http://rgw:7480"]
    from virtbackup.jobs import JobFileError
    for table, msg in (('lock_days = 3', "offsite.url' is missing"),
                       ('url = "/srv/x"', "offsite.url' is not usable"),
                       ('url = "s3://b/x"', "offsite.url' is not usable"),
                       ('url = "s3://bkt/x"\nlock_days = 0', "from 1 to"),
                       ('url = "s3://bkt/x"\nlock_days = true', "must be a whole number"),
                       ('url = "s3://bkt/x"\nsecret = "x"', "offsite.secret' is unknown"),
                       ('url = "s3://bkt/x"\nprofile = " "', "must not be empty")):
        with pytest.raises(JobFileError, match=msg):
            _job(tmp_path, table)
