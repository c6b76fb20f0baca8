"""vllm-notebook: drive the vLLM inference engine from Jupyter.

``%load_ext vllm_notebook`` registers the magics. The Python API below works
without IPython. Importing this package imports neither vLLM nor torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "load": "loader", "LoadPlan": "loader", "attach": "loader",
    "ServerEngine": "client", "servers": "servers",
    "Engine": "engine", "engines": "engine", "get_engine": "engine", "unload_all": "engine",
    "Generation": "generation",
    "demo_model": "demo",
    "panel": "prompt_panel", "PromptPanel": "prompt_panel",
    "VllmNotebookError": "errors",
}
__all__ = sorted(_LAZY) + ["load_ipython_extension", "unload_ipython_extension"]

if TYPE_CHECKING:  # pragma: no cover
    from .demo import demo_model
    from .engine import Engine, engines, get_engine, unload_all
    from .errors import VllmNotebookError
    from .generation import Generation
    from . import servers
    from .client import ServerEngine
    from .loader import LoadPlan, attach, load
    from .prompt_panel import PromptPanel, panel


def __getattr__(name: str):
    if name in _LAZY:
        module = import_module(f".{_LAZY[name]}", __name__)
        return module if _LAZY[name] == name else getattr(module, name)
    raise AttributeError(f"module 'vllm_notebook' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unregister

    unregister(ipython)
