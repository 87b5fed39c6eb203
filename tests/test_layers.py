"""The package's import structure: no import cycles, no upward imports, no private names borrowed.

An AST scan of every module of sharp_cli, so function-level (lazy) imports count as much as
module-level ones: a lazy import keeps `sharp --help` fast, it does not make a cycle any less of
one. Relative imports are resolved, and `from pkg import module` counts as importing that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Top to bottom (the team's brief): a module may import from its own layer and the layers below,
# never from one above. An entry is a module or a package (everything in it), relative to
# sharp_cli. A module not listed is a leaf (errors, kv, measure, report, jsonl, seek, sampling,
# ...): anything may import it, and it imports only other leaves.
LAYERS = [
    ("__main__", "cli"),
    ("bench", "batch", "batch_together", "env_command", "evaluate", "serve"),  # the commands
    ("batch_items", "options", "peers"),  # what the commands share
    ("scheduler", "batch_decode"),  # many answers decoded together
    ("answer",),
    ("decode", "prior_pass"),
    ("engine",),
    ("loading",),
    ("model_files", "hub", "compiled", "clip_budget"),
    ("models", "prune", "video", "video_cache"),
]


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package folder `root` (a package by its
    __init__.py)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _bindings(name: str, path: Path, known: dict[str, Path]):
    """(line, module imported, local name it is bound to or None, name taken from it or None) for
    every import statement of the module, at any depth, restricted to modules in `known`."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield node.lineno, alias.name, alias.asname, None
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: from the importer's package, one level up per extra dot
                base = _package_of(name, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:  # from pkg import module
                    yield node.lineno, submodule, alias.asname or alias.name, None
                elif source in known:
                    yield node.lineno, source, None, alias.name


def import_edges(root: Path) -> dict[str, list[tuple[str, int]]]:
    """Module -> [(module it imports, line)], imports of itself left out."""
    known = modules(root)
    return {name: [(target, line) for line, target, _, _ in _bindings(name, path, known) if target != name]
            for name, path in known.items()}


def find_cycle(edges: dict[str, list[tuple[str, int]]]) -> list[tuple[str, int]] | None:
    """One import cycle as [(module, line of its import of the next one)], the last importing the
    first; None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every import below is seen
    path: list[tuple[str, int]] = []

    def visit(module: str):
        state[module] = "open"
        for target, line in sorted(edges.get(module, [])):
            path.append((module, line))
            if state.get(target) == "open":
                start = next(i for i, (m, _) in enumerate(path) if m == target)
                return path[start:]
            if target not in state and (cycle := visit(target)):
                return cycle
            path.pop()
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def layer_of(module: str, layers, top: str = "sharp_cli") -> int | None:
    for index, entries in enumerate(layers):
        for entry in entries:
            full = f"{top}.{entry}"
            if module == full or module.startswith(full + "."):
                return index
    return None


def upward_imports(root: Path, layers) -> list[str]:
    """file:line of every import of a layer above the importer's (a leaf's of any listed module)."""
    files, top = modules(root), root.name
    found = []
    for module, targets in import_edges(root).items():
        mine = layer_of(module, layers, top)
        for target, line in targets:
            theirs = layer_of(target, layers, top)
            if theirs is None or (mine is not None and theirs >= mine):
                continue
            where = f"{files[module].relative_to(root.parent)}:{line}"
            why = "a leaf (not in LAYERS) imports a layered module" if mine is None else "an upward import"
            found.append(f"{where}: {module} imports {target}: {why}")
    return found


def private_borrowings(root: Path) -> list[str]:
    """file:line of every private name (_x) one module takes from another: `from m import _x` or
    `m._x` where m is a module of the package."""
    known, found = modules(root), []
    for name, path in known.items():
        where = path.relative_to(root.parent)
        modules_bound = {}
        for line, target, bound, taken in _bindings(name, path, known):
            if taken is None:  # a module bound to a name (`import a.b` binds the top package as `a`)
                modules_bound[bound or target.split(".")[0]] = target if bound else target.split(".")[0]
            elif taken.startswith("_") and not taken.startswith("__") and target != name:
                found.append((str(where), line, f"from {target} import {taken}"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and modules_bound.get(node.value.id, name) != name):
                found.append((str(where), node.lineno, f"{modules_bound[node.value.id]}.{node.attr}"))
    return [f"{where}:{line}: {what}" for where, line, what in sorted(found)]


def _describe(cycle, files) -> str:
    return " -> ".join(f"{module} ({files[module].relative_to(REPO)}:{line})" for module, line in cycle) + \
        f" -> {cycle[0][0]}"


# -- the package -----------------------------------------------------------------------------------
def test_no_import_cycles():
    root = REPO / "sharp_cli"
    cycle = find_cycle(import_edges(root))
    assert cycle is None, "import cycle: " + _describe(cycle, modules(root))


def test_no_upward_imports():
    found = upward_imports(REPO / "sharp_cli", LAYERS)
    assert not found, "\n".join(found)


def test_every_layer_entry_is_a_module_or_package():
    names = modules(REPO / "sharp_cli")
    stale = [entry for entries in LAYERS for entry in entries
             if not any(n == f"sharp_cli.{entry}" or n.startswith(f"sharp_cli.{entry}.") for n in names)]
    assert not stale, f"LAYERS names what sharp_cli no longer has: {stale}"


def test_no_private_names_across_modules():
    found = private_borrowings(REPO / "sharp_cli")
    assert not found, "make these public where they are shared:\n" + "\n".join(found)


# -- the checks themselves, on a planted package ----------------------------------------------------
def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_lazy_relative_cycle_is_found(tmp_path):
    root = _plant(tmp_path, {"a.py": "def f():\n    from . import b\n",  # function-level, relative
                             "sub/__init__.py": "",
                             "sub/c.py": "from ..a import f\n",
                             "b.py": "import os\n\nfrom pkg.sub import c\n"})  # from package import module
    cycle = find_cycle(import_edges(root))
    assert cycle is not None and [m for m, _ in cycle] == ["pkg.a", "pkg.b", "pkg.sub.c"]
    assert [line for _, line in cycle] == [2, 3, 1]
    (root / "sub" / "c.py").write_text("import os\n")
    assert find_cycle(import_edges(root)) is None


def test_upward_and_leaf_imports_are_found(tmp_path):
    layers = [("top",), ("low",)]
    root = _plant(tmp_path, {"top.py": "from pkg import low, leaf\n",
                             "low.py": "import json\n\n\ndef g():\n    from pkg.top import x\n",
                             "leaf.py": "from pkg import low\n"})
    assert upward_imports(root, layers) == [
        "pkg/leaf.py:1: pkg.leaf imports pkg.low: a leaf (not in LAYERS) imports a layered module",
        "pkg/low.py:5: pkg.low imports pkg.top: an upward import"]


def test_private_names_taken_from_another_module_are_found(tmp_path):
    root = _plant(tmp_path, {"a.py": "def _helper():\n    pass\n\n\ndef _own():\n    _helper()\n",
                             "b.py": "from pkg.a import _helper\n",
                             "c.py": "from pkg import a\n\n\ndef f():\n    return a._helper(), a.__name__\n"})
    assert private_borrowings(root) == ["pkg/b.py:1: from pkg.a import _helper", "pkg/c.py:5: pkg.a._helper"]
