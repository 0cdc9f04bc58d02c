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

# Lowest first. A module may import modules of earlier layers only (never its own layer). Module
# names are dotted below the package ("store.chain"; a package's own __init__ is "store").
LAYERS: List[List[str]] = [
    ["errors", "observe", "options", "env"],   # progress events, cancellation; the user's choices; the environment
    ["qemu", "qemu.keys"],                              # the key for QEMU programs (pipe, file, LUKS options)
    ["qemu.qemu_img", "qemu.qmp"],                      # one module per QEMU program
    ["qemu.nbdcopy"],                                   # qemu-nbd (asks qemu-img which layers are encrypted)
    ["store", "store.crypto", "store.digest", "store.runlog"],   # no libvirt below virt/
    ["store.chain"],                                    # the model and its metadata file
    ["store.metrics"],                                  # a run's metrics (written like the metadata)
    ["store.integrity"],                                # images checked against the record
    ["store.retention", "store.verify"],                # retention; verify a whole dir
    ["virt", "virt.domxml", "virt.xmlbuild"],          # domain XML as one typed object; the XML libvirt is given
    ["virt.host", "virt.restoredom"],                  # libvirt connection; the restored domain's XML
    ["virt.monitor", "virt.keysecret"],                 # QMP passthrough; the key as a libvirt secret
    ["virt.bitmaps", "virt.quiesce"],                   # which bitmaps, can one serve; the guest agent
    ["virt.checkpoints"],
    ["virt.domain"],                                    # the libvirt DomainView
    ["runners", "runners.plan"],                        # the typed plan
    ["runners.base"],                                   # the runner protocol and the libvirt job helpers
    ["runners.push", "runners.offline", "runners.pull"],   # the runners
    ["health"],                                         # status, repair planning
    ["backup", "restore", "files", "offsite"],          # the engine; restore; single files; off-site copies (S3)
    ["jobs", "drill", "liverestore"],                   # whole-host runs; restore drills; restore --live
    ["__init__", "api"],
    ["cli.progress", "cli._common"],                    # the CLI's bars; its error boundary and options
    ["cli.backup", "cli.restore", "cli.verify", "cli.chain", "cli.run", "cli.files", "cli.host",
     "cli.offsite"],
    ["cli"],                                            # the app: every command module registered
    ["cli.__main__"],                                   # python -m virtbackup.cli
]
# Sub-packages, lowest first: a module may import only from its own package or lower ones.
PACKAGES = ["base", "qemu", "store", "virt", "runners", "", "cli"]   # base: errors, observe; "": operations, api
# Modules that must work without libvirt (a backup dir is restorable with qemu-img alone).
NO_LIBVIRT = {"errors", "observe", "options", "env", "__init__", "files", "offsite", "virt.domxml", "virt.xmlbuild",
              "virt.restoredom"} | {m for layer in LAYERS for m in layer if m.split(".")[0] in ("qemu", "store", "cli")}


def module_name(path: Path, pkg_dir: Path) -> str:
    rel = path.relative_to(pkg_dir).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, pkg_dir: Path) -> Set[str]:
    """Every module name `path` imports anywhere, absolute (relative imports resolved)."""
    package = pkg_dir.name
    here = [package] + list(path.relative_to(pkg_dir).parent.parts)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # from . import x / from .x import y / from ..x import y
                base = here[:len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            if mod == package or mod.startswith(package + "."):
                # `from virtbackup.store import chain`: chain is a module when a file says so
                found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def _resolve(name: str, package: str, known: Set[str]) -> str:
    """virtbackup.store.chain.Point -> store.chain (the longest known module prefix)."""
    parts = name.split(".")[1:]
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in known:
            return cand
    return "__init__"       # a name of the package itself (`from virtbackup import __version__`)


def _pkg_of(mod: str, packages: Sequence[str] = PACKAGES) -> str:
    if mod in ("errors", "observe", "options", "env"):
        return "base"
    top = mod.split(".")[0]
    return top if top in packages else ""


def check_layers(pkg_dir: Path, layers: Sequence[Sequence[str]], no_libvirt: Set[str] = frozenset(),
                 packages: Sequence[str] = ()) -> List[str]:
    """Problems found: undeclared modules, imports of same or higher layers or packages, cycles, libvirt."""
    package = pkg_dir.name
    rank: Dict[str, int] = {m: i for i, layer in enumerate(layers) for m in layer}
    files = {module_name(p, pkg_dir) or "__init__": p for p in sorted(pkg_dir.rglob("*.py"))}
    known = set(files)
    problems: List[str] = []
    graph: Dict[str, Set[str]] = {}
    prank = {p: i for i, p in enumerate(packages)}
    for mod, path in files.items():
        found = len(problems)
        if mod not in rank:
            problems.append(f"{mod}: not placed in a layer")
            continue
        deps = set()
        for name in imports_of(path, pkg_dir):
            top = name.split(".")[0]
            if mod in no_libvirt and top in ("libvirt", "libvirt_qemu"):
                problems.append(f"{mod} imports {name} (it must work without libvirt)")
            if top != package or name == package:
                continue
            dep = _resolve(name, package, known)
            if dep == mod or (mod.startswith(dep + ".") and dep in packages):
                continue        # a module's own package __init__ is loaded with it
            deps.add(dep)
            if dep not in rank:
                problems.append(f"{mod} imports undeclared module {dep}")
            elif rank[dep] >= rank[mod]:
                problems.append(f"{mod} (layer {rank[mod]}) imports {dep} (layer {rank[dep]})")
            low, high = _pkg_of(mod, packages), _pkg_of(dep, packages)
            if prank and prank.get(high, -1) > prank.get(low, -1):
                problems.append(f"{mod} (package {low or 'top'}) imports {dep} from a higher package")
        problems[found:] = list(dict.fromkeys(problems[found:]))     # one line per problem
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
    assert check_layers(PACKAGE, LAYERS, NO_LIBVIRT, PACKAGES) == []


def test_every_module_is_placed():
    placed = {m for layer in LAYERS for m in layer}
    assert {module_name(p, PACKAGE) or "__init__" for p in PACKAGE.rglob("*.py")} == placed


def test_packages_are_ordered_like_their_layers():
    """Every module of a lower package sits in a lower layer than every module of a higher one."""
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    order = {p: i for i, p in enumerate(PACKAGES)}
    for a in rank:
        for b in rank:
            if order[_pkg_of(a)] < order[_pkg_of(b)]:
                assert rank[a] < rank[b], (a, b)


def test_checker_understands_packages(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from pkg.high.b import thing\n")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "high" / "b.py").write_text("from ..low import a\nfrom . import c\n")
    (pkg / "high" / "c.py").write_text("")
    problems = check_layers(pkg, [["low", "low.a"], ["high", "high.c"], ["high.b"]], packages=["low", "high"])
    assert "low.a (layer 0) imports high.b (layer 2)" in problems
    assert "low.a (package low) imports high.b from a higher package" in problems
    assert not [p for p in problems if p.startswith("high.b")], problems


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
