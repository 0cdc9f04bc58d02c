"""The API's promises: only VirtBackupError escapes (cause kept), __all__ complete, results to_json."""

from __future__ import annotations

import inspect
import json

import libvirt
import pytest

from virtbackup import api
from virtbackup.errors import BackupDirError, HostError, OperationFailed, VirtBackupError


def public_functions():
    return [n for n, f in vars(api).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == api.__name__]


def test_all_lists_every_public_function():
    assert set(public_functions()) <= set(api.__all__)
    for name in api.__all__:
        assert hasattr(api, name), name


def test_every_public_operation_is_wrapped_at_the_boundary():
    for name in public_functions():
        if name not in ("chain_json",):
            assert hasattr(getattr(api, name), "__wrapped__"), f"api.{name} is not behind _boundary"


def test_libvirt_and_os_errors_become_virtbackup_errors_with_the_cause_kept(monkeypatch):
    err = libvirt.libvirtError("boom")
    from virtbackup import health, restore
    from virtbackup.virt import host
    monkeypatch.setattr(health, "status", lambda dom: (_ for _ in ()).throw(err))
    monkeypatch.setattr(host, "connection", lambda uri: _Conn())
    monkeypatch.setattr(host, "lookup_domain", lambda conn, name: object())
    with pytest.raises(HostError) as ei:
        api.status("dom")
    assert ei.value.__cause__ is err and ei.value.exit_code == 1

    def oserror(*_a, **_k):
        raise PermissionError(13, "Permission denied", "/b/points")
    monkeypatch.setattr(restore, "flatten", oserror)
    with pytest.raises(OperationFailed) as oe:
        api.flatten("/x.qcow2")
    assert isinstance(oe.value.__cause__, PermissionError)
    assert str(oe.value) == "Permission denied: /b/points"


def test_usage_errors_pass_unchanged(tmp_path):
    with pytest.raises(BackupDirError) as ei:
        api.list_points(tmp_path / "missing")
    assert isinstance(ei.value, VirtBackupError) and ei.value.exit_code == 2


def test_results_render_to_json(tmp_path):
    from virtbackup.restore import FlattenResult
    from virtbackup.store.chain import Chain, DiskImage, Point
    from virtbackup.store.verify import Damage, VerifyResult
    p = Point("0001", "full", "2026-11-30T00:00:00+00:00", "cp", None, None, "0001",
              {"vda": DiskImage("points/0001/vda.qcow2", None, 1, 7, "x")}, "d.xml", "c.xml")
    c = Chain("dom", "uuid", points=[p])
    listed = api.chain_json(c)
    assert listed["points"][0]["size"] == 7 and listed["domain"] == "dom"
    v = VerifyResult(["0001"], 1, [Damage("0001", "vda", "points/0001/vda.qcow2", "bad")], ["0001"])
    assert v.to_json()["ok"] is False and "affected points: 0001" in (v.failure or "")
    assert FlattenResult(tmp_path).to_json() == {"image": str(tmp_path), "standalone": True}
    for obj in (v, FlattenResult(tmp_path)):
        json.dumps(obj.to_json())


class _Conn:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_list_needs_neither_libvirt_nor_lxml_and_result_types_still_import(tmp_path):
    """`list` (monitoring runs it often) loads only the chain module: the operations import
    their modules when called. The result types are still importable from virtbackup.api."""
    import subprocess
    import sys
    code = ("import sys, virtbackup.api as a\n"
            "heavy = [m for m in ('libvirt', 'lxml', 'tenacity', 'guestfs', 'virtbackup.backup') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "from virtbackup.api import BackupResult, RestoreResult, PointFiles, Notify\n"
            "assert BackupResult.__module__ == 'virtbackup.backup'\n"
            "try:\n    a.NoSuchThing\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in api.__all__:
        assert getattr(api, name) is not None, name


def test_api_functions_import_at_run_time_what_they_use():
    """Names api.py imports only for the type checker (TYPE_CHECKING) must be imported in the
    function body that uses them outside an annotation (a NameError otherwise, which mypy and
    ruff don't see: it once hit `repair`)."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(api))
    typing_only = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in ast.walk(node):
                if isinstance(imp, (ast.Import, ast.ImportFrom)):
                    typing_only |= {a.asname or a.name.split(".")[0] for a in imp.names}
    assert "RepairReport" in typing_only
    problems = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        imported = {a.asname or a.name.split(".")[0] for imp in ast.walk(fn)
                    if isinstance(imp, (ast.Import, ast.ImportFrom)) for a in imp.names}
        annotations = {id(a) for n in ast.walk(fn) if isinstance(n, ast.AnnAssign) for a in ast.walk(n.annotation)}
        for stmt in fn.body:
            for n in ast.walk(stmt):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in annotations \
                        and n.id in typing_only and n.id not in imported:
                    problems.append(f"{fn.name}: {n.id} (line {n.lineno})")
    assert not problems, problems
