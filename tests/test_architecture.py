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
    "backends": {"engine", "server", "cluster", "models"},
    "ui": {"engine"},  # display: it shows what the engine layer returns, which never imports it
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


# ---------------------------------------------------------------- one Engine over back-ends of one contract
def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text())


def _classes() -> dict[str, tuple[str, list[str]]]:
    """Every class of the package: name -> (module, base names)."""
    out = {}
    for name in MODULES:
        for node in ast.walk(_tree(name)):
            if isinstance(node, ast.ClassDef):
                out[node.name] = (name, [ast.unparse(b).split(".")[-1] for b in node.bases])
    return out


def test_every_back_end_implements_the_one_contract_and_nothing_subclasses_engine():
    """``backends/base.py``'s ``Backend`` is the contract; each back-end implements it directly (the Slurm one
    wraps a server back-end, it does not subclass it), and ``Engine`` is one concrete class."""
    import inspect

    from vllm_notebook.backends.base import Backend
    from vllm_notebook.backends.local import LocalBackend
    from vllm_notebook.backends.replicas import ReplicasBackend
    from vllm_notebook.backends.server import ServerBackend
    from vllm_notebook.backends.slurm import SlurmBackend
    from vllm_notebook.engine.core import Engine

    classes = _classes()
    backends = {k: v for k, v in classes.items() if k.endswith("Backend") and k != "Backend"}
    assert set(backends) == {"LocalBackend", "ServerBackend", "SlurmBackend", "ReplicasBackend"}, backends
    assert all(bases == ["Backend"] and mod.startswith("vllm_notebook.backends.") for mod, bases in backends.values()), \
        backends
    for cls in (LocalBackend, ServerBackend, SlurmBackend, ReplicasBackend):
        assert not inspect.isabstract(cls), (cls, cls.__abstractmethods__)
        assert cls.kind and cls.kind in Engine.kind.__doc__
    assert not [k for k, (_, bases) in classes.items() if "Engine" in bases], "Engine is one concrete class"
    assert not inspect.isabstract(Engine) and Backend.__abstractmethods__


def test_nothing_outside_the_back_ends_tells_them_apart():
    """No ``isinstance``/``issubclass`` on a back-end's class, no ``hasattr``/``getattr`` of a field only one
    back-end has, no test of ``kind`` or of a class's name: what differs is asked of the contract
    (``holds_devices_here``, ``outlives_kernel``, ``same_as``, ``uses_server``, ``origin``)."""
    one_backend_only = {"record", "job", "prepared", "ray_cluster", "url", "server", "args", "_llm", "progress"}
    bad = []
    for name, path in MODULES.items():
        if name.startswith("vllm_notebook.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in ("isinstance", "issubclass") and ("Backend" in text or "Engine" in text):
                    bad.append(f"{name}: {text}")
                if node.func.id in ("hasattr", "getattr") and len(node.args) > 1 and \
                        isinstance(node.args[1], ast.Constant) and node.args[1].value in one_backend_only:
                    bad.append(f"{name}: {text}")
            elif isinstance(node, ast.Compare) and (".kind" in ast.unparse(node.left) or (
                    "__name__" in text and ("Engine" in text or "Backend" in text))):
                bad.append(f"{name}: {text}")
    assert not bad, "\n".join(bad)


def test_the_engine_layer_knows_no_back_end():
    """``engine/`` names the contract for type hints only; the back-ends import the engine, never the reverse."""
    bad = [f"{name} imports {target}" for name, path in MODULES.items() if name.startswith("vllm_notebook.engine")
           for target, _, _ in _imports(name, path) if target.startswith("vllm_notebook.backends")]
    assert not bad, "\n".join(bad)


def test_the_magics_are_one_module_per_topic_registered_in_one_call():
    """``magics/``: each topic's module under 300 lines, every magics class in ``MAGICS`` (``register`` adds them)."""
    from vllm_notebook.magics import MAGICS

    long = {name: n for name, path in MODULES.items() if name.startswith("vllm_notebook.magics")
            and (n := len(path.read_text().splitlines())) > 300}
    assert not long, long
    defined = {k for k, (mod, _) in _classes().items() if mod.startswith("vllm_notebook.magics.") and k.endswith("Magics")}
    assert defined == {cls.__name__ for cls in MAGICS}, defined


def test_the_jupyterlab_extension_ships_every_file_where_jupyterlab_looks():
    """The wheel installs the extension (``labextension/``) into share/jupyter/labextensions/vllm-notebook: every file
    of it is in pyproject's data-files under the same relative path, and package.json names the entry that exists;
    the entry registers the container under the package's name."""
    import json
    import tomllib

    ext = ROOT / "labextension"
    data = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {f"{dest}/{Path(src).name}" for dest, files in data.items() for src in files}
    files = {f"share/jupyter/labextensions/vllm-notebook/{f.relative_to(ext)}" for f in ext.rglob("*") if f.is_file()}
    assert files == shipped, (files ^ shipped)
    package = json.loads((ext / "package.json").read_text())
    entry = ext / package["jupyterlab"]["_build"]["load"]
    assert entry.is_file() and '_JUPYTERLAB[NAME]' in entry.read_text()
    assert f'var NAME = "{package["name"]}";' in entry.read_text()
