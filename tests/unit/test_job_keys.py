"""Key files, encryption and compression in job files (issue 23 part 4, issue 24 part 1): loading,
every refusal of a key file (real files, real modes and owners), the per-domain tables, and the
arguments the runner gives each domain's `backup` and `prune` child."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List

import pytest

from tests.unit.test_jobs import C, write_job
from virtbackup import jobs
from virtbackup.store.chain import Chain, Point

CANARY = b"canary-5c1e key bytes, never in a message\n"


def keyfile(path: Path, data: bytes = CANARY, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def load(tmp_path: Path, body: str) -> jobs.Job:
    return jobs.load_job(write_job(tmp_path, f'backup_root = "ROOT"\ndomains = ["web-*", "db1"]\n{body}'))


def refused(tmp_path: Path, body: str) -> str:
    """The one-line message of a job file that must be refused with exit 2."""
    with pytest.raises(jobs.JobFileError) as e:
        load(tmp_path, body)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "\n" not in msg and CANARY.decode().strip() not in msg and "canary" not in msg
    return msg


def test_no_key_no_compress_by_default(tmp_path):
    job = load(tmp_path, "")
    assert job.settings == jobs.DomainSettings() and job.per_domain == {}
    assert job.for_domain("web-1").backup_args() == [] and job.for_domain("web-1").prune_args() == []


def test_top_level_key_encrypt_compress_and_per_domain_tables(tmp_path):
    k1 = keyfile(tmp_path / "all.key")
    k2 = keyfile(tmp_path / "db1.key", b"another passphrase")
    job = load(tmp_path, f'key_file = "{k1}"\nencrypt = true\n'
                         f'[domain."db1"]\nkey_file = "{k2}"\ncompress = "none"\n'
                         f'[domain.web-old]\nencrypt = false\n')
    assert job.settings == jobs.DomainSettings(k1, True, None)
    assert job.for_domain("web-1") == job.settings                      # no table: the top level
    assert job.for_domain("db1") == jobs.DomainSettings(k2, True, "none")   # its table over the top level
    assert job.for_domain("web-old") == jobs.DomainSettings(k1, False, None)
    assert job.for_domain("web-1").backup_args() == ["--key-file", str(k1), "--encrypt"]
    assert job.for_domain("db1").backup_args() == ["--key-file", str(k2), "--encrypt", "--compress", "none"]
    assert job.for_domain("web-old").backup_args() == ["--key-file", str(k1)]
    assert job.for_domain("db1").prune_args() == ["--key-file", str(k2)]
    # compression for all but one encrypted domain
    job = load(tmp_path, f'compress = "zlib"\n[domain."db1"]\nkey_file = "{k2}"\nencrypt = true\ncompress = "none"\n')
    assert job.for_domain("web-1").backup_args() == ["--compress", "zlib"]
    assert job.for_domain("db1").backup_args() == ["--key-file", str(k2), "--encrypt", "--compress", "none"]
    # only per domain: the others get nothing
    job = load(tmp_path, f'[domain."db1"]\nkey_file = "{k2}"\nencrypt = true\n')
    assert job.for_domain("web-1").backup_args() == []
    assert job.for_domain("db1").backup_args() == ["--key-file", str(k2), "--encrypt"]
    for value in jobs.COMPRESSIONS:
        assert load(tmp_path, f'compress = "{value}"\n').settings.compress == value


def web1(job: jobs.Job) -> jobs.Selected:
    return next(s for s in jobs.select(job, [C("web-1"), C("db1")]) if s.name == "web-1")


def test_backup_args_of_a_domain_carry_the_path_never_the_key(tmp_path):
    k = keyfile(tmp_path / "k")
    job = load(tmp_path, f'key_file = "{k}"\nencrypt = true\ncompress = "none"\nquiesce = "off"\n')
    s = web1(job)
    args = jobs.backup_args(job, s, "auto", None)
    assert args == ["backup", "uuid-web-1", str(tmp_path / "web-1"), "--level", "auto", "--json", "--quiesce=off",
                    "--key-file", str(k), "--encrypt", "--compress", "none"]
    assert not [a for a in args if "canary" in a]
    plain = load(tmp_path, "")
    assert jobs.backup_args(plain, web1(plain), "full", "why") == [
        "backup", "uuid-web-1", str(tmp_path / "web-1"), "--level", "full", "--json", "--reason=why",
        "--quiesce=auto"]


def test_key_file_refusals_name_file_line_and_key(tmp_path):
    """Everything `backup --key-file` refuses is refused when the job file is loaded, with the job
    file, the line, the key and the key file named, and never the key itself."""
    job_path = tmp_path / "nightly.toml"
    good = keyfile(tmp_path / "good.key")
    cases = []
    for mode in (0o640, 0o604, 0o620, 0o602, 0o610, 0o644):
        path = keyfile(tmp_path / f"mode-{mode:o}.key", mode=mode)
        cases.append((path, f"accessible by other users (mode {mode:04o})"))
    cases.append((tmp_path / "missing.key", "does not exist"))
    cases.append((keyfile(tmp_path / "empty.key", b""), "is empty"))
    link = tmp_path / "link.key"
    link.symlink_to(good)
    cases.append((link, "is a symbolic link"))
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    cases.append((d, "is not a regular file"))
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    cases.append((fifo, "is not a regular file"))
    other = keyfile(tmp_path / "other.key")
    os.chown(other, 4242, 4242)
    cases.append((other, "is owned by uid 4242, not by root or by this user"))
    cases.append((keyfile(tmp_path / "binary.key", b"\x00\xff\x00"), "is not text"))
    for path, why in cases:
        # the top level
        msg = refused(tmp_path, f'key_file = "{path}"\nencrypt = true\n')
        assert msg.startswith(f"job file {job_path}:3: key 'key_file' is refused: key file {path} "), msg
        assert why in msg, msg
        # a domain's table
        msg = refused(tmp_path, f'parallel = 1\n[domain."db1"]\nencrypt = true\nkey_file = "{path}"\n')
        assert msg.startswith(f"job file {job_path}:6: key 'domain.\"db1\".key_file' is refused: "
                              f"key file {path} "), msg
        assert why in msg, msg
    # the owner check does not refuse root's or our own file
    os.chown(other, 0, 0)
    assert load(tmp_path, f'key_file = "{other}"\n').settings.key_file == other
    msg = refused(tmp_path, 'key_file = "relative.key"\n')
    assert msg.endswith(":3: key 'key_file' must be an absolute path, not 'relative.key'")
    msg = refused(tmp_path, 'key_file = 3\n')
    assert "key 'key_file' must be a string (the absolute path of a key file), not an integer" in msg


def test_a_refused_key_file_is_said_once_in_the_cli_and_as_json(tmp_path):
    """`run` and `run --dry-run`: exit 2, one error line naming the file and the key, no key byte."""
    import subprocess
    bad = keyfile(tmp_path / "k", mode=0o644)
    job = write_job(tmp_path, f'backup_root = "ROOT"\ndomains = ["x"]\nkey_file = "{bad}"\n')
    for extra in ([], ["--dry-run"], ["--json"], ["--dry-run", "--json"]):
        r = subprocess.run([sys.executable, "-m", "virtbackup.cli", "run", str(job), *extra],
                           capture_output=True, text=True)
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert lines == [f"virtbackup: error: job file {job}:3: key 'key_file' is refused: key file {bad} is "
                         "accessible by other users (mode 0644); chmod 600 it first"], r
        assert "canary" not in r.stdout + r.stderr
        if "--json" in extra:
            assert json.loads(r.stdout)["error"]["kind"] == "job-file"
        else:
            assert r.stdout == ""


def test_encrypt_compress_and_domain_table_refusals(tmp_path):
    k = keyfile(tmp_path / "k")
    assert refused(tmp_path, "encrypt = true\n").endswith(
        ":3: key 'encrypt' is true, but there is no key_file to encrypt with")
    assert refused(tmp_path, 'encrypt = "yes"\n').endswith(":3: key 'encrypt' must be true or false, not a string")
    assert refused(tmp_path, '[domain."db1"]\nencrypt = true\n').endswith(
        ":4: key 'domain.\"db1\".encrypt' is true, but there is no key_file to encrypt with")
    assert refused(tmp_path, 'compress = "lz4"\n').endswith(
        ":3: key 'compress' must be one of zstd, zlib, none, not 'lz4'")
    assert refused(tmp_path, 'compress = true\n').endswith(
        ":3: key 'compress' must be one of zstd, zlib, none, not a boolean")
    # encrypted images are not compressed (QEMU 7.2): refused where the two meet
    why = "encrypted images are stored uncompressed (QEMU writes no compressed clusters into LUKS qcow2)"
    assert refused(tmp_path, f'key_file = "{k}"\nencrypt = true\ncompress = "zstd"\n').endswith(
        f':5: key \'compress\' is "zstd", but key_file {k} applies here: {why}; set compress = "none" or leave it out')
    assert refused(tmp_path, f'compress = "zlib"\n[domain."db1"]\nkey_file = "{k}"\nencrypt = true\n').endswith(
        f':5: key \'domain."db1".key_file\' encrypts, but compress = "zlib" applies here: {why}; '
        'set compress = "none" beside it')
    assert refused(tmp_path, f'key_file = "{k}"\n[domain."db1"]\ncompress = "zstd"\n').endswith(
        f':5: key \'domain."db1".compress\' is "zstd", but key_file {k} applies here: {why}; '
        'set compress = "none" or leave it out')
    assert refused(tmp_path, '[domain."db1"]\ncompress = "gzip"\n').endswith(
        ":4: key 'domain.\"db1\".compress' must be one of zstd, zlib, none, not 'gzip'")
    assert refused(tmp_path, '[domain."db1"]\nlevel = "full"\n').endswith(
        ":4: key 'domain.\"db1\".level' is unknown (known keys: key_file, encrypt, compress, mode, scratch_dir)")
    assert refused(tmp_path, '[domain."db1"]\nencrypt = 1\n').endswith(
        ":4: key 'domain.\"db1\".encrypt' must be true or false, not an integer")
    # a table for a domain the job does not select: a typo, not silently ignored
    assert refused(tmp_path, f'[domain."db2"]\nkey_file = "{k}"\n').endswith(
        ":3: key 'domain.\"db2\"' names a domain that key 'domains' does not select (by name or glob)")
    assert refused(tmp_path, 'domain = "db1"\n').endswith(
        ":3: key 'domain' must be tables of domain names ([domain.\"NAME\"]), not a string")
    assert refused(tmp_path, 'domain = {db1 = 3}\n').endswith(
        "key 'domain.\"db1\"' must be a table, not an integer")
    assert "names a domain a job never backs up" in refused(tmp_path, '[domain.".."]\n')
    assert "'keys'" in refused(tmp_path, "keys = 1\n")      # the known keys are listed
    assert "key_file, encrypt, compress, mode, scratch_dir, domain" in refused(tmp_path, "keys = 1\n")


def point(pid: str) -> Point:
    return Point(id=pid, level="full", created="2026-01-01T00:00:00+00:00", checkpoint="c", base_checkpoint=None,
                 parent=None, chain=pid, disks={}, domain_xml="", checkpoint_xml="")


def test_chain_problem_and_dry_run_plan_say_what_does_not_fit(tmp_path):
    from virtbackup.qemu.keys import Key
    from virtbackup.store import crypto
    k = keyfile(tmp_path / "k")
    enc = crypto.ChainEncryption.new(Key(b"pass", "test"), 10)
    plain = Chain("d", "u", points=[point("0001")])
    encrypted = Chain("d", "u", points=[point("0001")], encryption=enc)
    b, jp = tmp_path / "d", tmp_path / "j.toml"
    with_key, with_key_enc, none = jobs.DomainSettings(k), jobs.DomainSettings(k, True), jobs.DomainSettings()
    assert none.chain_problem(None, b, jp) is None and none.chain_problem(plain, b, jp) is None
    assert none.chain_problem(encrypted, b, jp) == f"{b} is encrypted; job file {jp} gives this domain no key_file"
    assert with_key.chain_problem(encrypted, b, jp) is None and with_key_enc.chain_problem(encrypted, b, jp) is None
    assert with_key_enc.chain_problem(None, b, jp) is None
    assert with_key_enc.chain_problem(Chain("d", "u"), b, jp) is None
    assert with_key.chain_problem(None, b, jp) == (f"{b} holds no backups yet; set encrypt = true in job file {jp} "
                                                   f"to start an encrypted chain with key_file {k}")
    for s in (with_key, with_key_enc):
        assert s.chain_problem(plain, b, jp) == (f"{b} holds unencrypted backups, but job file {jp} gives this "
                                                 f"domain key_file {k}; an encrypted chain needs a new backup "
                                                 "directory")
    # the dry run reports it per domain, before anything runs
    job = load(tmp_path, f'compress = "zstd"\n[domain."db1"]\nkey_file = "{k}"\ncompress = "none"\n'
                         f'[domain."web-2"]\nkey_file = "{k}"\nencrypt = true\ncompress = "none"\n')
    planned = {p.domain: p for p in jobs.plan(job, jobs.select(job, [C("db1"), C("web-1"), C("web-2")]))}
    assert planned["db1"].action == "fail" and "set encrypt = true" in (planned["db1"].error or "")
    assert planned["web-1"].action == "backup" and (planned["web-1"].why or "").endswith("(running, compress zstd)")
    assert planned["web-2"].action == "backup"
    assert (planned["web-2"].why or "").endswith(f"(running, encrypted with key file {k}, compress none)")


def test_mode_and_scratch_dir_top_level_per_domain_and_refusals(tmp_path):
    """Job files choose the transport (issue 23): mode = "auto" (backup's default: pull), "push" for
    a guest whose writes matter less than the backup's time, "pull"; and where scratch files go."""
    job = load(tmp_path, 'mode = "pull"\nscratch_dir = "/var/tmp/scratch"\n[domain."db1"]\nmode = "push"\n')
    assert job.for_domain("web-1").backup_args() == ["--mode", "pull", "--scratch-dir", "/var/tmp/scratch"]
    assert job.for_domain("db1").backup_args() == ["--mode", "push"]   # the job's scratch_dir is for its pulls
    job = load(tmp_path, 'mode = "pull"\nscratch_dir = "/var/tmp/scratch"\n[domain."db1"]\nscratch_dir = "/srv/s"\n')
    assert job.for_domain("db1").backup_args() == ["--mode", "pull", "--scratch-dir", "/srv/s"]
    job = load(tmp_path, '[domain."db1"]\nmode = "pull"\n')
    assert job.for_domain("web-1").backup_args() == [] and job.for_domain("db1").backup_args() == ["--mode", "pull"]
    # scratch_dir alone: backup then pulls (as --scratch-dir without --mode does)
    assert load(tmp_path, 'scratch_dir = "/s"\n').for_domain("web-1").backup_args() == ["--scratch-dir", "/s"]
    for mode in ("auto", "push", "pull"):
        assert load(tmp_path, f'mode = "{mode}"\n').settings.mode == mode
    # auto with a scratch_dir pulls; a domain table's auto keeps the top level's scratch_dir
    job = load(tmp_path, 'scratch_dir = "/s"\n[domain."db1"]\nmode = "auto"\n')
    assert job.for_domain("db1").backup_args() == ["--mode", "auto", "--scratch-dir", "/s"]
    assert refused(tmp_path, 'mode = "fast"\n').endswith(":3: key 'mode' must be one of auto, push, pull, not 'fast'")
    assert refused(tmp_path, 'mode = ""\n').endswith(":3: key 'mode' must be one of auto, push, pull, not ''")
    assert refused(tmp_path, 'mode = 1\n').endswith(":3: key 'mode' must be one of auto, push, pull, not an integer")
    assert refused(tmp_path, '[domain."db1"]\nmode = "Pull"\n').endswith(
        ":4: key 'domain.\"db1\".mode' must be one of auto, push, pull, not 'Pull'")
    assert refused(tmp_path, 'scratch_dir = "scratch"\n').endswith(
        ":3: key 'scratch_dir' must be an absolute path on the hypervisor, not 'scratch'")
    assert refused(tmp_path, 'scratch_dir = ""\n').endswith(
        ":3: key 'scratch_dir' must be an absolute path on the hypervisor, not ''")
    assert refused(tmp_path, 'mode = "push"\nscratch_dir = "/s"\n').endswith(
        ":4: key 'scratch_dir' is '/s', but mode is \"push\" here: scratch files are for pull mode; "
        'set mode = "pull" or leave mode out')
    assert refused(tmp_path, '[domain."db1"]\nmode = "push"\nscratch_dir = "/s"\n').endswith(
        ":5: key 'domain.\"db1\".scratch_dir' is '/s', but mode is \"push\" here: scratch files are for pull "
        'mode; set mode = "pull" or leave mode out')
    # the push comes from the top level: say so, and where to change it
    assert refused(tmp_path, 'mode = "push"\n[domain."db1"]\nscratch_dir = "/s"\n').endswith(
        ":5: key 'domain.\"db1\".scratch_dir' is '/s', but the top level's mode = \"push\" applies here: "
        'scratch files are for pull mode; set mode = "pull" in this table')
    # control characters (TOML escapes) never reach a child's argv or a one-line message
    for bad, shown in (("/tmp/a\\u0000b", "'/tmp/a\\x00b'"), ("/tmp/a\\nb", "'/tmp/a\\nb'"),
                       ("/tmp/\\u001b[31mred", "'/tmp/\\x1b[31mred'")):
        assert refused(tmp_path, f'scratch_dir = "{bad}"\n').endswith(
            f":3: key 'scratch_dir' must not contain control characters: {shown}")
    assert refused(tmp_path, 'scratch_dir = """/tmp\n"""\n').endswith(
        ":3: key 'scratch_dir' must not contain control characters: '/tmp\\n'")
    # the dry run shows the mode backup will use: scratch_dir alone means pull
    job = load(tmp_path, 'scratch_dir = "/var/tmp/s"\n')
    why = next(p.why for p in jobs.plan(job, jobs.select(job, [C("web-1")])) if p.domain == "web-1")
    assert "mode pull, scratch files in '/var/tmp/s'" in (why or ""), why


def test_runner_gives_key_file_and_compress_to_backup_and_prune_children(tmp_path, monkeypatch):
    """run_one's wiring: each child gets the path in argv (never the key, never the environment);
    prune gets the key too (an encrypted dir's prune needs it); a domain whose dir does not fit its
    key starts no child at all."""
    k = keyfile(tmp_path / "k")
    job = load(tmp_path, f'compress = "zstd"\n[retention]\nkeep = 2\n[domain."web-1"]\nkey_file = "{k}"\n'
                         f'encrypt = true\ncompress = "none"\n[domain."db1"]\nkey_file = "{k}"\ncompress = "none"\n')
    seen: List[List[str]] = []
    envs: List[str] = []
    fake = ("import json, os, sys\n"
            "open(sys.argv[1], 'a').write(json.dumps(dict(os.environ)) + '\\n')\n"
            "print(json.dumps({'point': {'level': 'full', 'id': '0001', 'size': 1}, 'dropped': []}))\n")
    env_log = tmp_path / "env.log"

    def cli(uri, *args):
        seen.append(list(args))
        return [sys.executable, "-c", fake, str(env_log)]

    monkeypatch.setattr(jobs, "_cli", cli)
    selected = jobs.select(job, [C("web-1"), C("web-2"), C("db1")])
    result = jobs.JobRun(job, selected, None).run()
    by = {d.domain: d for d in result.domains}
    assert by["web-1"].status == "ok" and by["web-2"].status == "ok", by
    # db1: key_file without encrypt and no backups yet: refused before any child, said in job terms
    assert by["db1"].status == "failed" and "set encrypt = true" in (by["db1"].error or "")
    backups = {a[2]: a for a in seen if a[0] == "backup"}
    assert sorted(backups) == [str(tmp_path / "web-1"), str(tmp_path / "web-2")] and len(seen) == 4
    backup1, backup2 = backups[str(tmp_path / "web-1")], backups[str(tmp_path / "web-2")]
    assert backup1[-5:] == ["--key-file", str(k), "--encrypt", "--compress", "none"]
    assert backup2[-3:] == ["--quiesce=auto", "--compress", "zstd"]
    prunes = sorted(a for a in seen if a[0] == "prune")
    assert prunes == [["prune", str(tmp_path / "web-1"), "--keep", "2", "--key-file", str(k), "--json"],
                      ["prune", str(tmp_path / "web-2"), "--keep", "2", "--json"]]
    envs = env_log.read_text().splitlines()
    assert len(envs) == 4 and not [e for e in envs if "canary" in e]
    assert not [a for args in seen for a in args if "canary" in a]
