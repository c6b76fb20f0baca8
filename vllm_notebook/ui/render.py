"""How results and engines look in a notebook and in a terminal."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from .tables import html_table

_MAX_CELL = 400


def plain(gen) -> str:
    if gen.format == "json":
        return json.dumps(gen.to_records(), indent=2, ensure_ascii=False)
    if gen._single():
        return f"{gen.text}\n\n[{gen.footer()}]"
    rows = [f"[{i}] {r['prompt']!r} -> {_shown(r)!r} ({r['tokens']} tokens, {r['finish_reason']})"
            for i, r in enumerate(gen.to_records())]
    return "\n".join(rows + [f"[{gen.footer()}]"])


# Code spans and blocks: Markdown shows them literally, so they are left as written.
_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]*`)", re.S)
_UNSAFE_LINK = re.compile(r"\]\(\s*<?\s*(?:javascript|vbscript|data|file):", re.I)


def safe_markdown(text: str) -> str:
    """Model output (untrusted) as Markdown that renders no HTML, loads nothing and runs nothing.

    JupyterLab trusts live outputs, so raw HTML in a completion (``<img src=x onerror=...>``, easy to get
    through prompt injection) would run as the user. Outside code spans and fenced blocks, ``&`` and ``<``
    are escaped (shown as typed), images become plain links (no request leaves the browser on display)
    and ``javascript:``-style link targets are defused. Headings, lists, emphasis, links and code render.
    """
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # the even parts are prose; the odd ones code
        prose = parts[i].replace("&", "&amp;").replace("<", "&lt;")
        prose = prose.replace("![", "\\![")
        parts[i] = _UNSAFE_LINK.sub("](#unsafe-link:", prose)
    return "".join(parts)


def markdown(gen) -> str:
    return f"{safe_markdown(gen.text)}\n\n<sub>{html.escape(gen.footer())}</sub>"


def _shown(record: dict) -> str:
    """A row's output: the text, or a failed prompt's one-line error."""
    return record["text"] if record.get("text") is not None else f"error: {record.get('error', '')}"


def table_html(gen) -> str:
    rows = [(i, r["prompt"], _shown(r), r["tokens"], r["finish_reason"]) for i, r in enumerate(gen.to_records())]
    return (html_table(rows, ("#", "prompt", "output", "tokens", "finish"), limit=_MAX_CELL)
            + f"<p><sub>{html.escape(gen.footer())}</sub></p>")


def bundle(gen) -> dict[str, Any]:
    fmt = gen.format
    data: dict[str, Any] = {"text/plain": plain(gen)}
    if fmt == "json":
        data["application/json"] = gen.to_records()
    elif fmt == "text":
        pass
    elif gen._single():
        data["text/markdown"] = markdown(gen) if fmt in ("auto", "markdown") else None
    else:
        data["text/html"] = table_html(gen)
    return {k: v for k, v in data.items() if v is not None}


def metadata(gen) -> dict[str, Any]:
    """The run record in the output's metadata: a saved notebook says what made each result."""
    return {"vllm_notebook": {"provenance": json.loads(json.dumps(gen.provenance, default=repr))}} \
        if gen.provenance else {}


def show(gen) -> None:
    from IPython.display import display

    live, gen._live = gen._live, None
    if gen._printed:
        gen._printed = False
        print(f"\n[{gen.footer()}]")
        return
    data = bundle(gen)
    if live is not None:
        live.update(data, raw=True, metadata=metadata(gen))
    else:
        display(data, raw=True, metadata=metadata(gen))


def engine_markdown(engine) -> str:
    f = engine.facts
    rows = [
        ("model", f.get("model")), ("dtype", f.get("dtype") or "unknown"), ("max_model_len", f.get("max_model_len")),
        ("tensor / pipeline parallel", f"{f.get('tensor_parallel_size')} / {f.get('pipeline_parallel_size')}"),
        ("device", f.get("device")), ("KV cache", f"{f['kv_cache_tokens']:,} tokens" if f.get("kv_cache_tokens") else "unknown"),
        ("loaded in", f"{engine.load_seconds:.1f} s" if engine.load_seconds else "-"),
        ("log", engine.log_path),
    ]
    body = "\n".join(f"| {k} | `{v}` |" for k, v in rows)
    return f"**vLLM engine `{engine.name}`** ({'running' if engine.alive else 'stopped'})\n\n| | |\n|---|---|\n{body}\n"


def show_engine(engine) -> None:
    """Display an engine, except right after %vllm_load, whose progress line already summarised it."""
    from IPython import get_ipython
    from IPython.display import Markdown, display

    shell = get_ipython()
    if shell is not None and engine._announced_in == shell.execution_count:
        return
    display(Markdown(engine._repr_markdown_()))


def comparison_html(cmp) -> str:
    """Prompt per row, one column per engine or setting; model output escaped (``html_table``)."""
    columns = [g.first_texts() for g in cmp.generations.values()]
    rows = [(i, p, *(col[i] for col in columns)) for i, p in enumerate(cmp.prompts)]
    rows.append(("", "", *(cmp.footer(label) for label in cmp.labels)))
    note = "<p><sub>interrupted: the columns hold what was made</sub></p>" if cmp.interrupted else ""
    return html_table(rows, ("#", "prompt", *cmp.labels), limit=_MAX_CELL) + note


def comparison_plain(cmp) -> str:
    columns = [g.first_texts() for g in cmp.generations.values()]
    out = []
    for i, p in enumerate(cmp.prompts):
        out.append(f"[{i}] {p!r}")
        out += [f"    {label}: {col[i]!r}" for label, col in zip(cmp.labels, columns)]
    out += [f"[{label}: {cmp.footer(label)}]" for label in cmp.labels]
    if cmp.interrupted:
        out.append("interrupted: the columns hold what was made")
    return "\n".join(out)
