"""IPython magics, one module per topic: each parses its line, calls the Python API and returns the result.

- ``engines``: ``%vllm_load``, ``%vllm_unload``, ``%vllm_sleep``, ``%vllm_wake``, ``%vllm_status``, ``%vllm_logs``,
  ``%vllm_panel``;
- ``generation``: ``%%generate``, ``%%chat``, ``%chat_history``, ``%chat_reset``, ``%vllm_history``;
- ``tasks``: ``%vllm_lora``, ``%embed``, ``%%score``;
- ``services``: ``%vllm_servers``, ``%vllm_jobs``, ``%vllm_cluster``;
- ``environment``: ``%vllm_doctor``, ``%vllm_models``;
- ``settings``: ``VllmMagics``, the settings of all of them (``%config VllmMagics``);
- ``args``: how a magic's line is read (``$name``, ``{name}``, quoting, one-line errors).

``register`` adds them all in one call (``%load_ext vllm_notebook``). Importing this package imports neither
vLLM nor torch.
"""

from __future__ import annotations

from .. import private
from ..engine.registry import shutdown
from ..ui import render
from .engines import EngineMagics
from .environment import EnvironmentMagics
from .generation import GenerationMagics
from .services import ServiceMagics
from .settings import VllmMagics
from .tasks import TaskMagics

#: Every magics class, settings first (the topics read them).
MAGICS = (VllmMagics, EngineMagics, GenerationMagics, TaskMagics, ServiceMagics, EnvironmentMagics)

__all__ = ["MAGICS", "register", "unregister"] + [cls.__name__ for cls in MAGICS]


def register(ipython) -> None:
    """Register the magics once (loading the extension twice is harmless)."""
    if "VllmMagics" in ipython.magics_manager.registry:
        return
    private.protect_process()  # before torch or vLLM is imported: temp files, sockets and caches private
    for cls in MAGICS:
        ipython.register_magics(cls(shell=ipython))
    render.register(ipython)  # how results, comparisons and engines are shown


def unregister(ipython) -> None:
    """Undo ``register``: unload our engines and remove every magic we added."""
    shutdown()
    for cls in MAGICS:
        magics = ipython.magics_manager.registry.pop(cls.__name__, None)
        if magics is None:
            continue
        for kind, table in magics.magics.items():
            for name in table:
                ipython.magics_manager.magics[kind].pop(name, None)
        if magics in ipython.configurables:
            ipython.configurables.remove(magics)
