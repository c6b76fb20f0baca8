"""``%vllm_cluster``: the allocation, the plans of loaded engines and the Ray cluster, as one table."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.registry import engines
from ..tables import html_pairs, text_pairs


@dataclass
class ClusterView:
    rows: list[tuple[str, str]]

    @classmethod
    def collect(cls, alloc, cluster) -> ClusterView:
        rows = list(alloc.rows())
        left = alloc.time_left()
        if left is not None:
            rows.append(("time left", f"{left // 3600}h {left % 3600 // 60:02d}m"))
        for name, eng in sorted(engines().items()):
            p = eng.plan
            rows.append((f"engine '{name}'", f"TP {p.get('tensor_parallel_size')} x PP {p.get('pipeline_parallel_size')}, "
                                              f"executor {p.get('executor') or 'single process'}"))
        rows += cluster.rows() if cluster is not None else [("Ray cluster", "none (start one with %vllm_cluster --up)")]
        return cls(rows)

    def __str__(self) -> str:
        return "\n".join(text_pairs(self.rows))

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        return html_pairs(self.rows)
