"""The package's shape, checked from its source: no import cycles, no reaching into another module's privates.

Sibling modules are imported at the top of a module, so the graph below is the real one; only the heavy
edges (vLLM and torch through ``engine/vllm_api.py``, httpx, ipywidgets, huggingface_hub, IPython) and
modules that pull one in at import are imported inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "vllm_notebook"
LAZY_OK = {"vllm_notebook.engine.vllm_api", "vllm_notebook.ui.panel", "vllm_notebook.magics"}
LAYERS = {  # a folder may import from the folders listed for it (and from the leaves), never upwards
    "engine": set(), "models": {"engine"}, "cluster": set(),
    "server": {"engine", "cluster", "models"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(target module, imported name, at module level?) for every import of a package module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top, typing_only = set(), set()

    def executed_at_import(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only.update(id(n) for n in ast.walk(node))  # annotations only
                continue
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            top.add(id(node))
            for field in ("body", "orelse", "finalbody", "handlers"):
                executed_at_import(getattr(node, field, []) or [])

    executed_at_import(tree.body)
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vllm_notebook"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full, None, id(node) in top) if full in MODULES else (target, alias.name, id(node) in top)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vllm_notebook"):
                    yield alias.name, None, id(node) in top


def test_no_module_imports_another_modules_private_names():
    bad = [f"{name} imports {target}.{what}" for name, path in MODULES.items()
           for target, what, _ in _imports(name, path)
           if what and what.startswith("_") and not what.startswith("__") and target != name]
    assert not bad, "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    graph = {name: {t for t, _, at_top in _imports(name, path) if at_top and t in MODULES and t != name}
             for name, path in MODULES.items()}
    graph = {k: {t for t in v if not (k.startswith(t + ".") or t == "vllm_notebook")} for k, v in graph.items()}
    done, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_siblings_are_imported_at_the_top():
    """Function-local imports of package modules only where the module is a heavy edge."""
    late = sorted({f"{name}: {target}" for name, path in MODULES.items()
                   for target, _, at_top in _imports(name, path)
                   if not at_top and target in MODULES and target not in LAZY_OK and name != "vllm_notebook"})
    assert not late, "\n".join(late)


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_lower_layers_never_import_upwards(folder):
    allowed = LAYERS[folder] | {folder}
    upper = {"loader", "magics", "cli", "doctor", "ui.panel", "ui.status", "ui.cluster_view"}
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(f"vllm_notebook.{folder}"):
            continue
        for target, _, _ in _imports(name, path):
            rel = target.removeprefix("vllm_notebook.")
            head = rel.split(".")[0]
            if head in LAYERS and head not in allowed or rel in upper:
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_ipython_below_the_magics_and_ui():
    bad = []
    for name, path in MODULES.items():
        if name.split(".")[1:2] and name.split(".")[1] in ("engine", "server", "cluster", "models"):
            text = path.read_text()
            if "import IPython" in text or "from IPython" in text:
                bad.append(name)
    assert not bad, bad
