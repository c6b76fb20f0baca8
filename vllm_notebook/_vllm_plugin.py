"""A vLLM general plugin (entry point ``vllm.general_plugins``), run in every vLLM process.

On CPUs with AMX, Linux kills a process that uses AMX tiles before asking the
kernel for permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``). vLLM's CPU build
uses AMX kernels for bf16 and does not always ask first: a short first request
then ends in SIGILL ("worker died unexpectedly, exit code -4"). Asking once at
start-up is harmless everywhere, so we do.
"""

from __future__ import annotations


def register() -> None:
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            torch.cpu._init_amx()
    except Exception:  # noqa: BLE001 - never break vLLM's start for this
        pass
