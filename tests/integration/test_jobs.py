"""Whole-host jobs (`virtbackup run JOBFILE`) on the real libvirtd: selection, parallel backups,
failures that stay with their domain, chain limits, retention, SIGTERM, metrics and --json schemas.

Every job selects only this test's own domains by a unique glob (other test runs share libvirtd).
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_faults import pause_job
from tests.support.helpers import (
    assert_point_restores,
    checkpoint_names,
    cli,
    finish,
    one_error_line,
    snapshot_dir,
    start_cli,
)
from tests.support.qemu import slow_reads
from tests.support.schemas import validate, validate_output

MiB = 1 << 20


def job_file(tmp_path: Path, prefix: str, extra: str = "", name: str = "nightly") -> Path:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    p = tmp_path / f"{name}.toml"
    p.write_text(f'backup_root = "{root}"\ndomains = ["{prefix}-*"]\nparallel = 2\n{extra}')
    return p


def run(job: Path, *args: object, expect_rc: int) -> dict:
    r = cli("run", job, "--json", *args)
    assert r.rc == expect_rc, r
    return validate_output("run", r.out, r.rc)


def by_domain(out: dict) -> Dict[str, dict]:
    return {d["domain"]: d for d in out["domains"]}


def metric_values(path: Path) -> Dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def restore_all(tmp_path: Path, bdir: Path, expected: Dict[str, Dict[str, bytes]]) -> None:
    for pid, want in expected.items():
        out = tmp_path / f"restore-{bdir.name}-{pid}-{time.monotonic_ns()}"
        assert_point_restores(bdir, pid, want, out)
        subprocess.run(["rm", "-rf", str(out)], check=False)


def test_job_three_domains_failure_chains_retention_metrics(make_domain, tmp_path):
    from tests.support import scratch
    prefix = f"vbjob-{secrets.token_hex(3)}"
    a = make_domain({"vda": 16 * MiB}, name=f"{prefix}-a")                # running
    b = make_domain({"vda": 16 * MiB}, start=False, name=f"{prefix}-b")   # shut off: offline backup
    c = make_domain({"vda": 16 * MiB}, name=f"{prefix}-c")                # its dir is another domain's
    prom = tmp_path / "virtbackup.prom"
    job = job_file(tmp_path, prefix, f'max_chain = 2\nmetrics_file = "{prom}"\n[retention]\nkeep = 2\n')
    root = tmp_path / "root"
    cdir = root / c.name
    cdir.mkdir(mode=0o700)
    (cdir / "virtbackup.json").write_text(json.dumps({
        "schema": 1, "domain_name": "someone-else", "domain_uuid": "00000000-0000-4000-8000-000000000001",
        "dir_id": "0badc0de", "points": [], "next_seq": 1, "path": str(cdir)}))
    c_before = snapshot_dir(cdir)
    c_names = sorted(p.name for p in cdir.rglob("*"))
    expected: Dict[str, Dict[str, Dict[str, bytes]]] = {a.name: {}, b.name: {}}

    def write(n: int) -> None:
        a.write("vda", 0x10 + n, n * MiB, 2 * MiB)
        scratch.write_offline(b, "vda", 0x20 + n, (n + 3) * MiB, MiB)

    # dry run first: says what it would do, changes nothing
    write(1)
    plan = run(job, "--dry-run", expect_rc=0)
    assert plan["dry_run"] is True
    pd = by_domain(plan)
    assert pd[a.name]["action"] == "backup" and "full: no previous backup" in pd[a.name]["why"]
    assert "shut off" in pd[b.name]["why"]
    assert pd[c.name]["action"] == "fail" and "someone-else" in pd[c.name]["error"]
    assert not (root / a.name).exists() and not prom.exists()
    r = cli("run", job, "--dry-run")
    assert r.rc == 0 and f"{a.name}: would back up into {root / a.name}, level auto: full" in r.out, r
    assert f"{c.name}: would FAIL: {cdir} holds backups of domain 'someone-else'" in r.out, r

    # run 1: two fulls, c fails with the reason and its directory stays as it was
    out = run(job, expect_rc=1)
    res = by_domain(out)
    assert [d["domain"] for d in out["domains"]] == sorted([a.name, b.name, c.name])
    for d in (a, b):
        assert (res[d.name]["status"], res[d.name]["level"], res[d.name]["point"]) == ("ok", "full", "0001")
        assert res[d.name]["bytes"] > 0
        expected[d.name]["0001"] = d.expected()
    assert res[c.name]["status"] == "failed"
    assert "holds backups of domain 'someone-else'" in res[c.name]["error"]
    assert snapshot_dir(cdir) == c_before and sorted(p.name for p in cdir.rglob("*")) == c_names
    assert not checkpoint_names(c.dom)
    for d in (a, b):
        restore_all(tmp_path, root / d.name, {"0001": expected[d.name]["0001"]})
    m = metric_values(prom)
    assert m[("virtbackup_domain_status", (("domain", c.name), ("job", "nightly"), ("status", "failed")))] == 1

    # run 2: incrementals
    write(2)
    res = by_domain(run(job, expect_rc=1))
    for d in (a, b):
        assert (res[d.name]["status"], res[d.name]["level"], res[d.name]["point"]) == ("ok", "inc", "0002")
        expected[d.name]["0002"] = d.expected()

    # run 3: max_chain = 2 starts new chains; keep = 2 drops 0001 (0002 becomes a standalone base)
    write(3)
    r = cli("run", job, "--json")
    assert r.rc == 1
    assert one_error_line(r).startswith("virtbackup: error: 1 of 3 domain(s) failed: " + c.name)
    out = validate_output("run", r.out, r.rc)
    res = by_domain(out)
    for d in (a, b):
        x = res[d.name]
        assert (x["status"], x["level"], x["point"], x["pruned"]) == ("ok", "full", "0003", ["0001"])
        assert "max_chain = 2" in x["reason"]
        assert (x["points"], x["chain_length"]) == (2, 1)
        expected[d.name]["0003"] = d.expected()
        lst = cli("list", root / d.name, "--json")
        points = validate("list", json.loads(lst.out))["points"]
        assert [(p["id"], p["level"]) for p in points] == [("0002", "full"), ("0003", "full")]
        assert "max_chain = 2" in points[1]["reason"]          # recorded: `list` says why
        del expected[d.name]["0001"]
        restore_all(tmp_path, root / d.name, expected[d.name])
        assert cli("verify", root / d.name).rc == 0

    # the metrics file matches the run
    m = metric_values(prom)
    job_l = (("job", "nightly"),)
    assert m[("virtbackup_job_success", job_l)] == 0
    assert m[("virtbackup_job_interrupted", job_l)] == 0
    assert m[("virtbackup_job_domains", (("job", "nightly"), ("status", "ok")))] == 2
    assert m[("virtbackup_job_domains", (("job", "nightly"), ("status", "failed")))] == 1
    from datetime import datetime
    started = datetime.fromisoformat(out["started"]).timestamp()
    finished = datetime.fromisoformat(out["finished"]).timestamp()
    assert abs(m[("virtbackup_job_start_time_seconds", job_l)] - started) < 1.01
    assert abs(m[("virtbackup_job_end_time_seconds", job_l)] - finished) < 1.01
    for d in (a, b):
        lab = (("domain", d.name), ("job", "nightly"))
        x = res[d.name]
        assert m[("virtbackup_domain_status", lab + (("status", "ok"),))] == 1
        assert m[("virtbackup_domain_status", lab + (("status", "failed"),))] == 0
        assert m[("virtbackup_domain_bytes_written", lab)] == x["bytes"]
        assert m[("virtbackup_domain_duration_seconds", lab)] == pytest.approx(x["seconds"])
        assert m[("virtbackup_domain_points", lab)] == 2
        assert m[("virtbackup_domain_chain_length", lab)] == 1
        assert m[("virtbackup_domain_bytes_stored", lab)] == x["stored_bytes"] > 0
        listed = json.loads(cli("list", x["backup_dir"], "--json").out)
        assert x["stored_bytes"] == listed["stored_bytes"]
        assert m[("virtbackup_domain_compression_ratio", lab)] == pytest.approx(listed["compression_ratio"])
        assert listed["compression_ratio"] > 0.5      # uncompressed: data / stored, about 1
        assert started - 1 <= m[("virtbackup_domain_last_success_time_seconds", lab)] <= finished + 1
    lab_c = (("domain", c.name), ("job", "nightly"))
    assert ("virtbackup_domain_last_success_time_seconds", lab_c) not in m   # never succeeded
    assert m[("virtbackup_domain_bytes_written", lab_c)] == 0
    assert oct(prom.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in prom.parent.iterdir() if p.name.startswith(".virtbackup.prom")] == []

    # --domain narrows the run; a domain the job does not select is bad usage (exit 2)
    a.write("vda", 0x55, 0, MiB)
    res = by_domain(run(job, "--domain", a.name, expect_rc=0))
    assert list(res) == [a.name] and res[a.name]["level"] == "inc"
    r = cli("run", job, "--domain", "not-in-this-job", "--json")
    assert r.rc == 2 and "is not selected by job file" in one_error_line(r)
    validate_output("run", r.out, r.rc)


@pytest.fixture
def children():
    """Background runs of a test; any still alive at the end is killed (by pid), then reaped."""
    started: List[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)


def _pause_both(doms: List[libvirt.virDomain], proc: subprocess.Popen) -> bool:
    """Pause the backup jobs of both domains as soon as they exist (in parallel threads)."""
    ok = [False] * len(doms)

    def pause(i: int) -> None:
        ok[i] = pause_job(doms[i], proc, timeout=60)

    threads = [threading.Thread(target=pause, args=(i,)) for i in range(len(doms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(ok)


def test_sigterm_aborts_running_backups_and_skips_queued(make_domain, tmp_path, children):
    prefix = f"vbjob-{secrets.token_hex(3)}"
    a = make_domain({"vda": 128 * MiB}, name=f"{prefix}-a")
    b = make_domain({"vda": 128 * MiB}, name=f"{prefix}-b")
    q = make_domain({"vda": 16 * MiB}, name=f"{prefix}-q")        # third in name order: queued
    prom = tmp_path / "m.prom"
    # push: the test holds QEMU's block jobs (a pull job's copy is ours, not a block job)
    job = job_file(tmp_path, prefix, f'metrics_file = "{prom}"\nmode = "push"\n')
    root = tmp_path / "root"
    expected: Dict[str, Dict[str, Dict[str, bytes]]] = {d.name: {} for d in (a, b, q)}
    for d in (a, b, q):
        d.write("vda", 0x11, 0, MiB)
    res = by_domain(run(job, expect_rc=0))
    for d in (a, b, q):
        expected[d.name][res[d.name]["point"]] = d.expected()

    for d in (a, b):
        d.write("vda", 0x60, 0, 96 * MiB)       # more than the 64 MiB block-copy reads at once
    q.write("vda", 0x70, MiB, MiB)
    before = {d.name: (snapshot_dir(root / d.name), checkpoint_names(d.dom)) for d in (a, b, q)}
    # a's and b's jobs read 8 MiB/s at most: both are in flight for seconds, however loaded the host
    with slow_reads(a.dom, "vda", iops=8) as lift_a, slow_reads(b.dom, "vda", iops=8) as lift_b:
        proc = start_cli("run", job, "--json")
        children.append(proc)
        assert _pause_both([a.dom, b.dom], proc), "the backup jobs ended before they were held"
        lift_a()
        lift_b()          # paused: the jobs go no further, and the abort need not wait for reads

        # a second run of the same job while this one runs: refused at once, nothing touched
        r = cli("run", job, "--json")
        assert r.rc == 1 and f"is using job file {job}" in one_error_line(r), r
        assert validate_output("run", r.out, r.rc)["error"]["kind"] == "locked"

        # both jobs are in flight, q waits in the queue: stop the run like systemd does
        proc.send_signal(signal.SIGTERM)
        r = finish(proc, timeout=120)
    assert r.rc == 1, r
    assert one_error_line(r) == ("virtbackup: error: run of job nightly stopped by SIGTERM: running backups "
                                 "were aborted and rolled back, queued domains skipped")
    out = validate_output("run", r.out, r.rc)
    assert out["interrupted"] == "SIGTERM"
    res = by_domain(out)
    for d in (a, b):
        assert res[d.name]["status"] == "failed"
        assert "interrupted by SIGTERM; nothing was recorded" in res[d.name]["error"]
        files, cps = before[d.name]
        assert snapshot_dir(root / d.name) == files, "the interrupted backup changed the directory"
        assert checkpoint_names(d.dom) == cps, "the interrupted backup left its checkpoint"
        assert d.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
        assert not list((root / d.name / "points").glob("*.partial"))
    assert res[q.name]["status"] == "skipped" and "not started" in res[q.name]["error"]
    assert snapshot_dir(root / q.name) == before[q.name][0]
    m = metric_values(prom)
    assert m[("virtbackup_job_interrupted", (("job", "nightly"),))] == 1
    assert m[("virtbackup_domain_status", (("domain", q.name), ("job", "nightly"), ("status", "skipped")))] == 1

    # the next run continues every chain with an incremental holding every write
    res = by_domain(run(job, expect_rc=0))
    for d in (a, b, q):
        x = res[d.name]
        assert x["status"] == "ok" and x["level"] == "inc", x
        expected[d.name][x["point"]] = d.expected()
        restore_all(tmp_path, root / d.name, {x["point"]: expected[d.name][x["point"]]})


def _pty_run(args: List[str], timeout: float = 120) -> "tuple[int, str]":
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal; everything it printed."""
    import os
    import pty
    import select
    import sys

    from tests.support.helpers import ROOT
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "virtbackup.cli", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:        # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                buf += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, buf.decode(errors="replace")


BAR = "\u2501"          # rich's bar character


def test_progress_bars_on_a_terminal_never_in_a_pipe(make_domain, tmp_path):
    prefix = f"vbjob-{secrets.token_hex(3)}"
    d = make_domain({"vda": 16 * MiB}, name=f"{prefix}-a")
    d.write("vda", 0x31, 0, 8 * MiB)
    bdir = tmp_path / "bk"
    rc, out = _pty_run(["backup", d.name, str(bdir)])
    assert rc == 0, out
    assert f"backup {d.name}" in out and BAR in out and "\x1b[" in out, out
    assert "point 0001: full pull backup" in out
    rc, out = _pty_run(["restore", str(bdir), str(tmp_path / "r1")])
    assert rc == 0 and "restore vda.qcow2" in out and BAR in out, out
    rc, out = _pty_run(["verify", str(bdir)])
    assert rc == 0 and "verify images" in out and BAR in out, out
    job = job_file(tmp_path, prefix)
    d.write("vda", 0x32, 0, MiB)
    rc, out = _pty_run(["run", str(job)])
    assert rc == 0 and BAR in out and d.name in out, out
    # off on a terminal: --no-progress and --json
    d.write("vda", 0x33, 0, MiB)
    rc, out = _pty_run(["backup", d.name, str(bdir), "--no-progress"])
    assert rc == 0 and BAR not in out and "\x1b[" not in out, out
    rc, out = _pty_run(["run", str(job), "--json"])
    assert rc == 0 and BAR not in out and "\x1b[" not in out, out
    validate("run", json.loads(out))
    # in pipes: exactly the plain output
    d.write("vda", 0x34, 0, MiB)
    for args in (["backup", d.name, bdir], ["verify", bdir], ["restore", bdir, tmp_path / "r2"], ["run", job]):
        r = cli(*args)
        assert r.rc == 0, r
        assert BAR not in r.out + r.err and "\x1b[" not in r.out + r.err, r


def test_bad_job_files_exit_2_with_one_line(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text(f'backup_root = "{root}"\ndomains = ["vbjob-none-*"]\nparallel = "two"\n')
    r = cli("run", bad)
    assert r.rc == 2 and r.out == ""
    assert one_error_line(r) == (f"virtbackup: error: job file {bad}:3: key 'parallel' must be a whole number "
                                 "from 1 to 64, not a string")
    r = cli("run", bad, "--json")
    assert r.rc == 2
    err = validate_output("run", r.out, r.rc)["error"]
    assert (err["kind"], err["exit_code"]) == ("job-file", 2)
    bad.write_text(f'backup_root = "{root}"\ndomains = ["vbjob-none-*"]\n[retention]\nkeep_yearly = 3\n')
    r = cli("run", bad)
    assert r.rc == 2 and f"{bad}:4: key 'retention.keep_yearly' is unknown" in one_error_line(r)
    r = cli("run", tmp_path / "missing.toml")
    assert r.rc == 2 and "cannot read job file" in one_error_line(r)
    # a glob that matches nothing: a failed run (hostile pass D14: it was a successful one), unless
    # the job says an empty selection is fine
    bad.write_text(f'backup_root = "{root}"\ndomains = ["vbjob-none-{secrets.token_hex(4)}-*"]\n')
    out = run(bad, expect_rc=1)
    assert out["domains"] == [] and list(root.iterdir()) == []
    r = cli("run", bad)
    assert r.rc == 1 and "selects no domain" in one_error_line(r)
    bad.write_text(bad.read_text() + "allow_empty = true\n")
    out = run(bad, expect_rc=0)
    assert out["domains"] == [] and list(root.iterdir()) == []


@pytest.mark.skipif(not Path("/usr/bin/systemd-analyze").exists(),
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_units_verify(tmp_path):
    """`systemd-analyze verify` loads unit files offline: it needs no systemd as PID 1."""
    import shutil

    from tests.support.helpers import ROOT
    src = ROOT / "contrib" / "systemd"
    venv_bin = Path(shutil.which("virtbackup") or (ROOT / ".venv" / "bin" / "virtbackup"))
    assert venv_bin.exists(), "virtbackup is not installed where the test can point ExecStart at"
    units = tmp_path / "units"
    units.mkdir()
    # ExecStart must name an existing executable: point it at this checkout's install
    (units / "virtbackup@.service").write_text(
        (src / "virtbackup@.service").read_text().replace("/usr/local/bin/virtbackup", str(venv_bin)))
    shutil.copy(src / "virtbackup@.timer", units)
    r = subprocess.run(["systemd-analyze", "verify", str(units / "virtbackup@nightly.service"),
                        str(units / "virtbackup@nightly.timer")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.strip() == "", r
    timer = (src / "virtbackup@.timer").read_text()
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer and "RandomizedDelaySec=" in timer
    assert "run --no-progress /etc/virtbackup/%i.toml" in (src / "virtbackup@.service").read_text()
    # the example job file is a valid job (with its root and metrics dir swapped for this test's)
    from virtbackup import jobs
    from virtbackup.store.retention import Policy
    text = (src / "nightly.toml").read_text().replace("/srv/backup", str(tmp_path)).replace(
        "/var/lib/prometheus/node-exporter", str(tmp_path))
    (tmp_path / "nightly.toml").write_text(text)
    job = jobs.load_job(tmp_path / "nightly.toml")
    assert job.parallel == 2 and job.retention == Policy(7, 14, 8, 12)


def test_transient_and_unsafely_named_domains_are_reported_not_guessed(conn, tmp_path):
    """libvirt accepts a tab in a domain name (not '/' or '..'): no directory is made up for it."""
    from tests.support import scratch
    prefix = f"vbjob-{secrets.token_hex(3)}"
    odd, transient = f"{prefix}-tab\there", f"{prefix}-transient"
    try:
        conn.defineXML(scratch.domain_xml(odd, {}))
        conn.createXML(scratch.domain_xml(transient, {}), 0)
        job = job_file(tmp_path, prefix)
        plan = by_domain(run(job, "--dry-run", expect_rc=0))
        assert plan[odd]["action"] == "skip" and "control character" in plan[odd]["error"]
        assert plan[transient]["action"] == "skip" and "transient" in plan[transient]["error"]
        res = by_domain(run(job, expect_rc=0))          # reported, nothing failed
        assert res[odd]["status"] == "skipped" and "control character" in res[odd]["error"]
        assert res[transient]["status"] == "skipped" and "is transient" in res[transient]["error"]
        assert list((tmp_path / "root").iterdir()) == []
        # named explicitly, they fail the run
        job.write_text(job.read_text().replace(f'["{prefix}-*"]', json.dumps([transient])))
        r = cli("run", job, "--json")
        assert r.rc == 1 and by_domain(validate_output("run", r.out, r.rc))[transient]["status"] == "failed"
        assert f"{transient}: domain '{transient}' is transient" in one_error_line(r)
    finally:
        scratch.remove_domain(conn, transient)
        scratch.remove_domain(conn, odd)


def test_quiesce_require_in_a_job_fails_a_domain_that_cannot_be_frozen(make_domain, tmp_path):
    """Issue 22: an old README said a job's `quiesce = "require"` was refused; it is accepted and
    means what `backup --quiesce=require` means (the docs say so now): a domain whose guest can't
    be frozen fails (nothing recorded), the others go on, the run exits 1 and its metric says 0."""
    prefix = f"vbjob-{secrets.token_hex(3)}"
    a = make_domain({"vda": 8 * MiB}, name=f"{prefix}-a")           # no guest agent channel
    off = make_domain({"vda": 8 * MiB}, name=f"{prefix}-off", start=False)   # shut off: consistent anyway
    prom = tmp_path / "m.prom"
    job = job_file(tmp_path, prefix, f'quiesce = "require"\nmetrics_file = "{prom}"\n')
    res = by_domain(run(job, expect_rc=1))
    assert res[a.name]["status"] == "failed" and "cannot quiesce" in res[a.name]["error"], res
    assert res[off.name]["status"] == "ok", res
    assert not (tmp_path / "root" / a.name / "points").exists() or \
        not list((tmp_path / "root" / a.name / "points").iterdir())
    assert metric_values(prom)[("virtbackup_job_success", (("job", "nightly"),))] == 0
