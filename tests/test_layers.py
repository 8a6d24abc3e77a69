"""The layers contract: lower layers never import higher ones, and modules import each other without cycles.

Every ``import`` in ``src/histosynth`` counts, also those inside functions
(a lazy import is still a dependency). The layers, lowest first:

- core: ``histosynth`` (the package root), ``errors``, ``config``, ``device``, ``figures``
- ``io`` (slides, patch sets, labels, annotations, atomic files): core only
- ``models`` (networks + checkpoint files): core and io
- ``training`` (the one step loop): core, io and models
- the stage families in the order of the DAG: ``slides`` < ``patches`` < ``masks`` < ``gan`` <
  ``segmentation`` < ``multifocus`` < ``serve`` (the page); each imports the core layers and the families before it
- ``cli``: anything (argument parsing; it imports stages lazily)

Beyond the order: no module imports a private (``_name``) from a module of another
package, and the import graph of the modules has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "histosynth"

CORE = ("histosynth", "histosynth.errors", "histosynth.config", "histosynth.device", "histosynth.figures")
FAMILIES = ("slides", "patches", "masks", "gan", "segmentation", "multifocus", "serve")
#: the rank of each layer: a module may import modules of the same or a lower rank, with the exceptions below
RANKS = {"core": 0, "io": 1, "models": 2, "training": 3, **{f: 4 + i for i, f in enumerate(FAMILIES)},
         "cli": 4 + len(FAMILIES)}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside histosynth."""
    if module in CORE:
        return "core"
    if module == "histosynth.__main__":
        return "cli"
    part = module.split(".")[1]
    if part in ("io", "models", "training", "cli", *FAMILIES):
        return part
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, src: Path = SRC) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every histosynth import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, src)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "histosynth"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".") if is_package else here.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "histosynth":
                continue
            names = [a.name for a in node.names]
            # "from histosynth.models import hovernet": the submodule is the dependency
            subs = [f"{target}.{n}" for n in names if (src / f"{target}.{n}".replace(".", "/")).exists()
                    or (src / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
            found += [(s, [], node.lineno) for s in subs] or [(target, names, node.lineno)]
    return found


def _resolve(module: str, known: set[str]) -> str:
    """The longest known module that ``module`` names (a package attribute import names its package)."""
    while module not in known and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no sources under {PACKAGE}"
    known = {module_name(f) for f in files}
    return {module_name(f): [(_resolve(m, known), names, line) for m, names, line in imports_of(f)] for f in files}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_lower_layers_never_import_higher_ones(graph):
    bad = []
    for module, deps in graph.items():
        mine = layer_of(module)
        for dep, _, line in deps:
            theirs = layer_of(dep)
            if RANKS[theirs] > RANKS[mine]:
                bad.append(f"{module}:{line} ({mine}) imports {dep} ({theirs})")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_no_private_names_across_packages(graph):
    bad = []
    for module, deps in graph.items():
        for dep, names, line in deps:
            if dep.rsplit(".", 1)[0] in (module.rsplit(".", 1)[0], module):
                continue  # inside one package (siblings, or a package and its own modules) private helpers are shared
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{module}:{line} imports private {private} from {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    # a package's __init__ re-exporting its submodules is not a cycle of logic
    edges = {m: {d for d, _, _ in deps if d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_contract_sees_a_violation(tmp_path):
    """The checker itself: a module of io importing a stage is caught, also inside a function and relatively."""
    pkg = tmp_path / "histosynth"
    (pkg / "io").mkdir(parents=True)
    (pkg / "masks").mkdir()
    for f in ("__init__.py", "io/__init__.py", "masks/__init__.py", "masks/stats.py"):
        (pkg / f).write_text("")
    (pkg / "io" / "bad.py").write_text("def f():\n    from histosynth.masks.stats import x\n\n\nfrom ..masks import stats\n")
    deps = imports_of(pkg / "io" / "bad.py", src=tmp_path)
    assert sorted((d, line) for d, _, line in deps) == [("histosynth.masks.stats", 2), ("histosynth.masks.stats", 5)]
    assert RANKS[layer_of("histosynth.masks.stats")] > RANKS[layer_of("histosynth.io.bad")]
