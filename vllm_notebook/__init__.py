"""vllm-notebook: drive the vLLM inference engine from Jupyter.

``%load_ext vllm_notebook`` registers the magics. The Python API below works
without IPython. Importing this package imports neither vLLM nor torch.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it (imported on first use)
    "load": "loader", "LoadPlan": "prepare", "attach": "loader", "submit": "loader",
    "jobs": "backends.slurm_job", "Engine": "engine.core", "Backend": "backends.base",
    "engines": "engine.registry", "get_engine": "engine.registry", "unload_all": "engine.registry",
    "servers": "server", "errors": "errors",
    "Generation": "engine.generation", "SleepReport": "engine.sleep",
    "demo_model": "models.demo", "demo_adapter": "models.demo", "starter_model": "models.starter",
    "history": "engine.journal",
    "embed": "engine.shortcuts", "score": "engine.shortcuts", "score_choices": "engine.shortcuts",
    "compare": "engine.compare", "Comparison": "engine.compare",
    "panel": "ui.panel", "PromptPanel": "ui.panel",
    "VllmNotebookError": "errors",
}
__all__ = sorted(_LAZY) + ["load_ipython_extension", "unload_ipython_extension"]

if TYPE_CHECKING:  # pragma: no cover
    from . import errors
    from . import server as servers
    from .backends.base import Backend
    from .engine.compare import Comparison, compare
    from .engine.core import Engine
    from .engine.generation import Generation
    from .engine.journal import history
    from .engine.registry import engines, get_engine, unload_all
    from .engine.shortcuts import embed, score, score_choices
    from .engine.sleep import SleepReport
    from .errors import VllmNotebookError
    from .loader import attach, load, submit
    from .models.demo import demo_adapter, demo_model
    from .models.starter import starter_model
    from .prepare import LoadPlan
    from .backends.slurm_job import listing as jobs
    from .ui.panel import PromptPanel, panel


def _register_display() -> None:
    """In a running IPython (a notebook that uses the API without ``%load_ext``): how our results are shown."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        from .ui import render

        render.register(shell)


_register_display()


def __getattr__(name: str):
    if name in _LAZY:
        module = import_module(f".{_LAZY[name]}", __name__)
        if name == "jobs":
            return module.listing
        return module if name in ("servers", "errors") else getattr(module, name)
    raise AttributeError(f"module 'vllm_notebook' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unregister

    unregister(ipython)


def _jupyter_labextension_paths() -> list[dict]:
    """Our JupyterLab extension (``labextension/``), for ``jupyter labextension develop`` in an editable install; a
    wheel installs it into ``share/jupyter/labextensions`` itself."""
    return [{"src": "labextension", "dest": "vllm-notebook"}]
