"""`virtbackup offsite` against a real S3 server: Ceph's RADOS Gateway, started for this module
(tests/support/s3lab.py) and taken down after it, also when a test fails. Each test makes its own
bucket(s) and removes them (versions locked in COMPLIANCE mode stay until the cluster goes).

Push, pull and restore bit-exact; an incremental push sends only its point; Object Lock keeps
the same credentials from deleting a locked point's versions; a push SIGKILLed mid-upload
resumes without re-sending its finished parts; faults: the server unreachable (also mid-upload),
a part corrupted on the way, a bucket without Object Lock, hand-edited remote metadata.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.support import s3lab
from tests.support.helpers import ROOT, CLIResult, assert_point_restores, cli, one_error_line
from tests.support.schemas import validate_output

MiB = 1 << 20


def take_backup(dom_name: str, bdir: Path, level: str = "auto") -> dict:
    """Uncompressed points: the transfer tests need images of the size the guest wrote (parts,
    kills mid-upload); compressed ones go up the same way, as files."""
    r = cli("backup", dom_name, bdir, "--level", level, "--compress", "none", "--json")
    assert r.rc == 0, r
    return r.json()


KiB = 1 << 10


@pytest.fixture(scope="module")
def lab() -> Iterator[s3lab.Lab]:
    why = s3lab.available()
    if why:
        # never in CI (CI=true), where a missing piece is a failure: a clean clone's venv once
        # imported Debian's boto3 1.26, which breaks on urllib3 2, and all of these went unseen
        if os.environ.get("CI"):
            pytest.fail(f"the off-site tests cannot run: {why}")
        pytest.skip(why)
    t0 = time.monotonic()
    with s3lab.Lab() as lab:
        print(f"s3lab up in {time.monotonic() - t0:.1f}s at {lab.endpoint}")
        yield lab


@pytest.fixture
def buckets(lab: s3lab.Lab) -> Iterator[List[str]]:
    made: List[str] = []
    yield made
    for b in made:
        lab.remove_bucket(b)


def bucket(lab: s3lab.Lab, made: List[str], lock: bool = False) -> str:
    name = lab.make_bucket(lock)
    made.append(name)
    return name


def vb(lab: s3lab.Lab, *args: object, env: Dict[str, str] | None = None, timeout: float = 300) -> CLIResult:
    """The real CLI with the lab's credentials and endpoint the boto3 way (environment)."""
    cmd = [sys.executable, "-m", "virtbackup.cli", *map(str, args)]
    full = {**os.environ, **lab.cli_env(), "PYTHONPATH": str(ROOT), **(env or {})}
    return CLIResult(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full))


def vbj(lab: s3lab.Lab, command: str, *args: object, rc: int = 0, **kw: Any) -> Dict[str, Any]:
    r = vb(lab, "offsite", command, *args, "--json", **kw)
    assert r.rc == rc, r
    return dict(validate_output(f"offsite-{command}", r.out, r.rc))


def local_size(bdir: Path, point: Dict[str, Any]) -> int:
    rels = [d["image"] for d in point["disks"].values()] + [point["domain_xml"], point["checkpoint_xml"]]
    return sum((bdir / r).stat().st_size for r in rels)


def test_push_pull_restore_bit_exact_and_incremental_push_sends_only_its_point(lab, buckets, make_domain,
                                                                              tmp_path):
    b = bucket(lab, buckets)
    url = f"s3://{b}/hosts/h1/vm"
    d = make_domain({"vda": 64 * MiB, "vdb": 32 * MiB})
    bdir = tmp_path / "bk"
    expected = {}
    d.write("vda", 0x11, 0, 3 * MiB)
    d.write("vdb", 0x21, 1 * MiB, 2 * MiB)
    take_backup(d.name, bdir, "full")
    expected["0001"] = d.expected()
    r = vbj(lab, "push", bdir, url)
    assert r["points_sent"] == ["0001"] and r["objects_sent"] == 4 and r["lock"] is None
    assert r["bytes_sent"] == local_size(bdir, json.loads((bdir / "virtbackup.json").read_text())["points"][0])

    d.write("vda", 0x31, 40 * MiB, 512 * KiB)
    inc = take_backup(d.name, bdir, "inc")["point"]
    expected["0002"] = d.expected()
    r = vbj(lab, "push", bdir, url)
    # an incremental push sends that point's files only (+ the manifest): each image once
    assert r["points_sent"] == ["0002"] and r["objects_sent"] == 4 and r["objects_skipped"] == 4
    assert r["bytes_sent"] == local_size(bdir, inc)

    d.write("vdb", 0x41, 20 * MiB, 256 * KiB)
    take_backup(d.name, bdir, "diff")
    expected["0003"] = d.expected()
    r = vbj(lab, "push", bdir, url)
    assert r["points_sent"] == ["0003"] and r["points"] == ["0001", "0002", "0003"]
    again = vbj(lab, "push", bdir, url)
    assert again["points_sent"] == [] and again["objects_sent"] == 0 and again["bytes_sent"] == 0

    listed = vbj(lab, "list", url)
    assert [p["id"] for p in listed["points"]] == ["0001", "0002", "0003"] and listed["domain"] == d.name
    text = vb(lab, "offsite", "list", url)
    assert text.rc == 0 and "0003" in text.out and "diff" in text.out
    deep = vbj(lab, "verify", "--deep", url)
    assert deep["ok"] and deep["objects_checked"] == 12 and deep["bytes_read"] > 5 * MiB

    # the whole chain pulled: every point restores bit-exact, verify passes on it
    pulled = tmp_path / "pulled"
    p = vbj(lab, "pull", url, pulled)
    assert p["points"] == ["0001", "0002", "0003"] and p["objects"] == 12
    assert (pulled / "virtbackup.json").read_text() == (bdir / "virtbackup.json").read_text()
    v = vb(lab, "verify", pulled)
    assert v.rc == 0, v
    for pid, want in expected.items():
        assert_point_restores(pulled, pid, want, tmp_path / f"restore-{pid}")

    # one point: it and what it depends on, nothing else
    one = tmp_path / "one"
    p = vbj(lab, "pull", url, one, "--point", "0002")
    assert p["points"] == ["0001", "0002"]
    assert not (one / "points" / "0003").exists()
    assert_point_restores(one, "0002", expected["0002"], tmp_path / "restore-one")

    # LOCAL_DIR must be new or empty; nothing is written into a non-empty one
    r = vb(lab, "offsite", "pull", url, pulled)
    assert r.rc == 2 and "not empty" in one_error_line(r)


def test_locked_point_cannot_be_deleted_by_the_same_credentials(lab, buckets, make_domain, tmp_path):
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x51, 0, 2 * MiB)
    take_backup(d.name, bdir, "full")

    # locking asked on a bucket without Object Lock: exit 2, nothing uploaded
    plain = bucket(lab, buckets, lock=False)
    r = vb(lab, "offsite", "push", bdir, f"s3://{plain}/vm", "--lock-days", "1")
    assert r.rc == 2 and "Object Lock" in one_error_line(r), r
    assert lab.client().list_objects_v2(Bucket=plain).get("KeyCount", 0) == 0

    b = bucket(lab, buckets, lock=True)
    url = f"s3://{b}/vm"
    r = vbj(lab, "push", bdir, url, "--lock-days", "1", "--max-speed", str(MiB))
    assert r["lock"]["mode"] == "COMPLIANCE" and r["lock"]["retain_until"]
    assert r["seconds"] >= r["bytes_sent"] / MiB - 0.5 and r["bytes_sent"] > 2 * MiB     # --max-speed held
    manifest = json.loads(lab.client().get_object(Bucket=b, Key="vm/virtbackup-offsite.json")["Body"].read())
    s3 = lab.client()     # the very credentials the host pushes with (the bucket's owner)
    versions = [(f"vm/{rel}", o["version_id"]) for rel, o in manifest["objects"].items()]
    assert len(versions) == 3 and all(v for _, v in versions)
    from botocore.exceptions import ClientError
    for key, vid in versions:
        ret = s3.get_object_retention(Bucket=b, Key=key, VersionId=vid)["Retention"]
        assert ret["Mode"] == "COMPLIANCE"
        with pytest.raises(ClientError) as e:
            s3.delete_object(Bucket=b, Key=key, VersionId=vid)
        assert e.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError):
            s3.delete_object(Bucket=b, Key=key, VersionId=vid, BypassGovernanceRetention=True)
        with pytest.raises(ClientError):       # nor can the lock be shortened
            s3.put_object_retention(Bucket=b, Key=key, VersionId=vid,
                                    Retention={"Mode": "COMPLIANCE", "RetainUntilDate": "2026-01-01T00:00:00Z"})
    # a plain DELETE only adds delete markers (the manifest's too): the point is still whole
    for key, _ in versions + [("vm/virtbackup-offsite.json", None)]:
        s3.delete_object(Bucket=b, Key=key)
    deep = vbj(lab, "verify", "--deep", url)
    assert deep["ok"] and deep["objects_checked"] == 3
    pulled = tmp_path / "pulled"
    vbj(lab, "pull", url, pulled)
    assert (pulled / "points/0001/vda.qcow2").read_bytes() == (bdir / "points/0001/vda.qcow2").read_bytes()
    # a prune never tries to delete what is locked
    pr = vbj(lab, "prune", url)
    assert pr["deleted"] == [] and pr["failed"] == []


def _parts(s3: Any, bucket: str, key: str) -> int:
    ups = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    return sum(len(s3.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", [])) for u in ups)


def test_sigkill_mid_upload_then_resume_sends_no_finished_part_again(lab, buckets, make_domain, tmp_path, procs):
    b = bucket(lab, buckets)
    url = f"s3://{b}/vm"
    d = make_domain({"vda": 64 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x61, 0, 30 * MiB)
    take_backup(d.name, bdir, "full")
    image = bdir / "points/0001/vda.qcow2"
    nparts = -(-image.stat().st_size // (5 * MiB))
    assert nparts >= 6
    env = {**os.environ, **lab.cli_env(), "PYTHONPATH": str(ROOT), "VIRTBACKUP_OFFSITE_PART_SIZE": str(5 * MiB),
           "VIRTBACKUP_OFFSITE_THREADS": "2"}
    s3 = lab.client()
    key = "vm/points/0001/vda.qcow2"

    def start_and_wait_for_parts(n: int) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "virtbackup.cli", "offsite", "push", bdir, url,
                                 "--max-speed", str(5 * MiB), "--no-progress"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while _parts(s3, b, key) < n:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        return proc

    # SIGTERM: one "interrupted" line, exit 1, no manifest
    proc = start_and_wait_for_parts(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "virtbackup: error: interrupted" in err, (out, err)
    assert vb(lab, "offsite", "list", url).rc == 2
    # then SIGKILL, further in
    proc = start_and_wait_for_parts(_parts(s3, b, key) + 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    done = _parts(s3, b, key)
    assert 2 <= done < nparts
    # killed before the commit: the remote holds no chain (no manifest)
    r = vb(lab, "offsite", "list", url)
    assert r.rc == 2 and "no off-site copy" in one_error_line(r)

    r = vbj(lab, "push", bdir, url, env={"VIRTBACKUP_OFFSITE_PART_SIZE": str(5 * MiB)})
    assert r["parts_reused"] == done, r
    assert r["parts_sent"] == nparts - done + 2      # the rest of the image, then the two XML files
    assert r["points_sent"] == ["0001"]
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    got = s3.get_object(Bucket=b, Key=key)["Body"].read()
    assert got == image.read_bytes()
    assert vbj(lab, "verify", "--deep", url)["ok"]

    # killed after every file was up but before the manifest: the next push sends no byte again
    s3.delete_object(Bucket=b, Key="vm/virtbackup-offsite.json")
    r = vbj(lab, "push", bdir, url, env={"VIRTBACKUP_OFFSITE_PART_SIZE": str(5 * MiB)})
    assert (r["bytes_sent"], r["parts_sent"], r["parts_reused"]) == (0, 0, nparts + 2), r
    assert r["points_sent"] == ["0001"] and vbj(lab, "verify", "--deep", url)["ok"]


def test_faults_unreachable_cut_corrupted_part_and_hand_edited_metadata(lab, buckets, make_domain, tmp_path):
    b = bucket(lab, buckets)
    url = f"s3://{b}/vm"
    d = make_domain({"vda": 32 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x71, 0, 12 * MiB)
    take_backup(d.name, bdir, "full")
    small = {"VIRTBACKUP_OFFSITE_PART_SIZE": str(5 * MiB), "VIRTBACKUP_OFFSITE_THREADS": "1"}

    # nothing listens there: exit 1, one line, kind "remote"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r = vb(lab, "offsite", "push", bdir, url, "--endpoint-url", f"http://127.0.0.1:{dead}", "--json")
    assert r.rc == 1 and "cannot reach the S3 server" in one_error_line(r), r
    assert validate_output("offsite-push", r.out, r.rc)["error"]["kind"] == "remote"

    # the server goes away mid-upload: exit 1, the remote still holds no chain; the next push resumes
    port = int(lab.endpoint.rsplit(":", 1)[1])
    proxy = s3lab.Proxy(port)
    try:
        env = {**os.environ, **lab.cli_env(), "PYTHONPATH": str(ROOT), **small}
        proc = subprocess.Popen([sys.executable, "-m", "virtbackup.cli", "offsite", "push", bdir, url,
                                 "--endpoint-url", proxy.endpoint, "--max-speed", str(4 * MiB)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        s3 = lab.client()
        deadline = time.monotonic() + 60
        while _parts(s3, b, "vm/points/0001/vda.qcow2") < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proxy.cut()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "cannot reach the S3 server" in err, (out, err)
    finally:
        proxy.close()
    assert vb(lab, "offsite", "list", url).rc == 2

    # a part corrupted on the way: the server refuses it (Content-MD5), the push fails naming it
    proxy = s3lab.Proxy(port)
    try:
        proxy.corrupt_next(b"partNumber=2 ")
        r = vb(lab, "offsite", "push", bdir, url, "--endpoint-url", proxy.endpoint, env=small)
        line = one_error_line(r)
        # over http SigV4 signs the payload's SHA-256, over https boto3 sends Content-MD5: either refuses it
        assert r.rc == 1 and "part 2 of" in line and ("BadDigest" in line or "SHA256Mismatch" in line), r
        assert proxy.corrupted == 1
    finally:
        proxy.close()
    r = vbj(lab, "push", bdir, url, env=small)
    assert r["parts_reused"] >= 1 and r["points_sent"] == ["0001"]
    assert vbj(lab, "verify", "--deep", url)["ok"]

    # hand-edited remote metadata
    s3 = lab.client()
    key = "vm/virtbackup-offsite.json"
    good = json.loads(s3.get_object(Bucket=b, Key=key)["Body"].read())

    def put(m: Dict[str, Any]) -> None:
        s3.put_object(Bucket=b, Key=key, Body=json.dumps(m).encode())

    evil = json.loads(json.dumps(good))
    img = evil["chain"]["points"][0]["disks"]["vda"]
    evil["objects"]["../../../../tmp/evil"] = evil["objects"].pop(img["image"])
    img["image"] = "../../../../tmp/evil"
    put(evil)
    for args in (("list", url), ("verify", url), ("pull", url, tmp_path / "p1")):
        r = vb(lab, "offsite", *args)
        assert r.rc == 2 and "corrupt" in one_error_line(r), (args, r)
    assert not (tmp_path / "p1").exists()

    evil = json.loads(json.dumps(good))
    evil["chain"]["points"][0]["disks"]["vda"]["digest"]["value"] = "0" * 64
    put(evil)
    r = vb(lab, "offsite", "pull", url, tmp_path / "p2")
    assert r.rc == 1 and "points/0001/vda.qcow2" in one_error_line(r) and "damaged" in r.err, r
    assert not (tmp_path / "p2").exists()       # nothing restored, nothing left behind
    r = vb(lab, "offsite", "verify", "--deep", url)
    assert r.rc == 1 and "vda.qcow2" in one_error_line(r)
    # a push refuses to overwrite a remote that records other content under the same names
    r = vb(lab, "offsite", "push", bdir, url)
    assert r.rc == 2 and "another" in one_error_line(r), r

    put(good)
    assert vbj(lab, "verify", "--deep", url)["ok"]


def test_prune_follows_the_local_chain_and_deletes_what_no_push_references(lab, buckets, make_domain, tmp_path):
    b = bucket(lab, buckets)
    url = f"s3://{b}/vm"
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    for i in range(3):
        d.write("vda", 0x11 + i, i * MiB, MiB)
        take_backup(d.name, bdir, "auto")
        vbj(lab, "push", bdir, url)
        time.sleep(1.1)          # S3 times have 1 s steps here: each manifest visibly newer
    want = d.expected()
    r = vb(lab, "prune", bdir, "--keep", "1")
    assert r.rc == 0, r
    time.sleep(1.1)
    pushed = vbj(lab, "push", bdir, url)
    assert pushed["points"] == ["0003"]
    dry = vbj(lab, "prune", url, "--dry-run")
    assert dry["deleted"] and dry["locked"] == []

    # credentials without delete rights (a second user the bucket policy lets read and write only):
    # every refused deletion is listed, exit 1, nothing is gone
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": ["arn:aws:iam:::user/labro"]},
        "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:ListBucketVersions", "s3:PutObject"],
        "Resource": [f"arn:aws:s3:::{b}", f"arn:aws:s3:::{b}/*"]}]}
    lab.client().put_bucket_policy(Bucket=b, Policy=json.dumps(policy))
    denied = vbj(lab, "prune", url, rc=1, env=lab.cli_env("ro"))
    assert denied["deleted"] == [] and len(denied["failed"]) == len(dry["deleted"])
    assert denied["error"]["kind"] == "prune-failed"
    assert vbj(lab, "verify", url)["ok"]

    pr = vbj(lab, "prune", url)
    assert sorted(pr["deleted"]) == sorted(dry["deleted"]) and pr["failed"] == []
    keys = {v["Key"] for v in lab.client().list_object_versions(Bucket=b).get("Versions", [])}
    manifest = json.loads(lab.client().get_object(Bucket=b, Key="vm/virtbackup-offsite.json")["Body"].read())
    assert keys == {f"vm/{rel}" for rel in manifest["objects"]} | {"vm/virtbackup-offsite.json"}
    pulled = tmp_path / "pulled"
    vbj(lab, "pull", url, pulled)
    assert_point_restores(pulled, "0003", want, tmp_path / "restore")


def test_job_file_offsite_table_pushes_each_domain_after_its_backup(lab, buckets, make_domain, tmp_path):
    b = bucket(lab, buckets)
    d = make_domain({"vda": 16 * MiB})
    d.write("vda", 0x33, 0, MiB)
    root = tmp_path / "root"
    root.mkdir()
    job = tmp_path / "nightly.toml"
    prom = tmp_path / "metrics" / "virtbackup.prom"
    prom.parent.mkdir(mode=0o755)
    job.write_text(f'backup_root = "{root}"\ndomains = ["{d.name}"]\nmetrics_file = "{prom}"\n'
                   f'[retention]\nkeep = 3\n[offsite]\nurl = "s3://{b}/host1"\nendpoint_url = "{lab.endpoint}"\n')
    r = vb(lab, "run", job, "--json")
    assert r.rc == 0, r
    dom = validate_output("run", r.out, r.rc)["domains"][0]
    assert dom["status"] == "ok" and dom["offsite"]["points_sent"] == ["0001"]
    assert dom["offsite"]["bytes_sent"] >= dom["stored_bytes"] > 0     # every image, and the metadata
    assert dom["offsite"]["lag_points"] == 0 and dom["offsite"]["url"] == f"s3://{b}/host1/{d.name}"

    def offsite_metrics() -> dict:
        from prometheus_client.parser import text_string_to_metric_families
        return {f"{s.name}": s.value for fam in text_string_to_metric_families(prom.read_text())
                for s in fam.samples if s.name.startswith("virtbackup_domain_offsite_")
                and s.labels.get("domain") == d.name}
    m = offsite_metrics()
    assert m["virtbackup_domain_offsite_success"] == 1 and m["virtbackup_domain_offsite_lag_points"] == 0
    assert m["virtbackup_domain_offsite_bytes_sent"] == dom["offsite"]["bytes_sent"]
    assert abs(m["virtbackup_domain_offsite_last_success_time_seconds"] - time.time()) < 600
    listed = vbj(lab, "list", f"s3://{b}/host1/{d.name}")
    assert [p["id"] for p in listed["points"]] == ["0001"]

    # the push fails (no such bucket): the domain fails, its point stays recorded
    job.write_text(job.read_text().replace(f"s3://{b}/", "s3://vbtest-missing-bucket/"))
    r = vb(lab, "run", job, "--json")
    assert r.rc == 1, r
    dom = validate_output("run", r.out, r.rc)["domains"][0]
    assert dom["status"] == "failed" and "offsite push failed" in dom["error"] and dom["point"] == "0002"
    assert "does not exist" in dom["error"]
    m = offsite_metrics()
    assert m["virtbackup_domain_offsite_success"] == 0 and "virtbackup_domain_offsite_bytes_sent" not in m


def test_encrypted_chain_goes_up_as_it_is_and_restores_with_its_key(lab, buckets, make_domain, tmp_path):
    from tests.support import scratch
    b = bucket(lab, buckets)
    url = f"s3://{b}/enc"
    fast = {"VIRTBACKUP_ENCRYPT_ITER_TIME": "10"}     # LUKS key derivation: 10 ms, not the default 1 s
    key = tmp_path / "key"
    key.write_bytes(b"offsite test passphrase\n")
    key.chmod(0o600)
    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0xA7, 0, 2 * MiB)
    r = vb(lab, "backup", d.name, bdir, "--encrypt", "--key-file", key, env=fast)
    assert r.rc == 0, r
    d.write("vda", 0xB8, 4 * MiB, 1 * MiB)
    r = vb(lab, "backup", d.name, bdir, "--level", "inc", "--key-file", key, env=fast)
    assert r.rc == 0, r
    want = d.expected()
    vbj(lab, "push", bdir, url)
    listed = vbj(lab, "list", url)
    assert listed["encryption"]["format"] == "luks"
    # the object store holds no run of the guest's data
    s3 = lab.client()
    for obj in s3.list_objects_v2(Bucket=b, Prefix="enc/points/")["Contents"]:
        body = s3.get_object(Bucket=b, Key=obj["Key"])["Body"].read()
        assert bytes([0xA7]) * 4096 not in body and bytes([0xB8]) * 4096 not in body, obj["Key"]
    pulled = tmp_path / "pulled"
    vbj(lab, "pull", url, pulled)
    out = tmp_path / "out"
    r = vb(lab, "restore", pulled, out, "--key-file", key, env=fast)
    assert r.rc == 0, r
    assert scratch.first_difference(scratch.read_raw(out / "vda.qcow2"), want["vda"]) is None
