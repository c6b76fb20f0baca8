"""Where vllm-notebook keeps its files, read from the environment when asked (never at import).

A leaf: it imports nothing else of the package. Every folder it hands out that
holds logs, keys or the server registry is private (mode 0700), whatever the umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where vllm-notebook caches what it builds: ``$VLLM_NOTEBOOK_CACHE``, else ``$XDG_CACHE_HOME/vllm-notebook``."""
    env = os.environ.get("VLLM_NOTEBOOK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "vllm-notebook"


def private_dir(path: Path) -> Path:
    """``path`` created if needed and made readable by its owner only (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def log_dir() -> Path:
    """Engine and server logs: ``$VLLM_NOTEBOOK_LOG_DIR``, else ``<cache>/logs``."""
    env = os.environ.get("VLLM_NOTEBOOK_LOG_DIR")
    return private_dir(Path(env).expanduser() if env else cache_root() / "logs")


def servers_dir() -> Path:
    """The server registry and API key files."""
    return private_dir(cache_root() / "servers")
