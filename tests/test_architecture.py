"""The layering of ``lorafid/`` as ``docs/ARCHITECTURE.md`` states it, read from the imports.

Each package may import only packages of a lower layer (or its own); nothing imports
another module's private names; there are no import cycles between modules; every
package says in its docstring what job lives there. Imports are read with ``ast``, so a
late import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lorafid"

LAYERS: dict[str, int] = {
    # 0: the errors every layer raises, and the version
    "errors": 0,
    "__init__": 0,
    # 1: small shared mechanisms: the compute seam, the retry loop, the rules for names
    "compute": 1,
    "retry": 1,
    "names": 1,
    "progress": 1,
    "documents": 1,
    # 2: bytes of weights
    "weights": 2,
    # 3: what the audit computes from them
    "audit": 3,
    # 4: built on the audit
    "adapters": 4,
    "behaviour": 4,
    # 5: talking to providers, clusters and the Hub registry
    "providers": 5,
    "batch": 5,
    "sharing": 5,
    # 6: the two faces; nothing imports them
    "cli": 6,
    "web": 6,
    "__main__": 7,  # `python -m lorafid`: runs the CLI
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out["lorafid." + ".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported lorafid module, names taken from it) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("lorafid")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lorafid"):
                continue
            names = [a.name for a in node.names]
            # "from lorafid.audit import spectrum" imports a module, not a name
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            found += [(f"{target}.{n}", []) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((target, rest))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    assert top in LAYERS, f"{module}: add its package to LAYERS and to docs/ARCHITECTURE.md"
    return LAYERS[top]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_lower_layers_or_its_own_package(module: str) -> None:
    own = module.split(".")[1] if "." in module else ""
    for target, _ in GRAPH[module]:
        if target == "lorafid" or target.split(".")[1] == own:
            continue
        assert _layer(target) < _layer(module), (
            f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}): "
            "see docs/ARCHITECTURE.md for which package may import which"
        )


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{module} imports {name} from {target}"
        for module, imports in GRAPH.items()
        for target, names in imports
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private


def test_there_are_no_import_cycles() -> None:
    edges = {m: {t for t, _ in imports if t in MODULES and t != m} for m, imports in GRAPH.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for m in edges:
        edges[m] = {t for t in edges[m] if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", sorted(p.parent.name for p in ROOT.glob("*/__init__.py")))
def test_every_package_says_what_job_lives_there(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"lorafid/{package}/__init__.py needs a docstring naming its job"


def test_the_layer_rule_catches_an_upward_import() -> None:
    """The checker itself: an audit module importing the web layer is refused."""
    GRAPH["lorafid.audit.engine"].append(("lorafid.web.plots", []))
    try:
        with pytest.raises(AssertionError, match=r"imports lorafid\.web\.plots"):
            test_a_module_imports_only_lower_layers_or_its_own_package("lorafid.audit.engine")
    finally:
        GRAPH["lorafid.audit.engine"].pop()
