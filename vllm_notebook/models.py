"""Finding a model: a local folder, or a Hugging Face id (cache first, then the Hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ModelNotFoundError


def resolve(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """Return a local folder holding the model's config.json, or raise a one-line error."""
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
        cached = try_to_load_from_cache(model, "config.json", cache_dir=download_dir, revision=revision)
    except HFValidationError:
        raise ModelNotFoundError(f"{model!r} is neither a model folder nor a Hugging Face model id (org/name)") from None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    return _check_hub(model, revision)


def _check_hub(model: str, revision: str | None) -> str:
    """Not cached: ask the Hub quickly, so an offline node fails in seconds, not minutes."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    fetch = f"on a machine with internet (a login node): hf download {model}"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; {fetch}")
    try:
        model_info(model, revision=revision, timeout=5)
    except GatedRepoError:
        raise ModelNotFoundError(f"{model} is gated: accept its license on the Hub, then `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {model} on the Hugging Face Hub (check the spelling; private models need HF_TOKEN)") from None
    except Exception:
        raise ModelNotFoundError(f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub is unreachable; {fetch}") from None
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
