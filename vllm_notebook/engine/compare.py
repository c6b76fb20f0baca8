"""Side by side: the same prompts on several engines, or with several sampling settings, at once.

Each column (an engine, a setting, or both) is one ``Engine.run`` in a thread of its own, so all columns
run at the same time: columns on one engine meet in its scheduler and are batched together, columns on
different engines run in parallel. Every column is journaled and resumed like any run. Ctrl-C stops all
columns and keeps what they made.
"""

from __future__ import annotations

import difflib
import json
import shlex
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from . import sampling
from .core import Engine
from .generation import Generation, reasons_text
from .registry import get_engine
from .requests import as_batch


@dataclass
class Column:
    """One column: an engine and the settings its run adds to the shared ones."""

    label: str
    engine: Engine
    settings: dict[str, Any] = field(default_factory=dict)  # sampling fields, and ``system`` (a system message)


def parse_setting(spec: str) -> dict[str, Any]:
    """``"temperature=0.8 top_p=0.9"`` or ``"system='Be terse.'"`` as a dict (values read as JSON where they can be)."""
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise UsageError(f"--compare {spec!r}: {exc}") from None
    out: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"--compare takes NAME=VALUE settings (e.g. --compare temperature=0.8), not {word!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    if not out:
        raise UsageError("--compare needs at least one NAME=VALUE setting")
    # A mistyped name is told here; another vLLM field (extra_args, ...) goes on to the engine, which checks it.
    known = sampling.REQUEST_FIELDS | set(sampling.STRUCTURED) | {"json_schema", "system", "lora"}
    for key in out:
        near = difflib.get_close_matches(key, sorted(known), n=1) if key not in known else []
        if near:
            raise UsageError(f"--compare {spec!r}: unknown setting {key!r} (did you mean {near[0]}?); settings are "
                             "sampling parameters (temperature, top_p, max_tokens, seed, ...), system or lora")
    return out


def _label(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def columns(engines: Sequence[str | Engine] | None = None,
            settings: Sequence[dict[str, Any] | str] | None = None) -> list[Column]:
    """The columns of engines × settings (one engine, the default, when none is named)."""
    engs = [get_engine(e) if e is None or isinstance(e, str) else e for e in (engines or [None])]
    sets = [parse_setting(s) if isinstance(s, str) else dict(s) for s in (settings or [{}])]
    if len(engs) * len(sets) < 2:
        raise UsageError("a comparison needs two columns or more: several engines (--name a,b) "
                         "or several settings (--compare temperature=0 --compare temperature=0.8)")
    names = [e.name for e in engs]
    if len(set(names)) < len(names):
        raise UsageError(f"an engine is named twice: {', '.join(names)}")
    cols = []
    for eng in engs:
        for s in sets:
            parts = ([eng.name] if len(engs) > 1 else []) + ([_label(s)] if len(sets) > 1 else [])
            cols.append(Column(" · ".join(parts), eng, s))
    return cols


def compare(prompts, engines: Sequence[str | Engine] | None = None,
            settings: Sequence[dict[str, Any] | str] | None = None, *, params: Any = None, chat: bool = False,
            system: str | None = None, lora: str | None = None,
            on_output: Callable[[str, int, Any], None] | None = None,
            resume: bool | None = None, journal_results: bool = True, **sampling) -> Comparison:
    """Run ``prompts`` on every engine × setting at once; one ``Comparison`` (a side-by-side table).

    ``engines``: names or engines (default: the only one). ``settings``: dicts of sampling fields (or
    ``"temperature=0.8"`` strings), each a column; ``system`` in a setting is a system message (then each
    prompt is a chat turn), and ``lora`` a LoRA adapter (``lora=none``: the base model). ``sampling``
    applies to all columns.
    """
    batch = as_batch(prompts)
    cols = columns(engines, settings)
    runs = []
    for col in cols:
        fields = {**sampling, **col.settings}
        sys_msg = fields.pop("system", system)
        adapter = fields.pop("lora", lora)
        adapter = None if adapter in (None, "", "none", "base") else str(adapter)
        engine_prompts = batch
        if chat or sys_msg:
            head = [{"role": "system", "content": sys_msg}] if sys_msg else []
            engine_prompts = [col.engine.chat_prompt(head + [{"role": "user", "content": p}]) for p in batch]
        runs.append((col, engine_prompts, col.engine.params(params, fields), adapter))
    stop = threading.Event()
    results: dict[str, Generation] = {}
    errors: dict[str, BaseException] = {}

    def one(col: Column, engine_prompts, p, adapter) -> None:
        try:
            report = (lambda i, out: on_output(col.label, i, out)) if on_output else None
            results[col.label] = col.engine.run(engine_prompts, p, on_output=report, stop_event=stop, lora=adapter,
                                                resume=resume, journal_results=journal_results)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[col.label] = exc

    threads = [threading.Thread(target=one, args=r, name=f"vllm-notebook-compare-{r[0].label}", daemon=True)
               for r in runs]
    for t in threads:
        t.start()
    interrupted = False
    for t in threads:
        while t.is_alive():
            try:
                t.join(timeout=0.1)
            except KeyboardInterrupt:  # every column stops and returns what it has
                interrupted = True
                stop.set()
    if errors:
        raise next(iter(errors.values()))
    return Comparison([str(p) for p in batch], {c.label: results[c.label] for c in cols}, interrupted or
                      any(g.interrupted for g in results.values()))


class Comparison:
    """The columns of a comparison: ``generations`` (label → ``Generation``), one row per prompt."""

    def __init__(self, prompts: list[str], generations: dict[str, Generation], interrupted: bool = False):
        self.prompts = prompts
        self.generations = generations
        self.interrupted = interrupted

    @property
    def labels(self) -> list[str]:
        return list(self.generations)

    @property
    def provenance(self) -> dict[str, dict]:
        return {label: g.provenance for label, g in self.generations.items()}

    def texts(self, label: str) -> list[str]:
        return self.generations[label].texts

    def __repr__(self) -> str:
        return f"<Comparison {len(self.prompts)} prompt(s) × {', '.join(self.labels)}>"

    def rows(self) -> list[dict]:
        """Long form: one row per prompt, column and completion."""
        out = []
        for label, gen in self.generations.items():
            m = gen.metrics
            for i, c in gen.completions:
                out.append({"prompt": self.prompts[i], "column": label, "engine": gen.engine, "text": c.text,
                            "tokens": len(c.token_ids), "finish_reason": c.finish_reason or "aborted",
                            "tokens_per_s": m["tokens_per_s"]})
        return out

    def to_pandas(self, wide: bool = False):
        """Long form (one row per prompt × column), or ``wide=True``: one row per prompt, one column per label."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError("to_pandas() needs pandas: pip install pandas") from None
        long = pd.DataFrame.from_records(self.rows(), columns=["prompt", "column", "engine", "text", "tokens",
                                                               "finish_reason", "tokens_per_s"])
        df = long
        if wide:
            first = long.drop_duplicates(["prompt", "column"])
            df = first.pivot(index="prompt", columns="column", values="text").reindex(
                index=list(dict.fromkeys(self.prompts)), columns=self.labels)
            df.columns.name = None
        df.attrs["provenance"] = self.provenance
        return df

    def footer(self, label: str) -> str:
        m = self.generations[label].metrics
        journal = f", {m['from_journal']} from the journal" if m.get("from_journal") else ""
        return (f"{m['tokens_per_s']:.1f} tok/s, {m['output_tokens']} tokens, "
                f"finish: {reasons_text(m['finish_reasons'])}{journal}")
