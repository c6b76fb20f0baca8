"""LoRA adapters of an engine: the ones named at load (``--lora-modules name=path``) and those added later.

An adapter is a PEFT folder (``adapter_config.json`` and the weights). What vLLM would refuse after a
request has waited (a rank above ``--max-lora-rank``, a folder that is not an adapter, an engine loaded
without ``--enable-lora``) is checked here first and told in one line. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import UsageError


@dataclass(frozen=True)
class Adapter:
    """One adapter: the name requests use, its folder, vLLM's integer id, and its rank (when known)."""

    name: str
    path: str
    id: int
    rank: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "rank": self.rank}


def read_config(path: str) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; a one-line error for a folder that is not a PEFT adapter."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"no LoRA adapter at {path}: not a folder (give the folder with adapter_config.json)")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is not a LoRA adapter: it has no adapter_config.json") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {folder / 'adapter_config.json'}: {exc}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"{path} is not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    return config


def check(name: str, path: str, max_rank: int | None) -> tuple[str, int | None]:
    """The adapter's absolute folder and rank; one line if it cannot be served by this engine."""
    if not name or any(c.isspace() for c in name) or "," in name:
        raise UsageError(f"adapter name {name!r}: use a word without spaces or commas")
    config = read_config(path)
    rank = config.get("r")
    if max_rank and isinstance(rank, int) and rank > max_rank:
        raise UsageError(f"adapter '{name}' has rank {rank}, above the engine's --max-lora-rank {max_rank}; "
                         f"reload with --max-lora-rank {rank} (or more)")
    return os.path.abspath(os.path.expanduser(path)), rank if isinstance(rank, int) else None


# vLLM's CPU build (0.32) kills the engine when a request asks for prompt log-probabilities while LoRA is
# enabled (punica_cpu's add_lora_logits: "einsum(): subscript b has size 7 ... 6"), adapter or not.
PROMPT_LOGPROBS_ON_CPU = ("vLLM's CPU build crashes the engine on prompt log-probabilities (choice scoring, "
                          "prompt_logprobs) when it was loaded with --enable-lora; load one without --enable-lora "
                          "for that (e.g. --name scorer), or use a GPU")


# vLLM's CPU build (0.32) also gives a request without an adapter, batched with adapter requests, the
# adapter in the last LoRA slot (torch_ops' bgmv indexes the slots with -1). In-kernel engines on the CPU
# build therefore send base-model requests to an all-zero adapter (``zero_adapter``): the base model, exactly.
BASE_NAME, BASE_ID = "vllm-notebook-base", 1_000_000


def zero_adapter(like: str) -> str:
    """A PEFT adapter with ``like``'s modules and shapes and all-zero weights (the base model), made once."""
    import hashlib

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = Path(like) / "adapter_model.safetensors"
    if not source.exists():
        raise UsageError(f"{like} has no adapter_model.safetensors; vllm-notebook needs that form on vLLM's CPU build")
    with safe_open(str(source), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = read_config(like)
    digest = hashlib.sha256(json.dumps([sorted(shapes.items()), config.get("target_modules")]).encode()).hexdigest()
    folder = paths.private_dir(paths.cache_root() / "lora-base" / digest[:16])
    if not (folder / "adapter_model.safetensors").exists():
        save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config.get("r", 8)}))
    return str(folder)


def parse_modules(values: Sequence[Any] | None) -> list[tuple[str, str]]:
    """``--lora-modules`` values (vLLM's ``LoRAModulePath`` objects, ``name=path`` or dicts) as pairs."""
    out = []
    for v in values or ():
        if isinstance(v, str):
            name, sep, path = v.partition("=")
            if not sep:
                raise UsageError(f"--lora-modules takes NAME=PATH, not {v!r}")
        elif isinstance(v, dict):
            name, path = v.get("name", ""), v.get("path", "")
        else:
            name, path = getattr(v, "name", ""), getattr(v, "path", "")
        out.append((str(name), str(path)))
    return out


class Adapters:
    """An engine's adapters by name; ids are never reused, as vLLM caches adapters by id."""

    def __init__(self, enabled: bool = False, max_rank: int | None = None, max_loras: int | None = None):
        self.enabled = enabled
        self.max_rank = max_rank
        self.max_loras = max_loras
        self._by_name: dict[str, Adapter] = {}
        self._next_id = 1

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def new(self, name: str, path: str, *, check_rank: bool = True) -> Adapter:
        """An adapter for ``name`` (not yet added: ``add`` does that once the engine took it)."""
        self.need_enabled(f"add adapter '{name}'")
        if name in self._by_name:
            raise UsageError(f"an adapter named '{name}' is loaded already ({self._by_name[name].path}); "
                             f"remove it first: %vllm_lora remove {name}")
        folder, rank = check(name, path, self.max_rank if check_rank else None)
        return Adapter(name, folder, self._next_id, rank)

    def add(self, adapter: Adapter) -> None:
        self._by_name[adapter.name] = adapter
        self._next_id = max(self._next_id, adapter.id + 1)

    def pop(self, name: str) -> Adapter:
        adapter = self._by_name.pop(name, None)
        if adapter is None:
            raise UsageError(self.unknown(name))
        return adapter

    def get(self, name: str) -> Adapter:
        """The adapter a request names (one line when there is none)."""
        self.need_enabled(f"use adapter '{name}'")
        if name not in self._by_name:
            raise UsageError(self.unknown(name))
        return self._by_name[name]

    def unknown(self, name: str) -> str:
        have = ", ".join(self._by_name) or "none"
        return f"no LoRA adapter named '{name}' (loaded: {have}); add it with %vllm_lora add {name} PATH"

    def need_enabled(self, what: str) -> None:
        if not self.enabled:
            raise UsageError(f"cannot {what}: the engine was loaded without LoRA; reload with --enable-lora "
                             "(and --lora-modules NAME=PATH ..., --max-lora-rank R for adapters above rank 16)")

    def for_prompts(self, lora: str | Sequence[str | None] | None, n: int) -> list[Adapter | None]:
        """One adapter (or None: the base model) per prompt, from one name or a list of names."""
        if lora is None:
            return [None] * n
        if isinstance(lora, str):
            adapter = self.get(lora)
            return [adapter] * n
        names = list(lora)
        if len(names) != n:
            raise UsageError(f"lora= names {len(names)} adapter(s) for {n} prompt(s): give one name, or one per prompt")
        return [None if not name else self.get(name) for name in names]

    def listing(self) -> list[dict[str, Any]]:
        return [a.as_dict() for a in self._by_name.values()]
