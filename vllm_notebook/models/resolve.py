"""Finding a model: a local folder, or a Hugging Face id (cache first, then the Hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelNotFoundError, VllmNotebookError
from .hub import ask_hub, cache_dir, endpoint, fetch_hint, offline


def resolve(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """Return a local folder holding the model's config.json, or raise a one-line error.

    A Hugging Face id is looked up in the cache (``--download-dir``, ``$HF_HUB_CACHE``,
    ``$HF_HOME``) without touching the network. Only when it is not cached is the
    Hub asked, with a short timeout, so an offline compute node fails in seconds.
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")) and not _gguf(expanded):
            raise ModelNotFoundError(f"{model} is a folder but holds no config.json: is it a model folder?")
        return expanded
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {model}")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError


    try:
        cached = try_to_load_from_cache(model, "config.json", cache_dir=str(cache_dir(download_dir)),
                                        revision=revision)
    except HFValidationError:
        raise ModelNotFoundError(f"{model!r} is neither a model folder nor a Hugging Face model id (org/name)") from None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    return _check_hub(model, revision, download_dir)


def from_cache(model: str, path: str) -> bool:
    """``path`` is the cached snapshot of the Hub id ``model`` (load it from disk, offline)."""
    return path != model and not os.path.isdir(os.path.expanduser(model))


def _check_hub(model: str, revision: str | None, download_dir: str | None = None) -> str:
    """Not cached: ask the Hub quickly, so an offline node fails in seconds, not minutes."""

    where = f"{model}{'@' + revision if revision else ''} is not in the Hugging Face cache ({cache_dir(download_dir)})"
    if offline():
        raise ModelNotFoundError(f"{where} and HF_HUB_OFFLINE is set; {fetch_hint(model, revision)}")
    try:
        ask_hub(model, revision, then=fetch_hint(model, revision),
                unreachable=f"{where} and the Hub ({endpoint()}) is unreachable; {fetch_hint(model, revision)}")
    except ModelNotFoundError:
        raise
    except VllmNotebookError as exc:  # unreachable: a model that cannot be found, as far as this node knows
        raise ModelNotFoundError(str(exc)) from None
    return model


def _gguf(folder: str) -> bool:
    return any(name.endswith(".gguf") for name in os.listdir(folder))


def read_config(folder_or_id: str) -> dict:
    path = os.path.join(folder_or_id, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
