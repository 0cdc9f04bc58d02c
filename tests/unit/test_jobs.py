"""Job files, domain selection, level choice, prune preview and the metrics text (pure logic)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from virtbackup import jobs
from virtbackup.errors import UsageError
from virtbackup.store import metrics
from virtbackup.store.chain import Chain, DiskImage, Point
from virtbackup.store.retention import Policy, decide


def write_job(tmp_path: Path, body: str, name: str = "nightly.toml") -> Path:
    p = tmp_path / name
    p.write_text(body.replace("ROOT", str(tmp_path)))
    return p


GOOD = '''backup_root = "ROOT"
domains = ["web-*", "db1"]
exclude = ["web-scratch*"]
level = "auto"
full_every_days = 7
max_chain = 30
quiesce = "auto"
parallel = 2
metrics_file = "ROOT/virtbackup.prom"

[retention]
keep = 7
keep_daily = 14
keep_weekly = 8
keep_monthly = 12
'''


def test_good_job_file_loads(tmp_path):
    job = jobs.load_job(write_job(tmp_path, GOOD))
    assert job.name == "nightly"
    assert job.backup_root == tmp_path
    assert job.domains == ["web-*", "db1"] and job.exclude == ["web-scratch*"]
    assert (job.level, job.full_every_days, job.max_chain, job.parallel) == ("auto", 7, 30, 2)
    assert job.metrics_file == tmp_path / "virtbackup.prom"
    assert job.retention == Policy(7, 14, 8, 12)
    assert job.retention.prune_args() == ["--keep", "7", "--keep-daily", "14", "--keep-weekly", "8",
                                          "--keep-monthly", "12"]


def test_defaults(tmp_path):
    job = jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains = ["*"]\n'))
    assert (job.level, job.parallel, job.quiesce, job.retention, job.metrics_file) == ("auto", 1, "auto", None, None)


@pytest.mark.parametrize("change, key, what", [
    ('paralel = 2', "paralel", "is unknown"),
    ('parallel = "2"', "parallel", "must be a whole number from 1 to 64, not a string"),
    ('parallel = 0', "parallel", "must be from 1 to 64, not 0"),
    ('parallel = true', "parallel", "not a boolean"),
    ('level = "incremental"', "level", "must be one of auto, full, inc, diff"),
    ('quiesce = "sometimes"', "quiesce", "must be one of auto, require, off"),
    ('max_chain = -1', "max_chain", "must be from 0 (no limit) to 100000, not -1"),
    ('exclude = ["web-["]', "exclude", "unclosed '['"),
    ('exclude = ["a/b"]', "exclude", "contains '/'"),
    ('exclude = [1]', "exclude", "not a list holding an integer"),
    ('metrics_file = "relative.prom"', "metrics_file", "must be an absolute path"),
    ('metrics_file = "/nonexistent-dir-vb/x.prom"', "metrics_file", "not an existing directory"),
    ('retention = 3', "retention", "must be a table"),
])
def test_bad_top_level_keys_name_file_line_and_key(tmp_path, change, key, what):
    path = write_job(tmp_path, f'backup_root = "ROOT"\n# a comment\ndomains = ["*"]\n{change}\n')
    line = 4
    with pytest.raises(jobs.JobFileError) as e:
        jobs.load_job(path)
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert f"job file {path}:{line}: key '{key}'" in msg, msg
    assert what in msg, msg


def test_bad_retention_key_names_its_table_and_line(tmp_path):
    path = write_job(tmp_path, GOOD.replace("keep_weekly = 8", "keep_yearly = 8"))
    with pytest.raises(jobs.JobFileError, match=rf"{path}:14: key 'retention.keep_yearly' is unknown"):
        jobs.load_job(path)
    path = write_job(tmp_path, GOOD.replace("keep_weekly = 8", 'keep_weekly = "8"'))
    with pytest.raises(jobs.JobFileError, match=r":14: key 'retention.keep_weekly' must be a whole number"):
        jobs.load_job(path)


def test_retention_that_keeps_nothing_is_refused(tmp_path):
    path = write_job(tmp_path, 'backup_root = "ROOT"\ndomains = ["*"]\n[retention]\nkeep = 0\n')
    with pytest.raises(jobs.JobFileError, match=r":3: key 'retention' keeps nothing"):
        jobs.load_job(path)


def test_invalid_toml_and_missing_things(tmp_path):
    with pytest.raises(jobs.JobFileError, match=r"invalid TOML: .*line 2"):
        jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains ["*"]\n'))
    with pytest.raises(jobs.JobFileError, match="key 'domains' is missing"):
        jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\n'))
    with pytest.raises(jobs.JobFileError, match="must name at least one"):
        jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains = []\n'))
    with pytest.raises(jobs.JobFileError, match="not an existing directory"):
        jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT/nope"\ndomains = ["*"]\n'))
    with pytest.raises(jobs.JobFileError, match="cannot read job file"):
        jobs.load_job(tmp_path / "missing.toml")


def test_quiesce_modes_of_a_job_file(tmp_path):
    """Every mode the CLI takes is a job file's too (one definition, options.QUIESCE_MODES); reading a
    job file loads no libvirt (it used to, to inspect backup()'s signature)."""
    import sys

    for mode in ("auto", "require", "off"):
        path = write_job(tmp_path, f'backup_root = "ROOT"\ndomains = ["*"]\nquiesce = "{mode}"\n')
        assert jobs.load_job(path).quiesce == mode
    with pytest.raises(jobs.JobFileError, match=r":3: key 'quiesce' must be one of auto, require, off"):
        jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains = ["*"]\nquiesce = "always"\n', "bad.toml"))
    code = ("import sys; from virtbackup import jobs; from pathlib import Path; jobs.load_job(Path(sys.argv[1])); "
            "assert 'libvirt' not in sys.modules, 'job file reading loaded libvirt'")
    import subprocess
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def C(name: str, persistent: bool = True) -> jobs.Candidate:
    return jobs.Candidate(name, f"uuid-{name}", True, persistent)


def test_selection_globs_exclude_transient_unsafe_and_missing(tmp_path):
    job = jobs.load_job(write_job(tmp_path, GOOD))
    cands = [C("web-1"), C("web-2", persistent=False), C("web-scratch1"), C("db1"), C("other"), C("web-..")]
    sel = {s.name: s for s in jobs.select(job, cands)}
    assert sorted(sel) == ["db1", "web-..", "web-1", "web-2"]
    assert sel["web-1"].backup_dir == tmp_path / "web-1" and sel["web-1"].problem is None
    assert "transient" in sel["web-2"].problem and not sel["web-2"].fails and sel["web-2"].backup_dir is None
    assert sel["db1"].problem is None
    # "web-.." is a fine directory name; "." and ".." are not
    assert jobs.unsafe_dir_name("..") and jobs.unsafe_dir_name(".") and jobs.unsafe_dir_name("a/b")
    assert jobs.unsafe_dir_name("a\nb") and jobs.unsafe_dir_name("x" * 256)
    assert jobs.unsafe_dir_name("web-..") is None


def test_selection_explicit_names_fail_when_missing_or_transient(tmp_path):
    job = jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains = ["db1", "gone", "t*"]\n'))
    sel = {s.name: s for s in jobs.select(job, [C("db1", persistent=False), C("t1", persistent=False)])}
    assert sel["gone"].fails and "not found" in sel["gone"].problem
    assert sel["db1"].fails and "transient" in sel["db1"].problem
    assert not sel["t1"].fails and "transient" in sel["t1"].problem       # matched by a glob: reported
    only = jobs.select(job, [C("db1"), C("t1")], only=["t1"])
    assert [s.name for s in only] == ["t1"]
    with pytest.raises(UsageError, match="'zzz' is not selected by job file"):
        jobs.select(job, [C("db1")], only=["zzz"])


def point(pid: str, created: datetime, chain: str, level: str = "inc") -> Point:
    return Point(id=pid, level=level, created=created.isoformat(), checkpoint=f"cp-{pid}", base_checkpoint=None,
                 parent=None, chain=chain, disks={"vda": DiskImage(f"points/{pid}/vda.qcow2", None, 1, 1, "")},
                 domain_xml="", checkpoint_xml="")


def test_choose_level_limits(tmp_path):
    job = jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains = ["*"]\nmax_chain = 3\n'
                                             'full_every_days = 7\n'))
    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    chain = Chain("d", "u", points=[point("0001", now - timedelta(days=2), "0001", "full"),
                                    point("0002", now - timedelta(days=1), "0001")], next_seq=3)
    assert jobs.choose_level(job, None, now) == ("auto", None)
    assert jobs.choose_level(job, chain, now) == ("auto", None)
    chain.points.append(point("0003", now, "0001"))
    chain.next_seq = 4
    level, why = jobs.choose_level(job, chain, now)
    assert level == "full" and "has 3 point(s) (max_chain = 3)" in why
    chain.points.pop()
    level, why = jobs.choose_level(job, chain, now + timedelta(days=5))
    assert level == "full" and "full_every_days = 7" in why
    job.level = "inc"
    assert jobs.choose_level(job, chain, now + timedelta(days=5)) == ("inc", None)


def test_prune_preview_counts_the_next_point(tmp_path):
    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    chain = Chain("d", "u", points=[point(f"000{i}", now - timedelta(days=4 - i), "0001") for i in range(1, 4)],
                  next_seq=4)
    assert jobs.prune_preview(chain, Policy(keep=2), now) == ["0001", "0002"]
    assert jobs.prune_preview(chain, None, now) == []


def test_keep_monthly():
    base = datetime(2026, 6, 15, tzinfo=timezone.utc)
    pts = [point(f"{i:04d}", base + timedelta(days=10 * i), "0001") for i in range(1, 13)]
    d = {x.point: x for x in decide(pts, Policy(keep_monthly=3))}
    kept = [p for p, x in d.items() if x.keep]
    # newest of each of the 3 newest months: 2026-10 (0012, Oct 15? no: day 120 = Oct 13), ...
    months = sorted({(base + timedelta(days=10 * int(p))).strftime("%Y-%m") for p in kept})
    assert len(kept) == 3 and len(months) == 3
    assert all("--keep-monthly 3" in d[p].reasons[0] for p in kept)
    with pytest.raises(UsageError, match="--keep-monthly N"):
        Policy().check()


def test_metrics_text_parses_with_prometheus_parser(tmp_path):
    r = jobs.RunResult("nightly", "s", "f", [
        jobs.DomainResult("a", "ok", "full", "0001", 123, 1.5, points=1, chain_length=1, last_success=1700000000.5),
        jobs.DomainResult("b\"x", "failed", error="boom", seconds=0.2),
        jobs.DomainResult("c", "skipped")], started_ts=1700000000.0, finished_ts=1700000010.0)
    out = tmp_path / "m.prom"
    metrics.write(out, r)
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    fams = {f.name: f for f in text_string_to_metric_families(out.read_text())}
    val = {(f.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert val[("virtbackup_job_success", (("job", "nightly"),))] == 0
    assert val[("virtbackup_job_end_time_seconds", (("job", "nightly"),))] == 1700000010.0
    assert val[("virtbackup_domain_status", (("domain", "b\"x"), ("job", "nightly"), ("status", "failed")))] == 1
    assert val[("virtbackup_domain_bytes_written", (("domain", "a"), ("job", "nightly")))] == 123
    assert ("virtbackup_domain_duration_seconds", (("domain", "c"), ("job", "nightly"))) not in val
    assert not list(tmp_path.glob(".m.prom*"))          # no temp file left


# after jobs.IGNORE_SIGNALS, like a real child: deaf to signals until its "job" runs (1 s later)
CHILD = r'''
import json, os, signal, sys, time
open(os.path.join(READY, str(os.getpid())), "w").close()
time.sleep(1)
def stop(signum, _frame):
    name = signal.Signals(signum).name
    msg = f"backup interrupted by {name}; nothing was recorded"
    print(json.dumps({"error": {"kind": "interrupted", "message": msg, "exit_code": 1}}))
    print(f"virtbackup: error: {msg}", file=sys.stderr)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("started", file=sys.stderr, flush=True)
time.sleep(60)
'''


def test_runner_forwards_ctrl_c_to_running_children_and_skips_queued(tmp_path, monkeypatch):
    """The scheduling and signal logic of `run`, with stand-in children that behave like an
    interrupted `backup` (the real thing: tests/integration/test_jobs.py, SIGTERM)."""
    import os
    import signal
    import sys
    import threading
    import time

    job = jobs.load_job(write_job(tmp_path, 'backup_root = "ROOT"\ndomains = ["d*"]\nparallel = 2\n'))
    ready = tmp_path / "ready"
    ready.mkdir()
    script = jobs.IGNORE_SIGNALS + f"READY = {str(ready)!r}\n" + CHILD
    monkeypatch.setattr(jobs, "_cli", lambda uri, *args: [sys.executable, "-c", script])
    selected = jobs.select(job, [C("d1"), C("d2"), C("d3")])
    seen = []
    runner = jobs.JobRun(job, selected, None, lambda d, phase, _u: seen.append((d, phase)))

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # both children ignore signals now and take them only in a second: the runner repeats
        # the signal until their "jobs" do
        os.kill(os.getpid(), signal.SIGINT)   # what a terminal's Ctrl-C does to the runner

    t = threading.Thread(target=interrupt)
    t.start()
    started = time.monotonic()
    result = runner.run()
    t.join()
    assert time.monotonic() - started < 20
    assert result.interrupted == "SIGINT" and not result.ok
    by = {d.domain: d for d in result.domains}
    for name in ("d1", "d2"):
        assert by[name].status == "failed"
        assert by[name].error == "backup interrupted by SIGINT; nothing was recorded"
    assert by["d3"].status == "skipped" and by["d3"].error == "not started: the run was stopped by SIGINT"
    assert ("d3", "queued") in seen and ("d3", "skipped") in seen and ("d3", "backup") not in seen
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # handlers given back


# --- hostile pass (issue 22): D1, D3, D14; each of these failed on 0.2 ------------------------------
def test_huge_whole_numbers_are_refused_at_load_with_line_and_key(tmp_path):
    """D1: full_every_days = 1000000000 loaded, then every later run died of OverflowError."""
    for key, most in (("full_every_days", jobs.MAX_FULL_EVERY_DAYS), ("max_chain", jobs.MAX_CHAIN)):
        path = write_job(tmp_path, f'backup_root = "ROOT"\ndomains = ["*"]\n{key} = 1000000000\n')
        with pytest.raises(jobs.JobFileError, match=rf":3: key '{key}' must be from 0 \(no limit\) to {most}"):
            jobs.load_job(path)
        ok = jobs.load_job(write_job(tmp_path, f'backup_root = "ROOT"\ndomains = ["*"]\n{key} = {most}\n'))
        assert getattr(ok, key) == most
    job = jobs.load_job(write_job(tmp_path, f'backup_root = "ROOT"\ndomains = ["*"]\n'
                                            f'full_every_days = {jobs.MAX_FULL_EVERY_DAYS}\n'))
    chain = Chain("d", "u", "id", [point("0001", datetime(2020, 1, 1, tzinfo=timezone.utc), "0001", "full")])
    assert jobs.choose_level(job, chain)[0] == "auto"          # no OverflowError at the largest value


def test_an_exact_name_wins_over_a_glob():
    """D3: domains = ["hx-g[1]"] backed up hx-g1 and never the domain named hx-g[1]."""
    job = jobs.Job(Path("/j.toml"), "j", Path("/b"), ["hx-g[1]"])
    sel = jobs.select(job, [C("hx-g[1]"), C("hx-g1")])
    assert [(s.name, s.problem) for s in sel] == [("hx-g[1]", None)]
    # the glob still works where no domain has that name
    assert [s.name for s in jobs.select(job, [C("hx-g1")])] == ["hx-g1"]
    # and an exclude entry that is a domain's name excludes that domain, not what it matches as a glob
    job2 = jobs.Job(Path("/j.toml"), "j", Path("/b"), ["hx-*"], exclude=["hx-g[1]"])
    assert [s.name for s in jobs.select(job2, [C("hx-g[1]"), C("hx-g1")])] == ["hx-g1"]


def test_an_empty_selection_fails_the_run_unless_allowed(tmp_path, monkeypatch):
    """D14: a job selecting nothing (typo, exclude covering all) exited 0 with job_success 1."""
    monkeypatch.setenv("VIRTBACKUP_RUN_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(jobs, "list_candidates", lambda uri: [C("web1")])
    prom = tmp_path / "m.prom"
    body = f'backup_root = "ROOT"\ndomains = ["web-*"]\nmetrics_file = "{prom}"\n'
    r = jobs.run(jobs.load_job(write_job(tmp_path, body)))
    assert not r.ok and r.domains == [] and "selects no domain" in (r.error or "")
    assert "virtbackup_job_success{job=\"nightly\"} 0" in prom.read_text()
    r = jobs.run(jobs.load_job(write_job(tmp_path, body + "allow_empty = true\n")))
    assert r.ok and r.error is None
    assert "virtbackup_job_success{job=\"nightly\"} 1" in prom.read_text()
    with pytest.raises(jobs.JobFileError, match="allow_empty' must be true or false"):
        jobs.load_job(write_job(tmp_path, body + 'allow_empty = "yes"\n'))
