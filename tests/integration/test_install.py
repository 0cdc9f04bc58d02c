"""The package as users get it: `python -m build` (sdist, then the wheel from the sdist), a fresh
virtualenv (Debian's python3 with system site packages, as setup-host makes it), `pip install` of
the wheel (not editable), then backup, list, restore and verify run from `/`, outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

from tests.support.helpers import ROOT
from tests.support.scratch import first_difference, read_raw

MiB = 1 << 20


def run(*args: object, cwd: Path = Path("/"), timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_built_wheel_installed_in_a_fresh_venv_backs_up_and_restores_from_root(make_domain, tmp_path):
    # built from a copy: the build must not leave build/ or egg-info files in the repository
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                               "__pycache__", ".*_cache"))
    dist = tmp_path / "dist"
    b = run(ROOT / ".venv/bin/python", "-m", "build", "--outdir", dist, src, cwd=src)
    assert b.returncode == 0, b.stderr[-3000:]
    (wheel,) = dist.glob("virtbackup-*.whl")
    (sdist,) = dist.glob("virtbackup-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    for t in ("domainbackup.xml", "domainbackup-disk.xml", "domaincheckpoint.xml"):
        assert f"virtbackup/_templates/{t}" in names, names
    for sub in ("cli/__init__.py", "cli/_common.py", "store/chain.py", "qemu/qemu_img.py", "virt/domxml.py",
                "runners/base.py"):
        assert f"virtbackup/{sub}" in names, names           # every sub-package ships
    assert not [n for n in names if n.startswith("tests/") or n.endswith(("scratch.py", "demo.py"))], names
    members = tarfile.open(sdist).getnames()
    assert any(m.endswith("/xml-templates/domainbackup.xml") for m in members), members
    assert any(m.endswith("/docs/virtbackup.1") for m in members), members

    venv = tmp_path / "venv"
    assert run("/usr/bin/python3", "-m", "venv", "--system-site-packages", venv).returncode == 0
    pip = run(venv / "bin/pip", "install", "-q", wheel)
    assert pip.returncode == 0, pip.stderr[-3000:]
    vb = venv / "bin/virtbackup"
    where = run(venv / "bin/python", "-c", "import virtbackup; print(virtbackup.__file__)")
    assert where.stdout.startswith(str(venv)), where          # the installed copy, not the repo's
    from virtbackup import __version__
    ver = run(vb, "--version")
    assert (ver.returncode, ver.stdout) == (0, f"virtbackup {__version__}\n"), ver

    d = make_domain({"vda": 16 * MiB})
    bdir = tmp_path / "bk"
    d.write("vda", 0x11, 0, 1 * MiB)
    for level in ("full", "inc"):
        r = run(vb, "backup", d.name, bdir, "--level", level)
        assert r.returncode == 0, r
        expected = d.expected()["vda"]
        d.write("vda", 0x22, 4 * MiB, 1 * MiB)
    listed = run(vb, "list", bdir, "--json")
    assert listed.returncode == 0 and '"level": "inc"' in listed.stdout, listed
    r = run(vb, "restore", bdir, tmp_path / "out")
    assert r.returncode == 0, r
    assert first_difference(read_raw(tmp_path / "out/vda.qcow2"), expected) is None
    v = run(vb, "verify", bdir)
    assert v.returncode == 0 and v.stdout.startswith("ok: 2 point(s)"), v
