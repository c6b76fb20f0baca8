"""GPU memory as the driver sees it (NVML), without initialising CUDA in the kernel.

Used to show what sleep mode frees and what unloading gives back. NVML comes with
vLLM's CUDA build (``nvidia-ml-py``); where it is missing (the CPU build, a login
node) every function returns ``None`` and callers show nothing.
"""

from __future__ import annotations

import os


def _visible(count: int) -> list[int]:
    """The device indices this process may use: ``CUDA_VISIBLE_DEVICES`` when it holds indices."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(count))
    picked = [int(t) for t in spec.split(",") if t.strip().isdigit()]
    return [i for i in picked if i < count] if picked or not spec.strip() else list(range(count))


def used_mib() -> list[int] | None:
    """Used memory of each visible GPU in MiB (every process's, as ``nvidia-smi`` shows it), or None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no device: nothing to show
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in _visible(pynvml.nvmlDeviceGetCount())]
        return [int(pynvml.nvmlDeviceGetMemoryInfo(h).used // 2**20) for h in handles]
    finally:
        pynvml.nvmlShutdown()


def describe(before: list[int] | None, after: list[int] | None) -> str:
    """``GPU memory 131,797 → 839 MiB`` (summed over the visible GPUs), or '' without NVML."""
    if not before or not after:
        return ""
    b, a = sum(before), sum(after)
    change = f"{b - a:,} MiB freed" if b >= a else f"{a - b:,} MiB taken"
    return f"GPU memory {b:,} → {a:,} MiB ({change})"
