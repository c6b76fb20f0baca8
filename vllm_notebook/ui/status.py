"""``%vllm_status``: what is loaded and what it is doing."""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..engine import journal
from ..engine.registry import engines
from ..errors import VllmNotebookError
from ..tables import html_table


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


@dataclass
class Status:
    rows: list[dict]
    kernel_rss_mb: float
    children_rss_mb: float = 0.0
    journal: str = ""

    @classmethod
    def collect(cls) -> Status:
        import os

        import psutil

        rows = []
        for name, eng in sorted(engines().items()):
            eng.refresh_usage()
            f, st = eng.facts, eng.stats
            rows.append({
                "engine": name, "model": eng.model, "state": eng.state,
                "TP/PP": f"{f.get('tensor_parallel_size')}/{f.get('pipeline_parallel_size')}",
                "device": f.get("device"), "dtype": f.get("dtype") or "unknown", "max_model_len": f.get("max_model_len"),
                "runner": eng.runner or "?",
                "LoRA adapters": ", ".join(eng.adapters.names()) or ("none" if eng.adapters.enabled else "off"),
                "KV cache tokens": f"{f['kv_cache_tokens']:,}" if f.get("kv_cache_tokens") else "unknown",
                **_usage(eng),
                "requests": st.requests, "prompt tokens": st.prompt_tokens, "output tokens": st.output_tokens,
                "plan": ", ".join(f"{k}={v}" for k, v in eng.plan.items()), "log": eng.log_path,
            })
        rss = psutil.Process(os.getpid()).memory_info().rss / 2**20
        return cls(rows, rss, _rss_mb(os.getpid()) - rss, journal_line())

    def __str__(self) -> str:
        if not self.rows:
            return f"no engine loaded — start one with %vllm_load MODEL\n{self.journal}"
        out = []
        for row in self.rows:
            out.append(f"engine '{row['engine']}'")
            out += [f"  {k:<26} {v}" for k, v in row.items() if k != "engine"]
        out += [self._memory(), self.journal]
        return "\n".join(out)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        if not self.rows:
            return "".join(f"<p>{html.escape(line)}</p>" for line in str(self).splitlines())
        keys = list(self.rows[0])
        return (html_table([[r[k] for k in keys] for r in self.rows], keys)
                + f"<p><sub>{html.escape(self._memory())}<br>{html.escape(self.journal)}</sub></p>")

    def _memory(self) -> str:
        return (f"memory: kernel {self.kernel_rss_mb:.0f} MB, "
                f"engine processes {self.children_rss_mb:.0f} MB (resident)")


def _usage(eng) -> dict[str, str]:
    """KV-cache use and queue lengths: the scheduler's when vLLM's stats are on, else what this kernel knows."""
    u = eng.usage
    if "kv_cache_usage" in u:
        return {"KV cache use": f"{100 * u['kv_cache_usage']:.1f}%",
                "running / waiting": f"{u.get('running', 0)} / {u.get('waiting', 0)}"}
    # stats off (the default, as in vLLM's LLM class: they slow big batches); disable_log_stats=False turns them on
    return {"KV cache use": "not tracked (vLLM stats off)", "running / waiting": f"{eng.stats.running} / -"}


def journal_line() -> str:
    book = journal.current()
    if book is None:
        return "journal: off (%config VllmMagics.journal = True turns it on)"
    try:
        book.lookup([])  # index what is there, for the count
    except VllmNotebookError as exc:  # the rest of the status is still shown
        return f"journal: {exc}"
    return f"journal: {book.path} ({book.size_text()})"
