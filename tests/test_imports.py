"""The package's imports, read from the source with `ast` (every import statement, also those inside
functions): no module imports another module's private name, and the modules import each other
without a circle, but for the few listed below with their reason.

Imports under `if TYPE_CHECKING:` are left out: they never run (annotations are strings here), and
they are how a module names a type of a module that imports it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import charlm

ROOT = Path(charlm.__file__).parent

# Edges left out of the circle check, each with its reason.
ALLOWED_EDGES = {
    ("charlm", "charlm.api"): "charlm/__init__.py serves the API names lazily (PEP 562 __getattr__): charlm.api is "
    "imported when a name is first looked up on the package, after the package has loaded, "
    "so modules below it may read charlm.__version__",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import statement of a module that runs."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def edges(name: str) -> set[str]:
    """The package's modules this module imports: `from charlm import config` is an edge to charlm.config."""
    out = set()
    for module, taken, _ in imports(name):
        if taken is not None and f"{module}.{taken}" in MODULES:
            out.add(f"{module}.{taken}")
        elif module in MODULES:
            out.add(module)
    return out - {name}


def graph() -> dict[str, set[str]]:
    return {name: {t for t in edges(name) if (name, t) not in ALLOWED_EDGES} for name in MODULES}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for name in MODULES:
        for module, taken, line in imports(name):
            private = taken is not None and taken.startswith("_") and not taken.startswith("__")
            if private and module.split(".")[0] == "charlm" and module != name:
                bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line}: from {module} import {taken}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_import_circle():
    found = cycles(graph())
    assert not found, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_allowed_edges_exist():
    """An allowed edge that is gone should leave the list (and its reason with it)."""
    for source, target in ALLOWED_EDGES:
        assert target in edges(source), (source, target)


def test_the_checker_sees_circles_and_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert "charlm.config" in edges("charlm.cli.train") and "charlm.errors" in edges("charlm.config")
    assert "charlm.model" in edges("charlm.config")  # inside a function: still an edge
    assert "charlm.config" not in edges("charlm.model")  # under TYPE_CHECKING only


def test_the_cell_names_known_without_torch_are_the_registry():
    from charlm.cells import BUILTIN_CELLS, cell_names

    assert cell_names()[: len(BUILTIN_CELLS)] == BUILTIN_CELLS


# Run as the `charlm` script runs (its name is what shell completion keys on), then list what was imported.
DRIVER = """
import sys
sys.argv[0] = "charlm"
from charlm.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "yaml", "safetensors", "sentencepiece"})
print("HEAVY", ",".join(heavy), file=sys.stderr)
"""
COMPLETION = {"_CHARLM_COMPLETE": "complete_bash", "COMP_WORDS": "charlm sa", "COMP_CWORD": "1"}


@pytest.mark.parametrize(
    "args, env",
    [
        (["--help"], {}),
        (["--version"], {}),
        (["train", "--help"], {}),
        (["prepare", "--help"], {}),
        (["sample", "--help"], {}),
        (["corpus", "--help"], {}),
        ([], COMPLETION),
    ],
)
def test_help_version_and_completion_load_nothing_heavy(args, env):
    """The shell runs the program on every Tab press: it must answer without torch (1.5 s) or numpy."""
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )
    heavy = [line for line in done.stderr.splitlines() if line.startswith("HEAVY")]
    assert heavy == ["HEAVY "], done.stderr
    if env:
        assert done.stdout.split() == ["sample"], done.stdout
    if args == ["--version"]:
        from importlib import metadata

        assert done.stdout.strip() == f"charlm {charlm.__version__} (torch {metadata.version('torch')})"
