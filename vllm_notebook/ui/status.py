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


#: The compact table's columns: what fits 100 characters (``--all`` and ``.to_pandas()`` have the rest).
COMPACT = ("engine", "model", "where", "state", "tok/s", "KV use")
_MODEL_WIDTH = 30


@dataclass(repr=False)
class Status:
    """``%vllm_status``: one compact row per engine (name, model, where, state, tokens/s, KV use); ``all=True``
    (``%vllm_status --all``) shows every field, and ``.to_pandas()`` gives them as a DataFrame."""

    rows: list[dict]
    kernel_rss_mb: float
    children_rss_mb: float = 0.0
    journal: str = ""
    all: bool = False

    @classmethod
    def collect(cls, all: bool = False) -> Status:
        import os

        import psutil

        rows = []
        for name, eng in sorted(engines().items()):
            eng.refresh_usage()
            f, st = eng.facts, eng.stats
            usage = _usage(eng)
            rows.append({
                "engine": name, "model": eng.model, "where": _where(eng), "state": eng.state,
                "tok/s": f"{st.last_tokens_per_s:,.0f}" if st.last_tokens_per_s else "-",
                "KV use": usage["KV cache use"].split(" (")[0],
                "TP/PP": f"{f.get('tensor_parallel_size')}/{f.get('pipeline_parallel_size')}",
                "device": f.get("device"), "dtype": f.get("dtype") or "unknown", "max_model_len": f.get("max_model_len"),
                "runner": eng.runner or "?",
                "LoRA adapters": ", ".join(eng.adapters.names()) or ("none" if eng.adapters.enabled else "off"),
                "KV cache tokens": f"{f['kv_cache_tokens']:,}" if f.get("kv_cache_tokens") else "unknown",
                **usage,
                "requests": st.requests, "prompt tokens": st.prompt_tokens, "output tokens": st.output_tokens,
                "plan": ", ".join(f"{k}={v}" for k, v in eng.plan.items()), "log": eng.log_path,
            })
            for k, part in enumerate(eng.backend.parts(), 1):  # a replica: where, state, its load
                rows.append({**{key: "" for key in rows[-1]}, "engine": f"  {name}[{k}]", "where": part["where"],
                             "state": f"{part['state']} · {part['in flight']} in flight · {part['served']:,} done",
                             "tok/s": f"{part['tokens/s']:,}" if part.get("tokens/s") else "-", "KV use": "",
                             "log": part["log"]})
        rss = psutil.Process(os.getpid()).memory_info().rss / 2**20
        return cls(rows, rss, _rss_mb(os.getpid()) - rss, journal_line(), all=all)

    def _shown(self) -> tuple[tuple[str, ...], list[list]]:
        if self.all:
            keys = tuple(k for k in self.rows[0] if k not in ("KV use",))
            return keys, [[r[k] for k in keys] for r in self.rows]
        return COMPACT, [[_short(r[k]) if k == "model" else r[k] for k in COMPACT] for r in self.rows]

    def to_pandas(self):
        """Every field of every engine, one row each (needs pandas)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return f"no engine loaded — start one with %vllm_load MODEL\n{self.journal}"
        if self.all:
            out = []
            for row in self.rows:
                out.append(f"engine '{row['engine']}'")
                out += [f"  {k:<26} {v}" for k, v in row.items() if k not in ("engine", "KV use")]
        else:
            keys, rows = self._shown()
            table = [keys, *[tuple(map(str, r)) for r in rows]]
            widths = [max(len(r[i]) for r in table) for i in range(len(keys))]
            out = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
        out += [self._memory(), self.journal]
        if not self.all:
            out.append("every field: %vllm_status --all, or .to_pandas()")
        return "\n".join(out)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        if not self.rows:
            return "".join(f"<p>{html.escape(line)}</p>" for line in str(self).splitlines())
        keys, rows = self._shown()
        more = "" if self.all else "<br>every field: %vllm_status --all, or .to_pandas()"
        return (html_table(rows, keys)
                + f"<p><sub>{html.escape(self._memory())}<br>{html.escape(self.journal)}{more}</sub></p>")

    def _memory(self) -> str:
        return (f"memory: kernel {self.kernel_rss_mb:.0f} MB, "
                f"engine processes {self.children_rss_mb:.0f} MB (resident)")


def _short(model: str, width: int = _MODEL_WIDTH) -> str:
    """A model's name that fits a column: a folder's last part (a cache snapshot's repository), cut in the middle."""
    text = str(model)
    if "/" in text and (text.startswith(("/", "~", ".")) or text.count("/") > 1):
        parts = [p for p in text.split("/") if p]
        if "snapshots" in parts:  # .../models--org--name/snapshots/<hash>
            text = parts[parts.index("snapshots") - 1].removeprefix("models--").replace("--", "/")
        else:
            text = parts[-1] if parts else text
    if len(text) > width:
        half = (width - 1) // 2
        text = text[:half] + "…" + text[-(width - 1 - half):]
    return text


def _where(eng) -> str:
    """Where it runs, in a few words: this kernel, a server (its port) or a Slurm job, another node, the device."""
    import socket

    parts = [eng.backend.place()]
    node = (eng.backend.where() or {}).get("node")
    if node and node != socket.gethostname():
        parts.append(str(node))
    if eng.facts.get("device"):
        parts.append(str(eng.facts["device"]))
    return " · ".join(parts)


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
