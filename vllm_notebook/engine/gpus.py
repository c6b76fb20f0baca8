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


def cards() -> list[dict] | None:
    """Each visible GPU as NVML names it: ``name``, ``memory_mib`` and ``bandwidth_gb_s`` (its memory's peak:
    the top memory clock × bus width × 2 transfers a clock, e.g. 3,352 GB/s for an H100 SXM's HBM3), or None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no device
        return None
    try:
        found = []
        for i in _visible(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            card = {"name": name.decode() if isinstance(name, bytes) else name,
                    "memory_mib": int(pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20), "bandwidth_gb_s": None}
            try:
                clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
                bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
                card["bandwidth_gb_s"] = round(clock_mhz * 1e6 * bus_bits * 2 / 8 / 1e9)
            except Exception:  # noqa: BLE001 - an older driver without the bus width: the rest stands
                pass
            found.append(card)
        return found
    finally:
        pynvml.nvmlShutdown()


def weight_bytes(model_dir: str) -> int | None:
    """The bytes of a local model folder's weights (its safetensors files), or None: what each decode step
    reads from memory at least, so ``bandwidth / weight_bytes`` bounds one stream's tokens/s."""
    from pathlib import Path

    files = list(Path(model_dir).glob("*.safetensors")) if os.path.isdir(model_dir) else []
    return sum(f.stat().st_size for f in files) or None
