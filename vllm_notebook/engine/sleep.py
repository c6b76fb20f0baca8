"""Sleep mode: free the GPU without losing the engine (``Engine.sleep`` / ``Engine.wake``).

vLLM's sleep mode (an engine loaded with ``--enable-sleep-mode``, CUDA only) level 1
moves the weights to CPU memory and drops the KV cache; level 2 drops the weights
too, and waking reloads them from disk. The engine's processes, compiled graphs
and tokenizer stay, so waking takes a fraction of a cold load. This module holds
what both engine back-ends share: level checks and the report a call returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from . import gpus

LEVELS = (1, 2)


def check_level(level: int) -> int:
    if level not in LEVELS:
        raise UsageError(f"sleep level must be 1 (weights to CPU memory) or 2 (weights dropped), not {level!r}")
    return level


def not_enabled(name: str) -> UsageError:
    return UsageError(f"engine '{name}' was loaded without sleep mode: load it with --enable-sleep-mode "
                      "(a CUDA build of vLLM; the CPU build cannot sleep)")


@dataclass(repr=False)
class SleepReport:
    """What one ``sleep`` or ``wake`` did: how long it took and the GPU memory before and after."""

    engine: str
    action: str  # "sleep" or "wake"
    level: int
    seconds: float
    memory_before: list[int] | None = None  # MiB per visible GPU (NVML), None where there is no NVML
    memory_after: list[int] | None = None

    @property
    def freed_mib(self) -> int | None:
        if not self.memory_before or not self.memory_after:
            return None
        return sum(self.memory_before) - sum(self.memory_after)

    def __str__(self) -> str:
        memory = gpus.describe(self.memory_before, self.memory_after)
        if self.action == "sleep":
            head = f"engine '{self.engine}' asleep (level {self.level}) in {self.seconds:.2f} s"
            tail = "%vllm_wake (or .wake()) brings it back"
        else:
            head = f"engine '{self.engine}' awake in {self.seconds:.2f} s (slept at level {self.level})"
            tail = "ready for requests"
        return " — ".join(part for part in (head, memory, tail) if part)

    def __repr__(self) -> str:
        return f"<SleepReport {self}>"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))
