"""The transport in job files (issue 23): a job chooses it with `mode` (auto, the default, pulls;
push; pull) and `scratch_dir`, per job and per `[domain."NAME"]`. On the real libvirtd: a job
pulls for one domain, pushes for the one whose table says so, and backs up a shut-off one with
the private QEMU whatever the mode; each point records its transport, restores bit-exact, and no
scratch file is left; the dry run says which.
"""

from __future__ import annotations

import json
import secrets

from tests.integration.test_jobs import by_domain, job_file, run
from tests.support.helpers import assert_point_restores, cli

MiB = 1 << 20


def test_job_file_mode_and_scratch_dir_per_job_and_per_domain(make_domain, tmp_path):
    prefix = f"vbjm-{secrets.token_hex(3)}"
    a = make_domain({"vda": 16 * MiB}, name=f"{prefix}-a")        # pull (the job), its own scratch_dir
    b = make_domain({"vda": 16 * MiB}, name=f"{prefix}-b")        # push (its table)
    c = make_domain({"vda": 16 * MiB}, name=f"{prefix}-c")        # pull (the job), scratch beside its disk
    off = make_domain({"vda": 8 * MiB}, name=f"{prefix}-off", start=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tables = f'[domain."{b.name}"]\nmode = "push"\n'
    job = job_file(tmp_path, prefix, f'mode = "pull"\n{tables}[domain."{a.name}"]\nscratch_dir = "{scratch}"\n')
    root = tmp_path / "root"

    plan = by_domain(json.loads(cli("run", job, "--dry-run", "--json").out))
    assert f"mode pull, scratch files in '{scratch}'" in plan[a.name]["why"], plan[a.name]
    assert "mode push" in plan[b.name]["why"] and "scratch" not in plan[b.name]["why"], plan[b.name]
    assert "mode pull" in plan[c.name]["why"] and "scratch" not in plan[c.name]["why"], plan[c.name]
    assert "private QEMU" in plan[off.name]["why"] and "mode" not in plan[off.name]["why"], plan[off.name]

    want = {}
    for level, pattern in (("full", 0x21), ("inc", 0x22)):
        for d in (a, b, c):
            d.write("vda", pattern, (pattern - 0x21) * MiB, 2 * MiB)
            want[(d.name, level)] = d.expected()
        res = by_domain(run(job, expect_rc=0))
        for d in (a, b, c, off):
            assert res[d.name]["status"] == "ok" and res[d.name]["level"] == level, res[d.name]
        assert list(scratch.iterdir()) == [], "a scratch file outlived its job"

    transports = {d.name: [p["transport"] for p in json.loads(cli("list", root / d.name, "--json").out)["points"]]
                  for d in (a, b, c, off)}
    assert transports == {a.name: ["pull", "pull"], b.name: ["push", "push"], c.name: ["pull", "pull"],
                          off.name: ["offline", "offline"]}
    for d in (a, b, c):
        for pid, level in (("0001", "full"), ("0002", "inc")):
            assert_point_restores(root / d.name, pid, want[(d.name, level)], tmp_path / f"r-{d.name}-{pid}")

    # the scratch_dir reaches a's backup: one that is not there fails that domain alone, said
    missing = tmp_path / "no-such-dir"
    job.write_text(job.read_text().replace(str(scratch), str(missing)))
    res = by_domain(run(job, expect_rc=1))
    assert res[a.name]["status"] == "failed" and f"scratch directory {missing}" in res[a.name]["error"], res[a.name]
    assert all(res[d.name]["status"] == "ok" for d in (b, c, off)), res
