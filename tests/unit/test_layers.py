"""The package's import layers: no cycles, no upward imports, no libvirt where it has no place.

Every import statement of every module counts, also those inside functions (they are how cycles
used to hide: `backup` and `offline` imported each other that way). A module may import only
modules of lower layers; a new module has to be placed in LAYERS.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Sequence, Set

PACKAGE = Path(__file__).resolve().parent.parent.parent / "virtbackup"

# Lowest first. A module may import modules of earlier layers only (never its own layer).
LAYERS: List[List[str]] = [
    ["errors", "observe"],                              # observe: progress reports, no imports
    ["crypto"],                                         # key files, key check, the key for qemu-img
    ["__init__", "runlog", "xmlbuild", "qemuimg", "metrics", "nbdcopy", "digest"],   # no libvirt: logs, XML,
                                                                            # qemu-img, metrics, the NBD copy, hashes
    ["chain"],                                          # the model and its metadata file
    ["integrity"],                                      # images checked against the record
    ["restoredom", "retention", "verify"],              # pure XML / image work on a backup dir
    ["host", "qmp"],                                    # libvirt connection; a private QEMU
    ["monitor", "keysecret"],                           # QMP passthrough; the key as a libvirt secret
    ["bitmaps"],                                        # which bitmaps, can one serve
    ["checkpoints"],
    ["plan", "domain"],                                 # the typed plan; the libvirt DomainView
    ["health", "quiesce"],                              # status, repair planning; guest freeze/thaw
    ["runner"],                                         # the runner protocol
    ["pushjob", "offline"],                             # the runners
    ["pull"],                                           # the pull runner (shares pushjob's job helpers)
    ["backup", "restore", "files"],                     # the engine; restore; single files (libguestfs)
    ["jobs", "drill", "liverestore"],                   # whole-host runs; restore drills; restore --live
    ["api", "progress"],                                # progress: the CLI's bars
    ["cli"],
]
# Modules that must work without libvirt (a backup dir is restorable with qemu-img alone).
NO_LIBVIRT = {"errors", "crypto", "runlog", "xmlbuild", "qemuimg", "chain", "integrity", "restoredom", "retention",
              "verify", "qmp", "cli", "__init__", "observe", "metrics", "files", "nbdcopy", "digest"}


def imports_of(path: Path, package: str) -> Set[str]:
    """Every module name `path` imports anywhere (relative imports resolved inside `package`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # from . import x / from .x import y
                if node.module:
                    found.add(f"{package}.{node.module}")
                else:
                    found.update(f"{package}.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
                if node.module == package:
                    found.update(f"{package}.{alias.name}" for alias in node.names)
    return found


def check_layers(pkg_dir: Path, layers: Sequence[Sequence[str]], no_libvirt: Set[str] = frozenset()) -> List[str]:
    """Problems found: undeclared modules, imports of same or higher layers, cycles, libvirt."""
    package = pkg_dir.name
    rank: Dict[str, int] = {m: i for i, layer in enumerate(layers) for m in layer}
    problems: List[str] = []
    graph: Dict[str, Set[str]] = {}
    for path in sorted(pkg_dir.glob("*.py")):
        mod = path.stem
        if mod not in rank:
            problems.append(f"{mod}: not placed in a layer")
            continue
        deps = set()
        for name in imports_of(path, package):
            top = name.split(".")[0]
            if mod in no_libvirt and top in ("libvirt", "libvirt_qemu"):
                problems.append(f"{mod} imports {name} (it must work without libvirt)")
            if top != package or name == package:
                continue
            dep = name.split(".")[1]
            deps.add(dep)
            if dep not in rank:
                problems.append(f"{mod} imports undeclared module {dep}")
            elif rank[dep] >= rank[mod]:
                problems.append(f"{mod} (layer {rank[mod]}) imports {dep} (layer {rank[dep]})")
        graph[mod] = deps
    # cycles, named (the rank rule excludes them; this makes the message say which)
    state: Dict[str, int] = {}

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            elif d in graph and not state.get(d):
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    return problems


def test_package_layers_hold():
    assert check_layers(PACKAGE, LAYERS, NO_LIBVIRT) == []


def test_every_module_is_placed():
    placed = {m for layer in LAYERS for m in layer}
    assert {p.stem for p in PACKAGE.glob("*.py")} == placed


def _pkg(tmp_path: Path, files: Dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / f"{name}.py").write_text(text)
    return pkg


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = _pkg(tmp_path, {"a": "from . import b\n",
                          "b": "def f():\n    from .a import thing\n    return thing\n"})
    problems = check_layers(pkg, [["a"], ["b"]])
    assert "a (layer 0) imports b (layer 1)" in problems
    assert any(p.startswith("import cycle: a -> b -> a") for p in problems), problems


def test_checker_finds_upward_and_same_layer_imports_and_libvirt(tmp_path):
    pkg = _pkg(tmp_path, {"low": "import pkg.high\n", "high": "from pkg import peer\n",
                          "peer": "import libvirt\n", "new": ""})
    problems = check_layers(pkg, [["low"], ["high", "peer"]], {"peer"})
    assert "low (layer 0) imports high (layer 1)" in problems
    assert "high (layer 1) imports peer (layer 1)" in problems
    assert "peer imports libvirt (it must work without libvirt)" in problems
    assert "new: not placed in a layer" in problems


def test_checker_accepts_a_clean_package(tmp_path):
    pkg = _pkg(tmp_path, {"low": "import os\n", "high": "from . import low\ndef f():\n    from .low import x\n"})
    assert check_layers(pkg, [["low"], ["high"]]) == []
