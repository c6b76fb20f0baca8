"""A vLLM general plugin (entry point ``vllm.general_plugins``), run in every vLLM process.

On CPUs with AMX, Linux kills a process that uses AMX tiles before asking the
kernel for permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``). vLLM's CPU build
uses AMX kernels for bf16 and does not always ask first: a short first request
then ends in SIGILL ("worker died unexpectedly, exit code -4"). Asking once at
start-up is harmless everywhere, so we do.

Torch inductor fixes its precompiled-header folder when vLLM imports it, from the temp folder; our engines'
temp folder is private but per engine, so the headers (compiled once, then ``#include``d into every compiled
kernel) are pointed into the private inductor cache, where the next engine finds them (``private.py``).
"""

from __future__ import annotations

from . import private


def register() -> None:
    private.move_torch_headers()
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            torch.cpu._init_amx()
    except Exception:  # noqa: BLE001 - never break vLLM's start for this
        pass
