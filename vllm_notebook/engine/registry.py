"""The engines of this kernel, by name: one registry for both back-ends."""

from __future__ import annotations

import atexit
import sys
import threading
from typing import TYPE_CHECKING

from ..errors import NoEngineError

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine

_ENGINES: dict[str, Engine] = {}
_lock = threading.RLock()


def engines() -> dict[str, Engine]:
    """The loaded engines, by name."""
    with _lock:
        return dict(_ENGINES)


def get_engine(name: str | None = None) -> Engine:
    """The engine called ``name``; with no name, the only one (or ``default``)."""
    with _lock:
        if name is None:
            if len(_ENGINES) == 1:
                return next(iter(_ENGINES.values()))
            name = "default"
        eng = _ENGINES.get(name)
    if eng is None:
        loaded = ", ".join(sorted(_ENGINES)) or "none"
        hint = "load one with %vllm_load MODEL" if not _ENGINES else f"loaded: {loaded}; pick one with --name"
        raise NoEngineError(f"no engine named '{name}' — {hint}")
    return eng


def register(engine: Engine) -> Engine | None:
    """Make ``engine`` the one called ``engine.name``; returns the engine it replaces (not stopped here)."""
    with _lock:
        old = _ENGINES.get(engine.name)
        _ENGINES[engine.name] = engine
    return old if old is not engine else None


def unregister(engine: Engine) -> None:
    """Forget ``engine`` if it is still the one registered under its name."""
    with _lock:
        if _ENGINES.get(engine.name) is engine:
            del _ENGINES[engine.name]


def unload_all() -> None:
    for eng in list(engines().values()):
        eng.unload()


def shutdown() -> None:
    """At exit (kernel shutdown, %unload_ext): every in-kernel engine (servers live on), then our Ray cluster."""
    for eng in list(engines().values()):
        eng.close_at_exit()
    ray = sys.modules.get("vllm_notebook.cluster.ray")  # only if a cluster was ever used: no import here
    if ray is not None:
        ray.down()


atexit.register(shutdown)
