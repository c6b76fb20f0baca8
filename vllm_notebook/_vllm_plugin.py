"""A vLLM general plugin (entry point ``vllm.general_plugins``), run in every vLLM process.

On CPUs with AMX, Linux kills a process that uses AMX tiles before asking the
kernel for permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``). vLLM's CPU build
uses AMX kernels for bf16 and does not always ask first: a short first request
then ends in SIGILL ("worker died unexpectedly, exit code -4"). Asking once at
start-up is harmless everywhere, so we do.

Torch inductor fixes its precompiled-header folder when vLLM imports it, from the temp folder; our engines'
temp folder is private but per engine, so the headers (compiled once, then ``#include``d into every compiled
kernel) are pointed into the private inductor cache, where the next engine finds them (``private.py``).

On vLLM's CPU build, the first request that asks for logprobs stalled 1.5-20 s: vLLM counts each sampled
token's rank with ``batched_count_greater_than``, which it compiles with torch.compile on first use (a C++
build on a CPU). The same count, eager, takes microseconds there, so the CPU build uses it (``eager_ranks``).
"""

from __future__ import annotations

from . import private


def register() -> None:
    private.move_torch_headers()
    try:
        eager_ranks()
    except Exception:  # noqa: BLE001 - never break vLLM's start for this
        pass
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            torch.cpu._init_amx()
    except Exception:  # noqa: BLE001 - never break vLLM's start for this
        pass


def _count_greater_than(x, values):
    """``(x >= values).sum(-1)``: vLLM's ``batched_count_greater_than`` without its torch.compile."""
    return (x >= values).sum(-1)


def eager_ranks() -> None:
    """On vLLM's CPU build, logprob ranks are counted eagerly (see the module); elsewhere nothing changes."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import sys

    from vllm.v1.sample.ops import logprobs

    logprobs.batched_count_greater_than = _count_greater_than
    sampler = sys.modules.get("vllm.v1.sample.sampler")  # already imported: its own binding too
    if sampler is not None and hasattr(sampler, "batched_count_greater_than"):
        sampler.batched_count_greater_than = _count_greater_than
