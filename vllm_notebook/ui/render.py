"""How results and engines look in a notebook and in a terminal."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from ..tables import html_table
from .display import streamed_into

_MAX_CELL = 400
#: A result of more rows shows its first and last ``_EDGE_ROWS`` with a count between them, as pandas does: a
#: 2,000-row batch is one screen, and a saved notebook stays small. The object keeps every row.
MAX_ROWS = 20
_EDGE_ROWS = 5


def _bounded(rows: list) -> tuple[list, int]:
    """``rows``, or its head and tail with ``None`` where the rest would be; and how many rows were left out."""
    if len(rows) <= MAX_ROWS:
        return rows, 0
    return rows[:_EDGE_ROWS] + [None] + rows[-_EDGE_ROWS:], len(rows) - 2 * _EDGE_ROWS


def _all_rows_hint(gen, skipped: int) -> str:
    n = len(gen.to_records()) if skipped else 0
    return f"{n:,} rows, {skipped:,} not shown: all of them in .to_pandas() or .texts" if skipped else ""


def plain(gen) -> str:
    if gen.format == "json":
        return json.dumps(gen.to_records(), indent=2, ensure_ascii=False)
    if gen.written_to:
        return written_line(gen)
    if gen.single:
        return f"{gen.text}\n\n[{gen.footer()}]"
    numbered, skipped = _bounded(list(enumerate(gen.to_records())))
    rows = [f"... {skipped:,} more rows ..." if item is None else
            f"[{item[0]}] {item[1]['prompt']!r} -> {_cut(_shown(item[1]))!r} ({item[1]['tokens']} tokens, "
            f"{item[1]['finish_reason']})" for item in numbered]
    hint = _all_rows_hint(gen, skipped)
    return "\n".join(rows + [f"[{gen.footer()}]"] + ([hint] if hint else []))


def written_line(gen) -> str:
    """What ``%generate --out-col`` shows: where the texts went, not a table of what the DataFrame shows."""
    return f"{len(gen.prompts):,} texts written to {gen.written_to} · {gen.footer()}"


def _cut(text: str, limit: int = _MAX_CELL) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


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


_SINGLE_BREAK = re.compile(r"(?<!\n)\n(?!\n)")


def markdown(gen) -> str:
    """One completion as Markdown that keeps the streamed text's shape: each line break is a hard break (Markdown
    would join single lines, so poems, lists and addresses would lose theirs), code left as written."""
    parts = _CODE.split(safe_markdown(gen.text))
    for i in range(0, len(parts), 2):
        parts[i] = _SINGLE_BREAK.sub("  \n", parts[i])
    return f"{''.join(parts)}\n\n<sub>{html.escape(gen.footer())}</sub>"


def _shown(record: dict) -> str:
    """A row's output: the text, or a failed prompt's one-line error."""
    return record["text"] if record.get("text") is not None else f"error: {record.get('error', '')}"


def table_html(gen) -> str:
    rows, skipped = _bounded([(i, r["prompt"], _shown(r), r["tokens"], r["finish_reason"])
                              for i, r in enumerate(gen.to_records())])
    rows = [("…", f"{skipped:,} more rows", "", "", "") if r is None else r for r in rows]
    hint = _all_rows_hint(gen, skipped)
    return (html_table(rows, ("#", "prompt", "output", "tokens", "finish"), limit=_MAX_CELL)
            + f"<p><sub>{html.escape(gen.footer())}{'<br>' + html.escape(hint) if hint else ''}</sub></p>")


def bundle(gen) -> dict[str, Any]:
    fmt = gen.format
    data: dict[str, Any] = {"text/plain": plain(gen)}
    if gen.written_to:
        return data
    if fmt == "json":
        data["application/json"] = gen.to_records()
    elif fmt == "text":
        pass
    elif gen.single:
        data["text/markdown"] = markdown(gen) if fmt in ("auto", "markdown") else None
    else:
        data["text/html"] = table_html(gen)
    return {k: v for k, v in data.items() if v is not None}


def metadata(gen) -> dict[str, Any]:
    """The run record in the output's metadata: a saved notebook says what made each result."""
    return {"vllm_notebook": {"provenance": json.loads(json.dumps(gen.provenance, default=repr))}} \
        if gen.provenance else {}


def show(gen) -> None:
    """Show the result where it streamed (once), otherwise as a new output."""
    from IPython.display import display

    live = streamed_into(gen)
    if live is True:  # streamed to a terminal: the text is there already
        print(f"\n[{gen.footer()}]")
        return
    data = bundle(gen)
    if live is not None:
        live.update(data, raw=True, metadata=metadata(gen))
    else:
        display(data, raw=True, metadata=metadata(gen))


def register(shell) -> None:
    """Tell IPython how to show what the engine layer returns (that layer holds no display code): by the
    classes' names, so nothing is imported until an object is shown. Registering twice is harmless."""
    f = shell.display_formatter
    plain_text = f.formatters["text/plain"]
    for module, cls, show_it, text in (
            ("vllm_notebook.engine.generation", "Generation", show, plain),
            ("vllm_notebook.engine.compare", "Comparison", None, comparison_plain),
            ("vllm_notebook.engine.core", "Engine", show_engine, None)):
        if show_it is not None:
            f.ipython_display_formatter.for_type_by_name(module, cls, show_it)
        if text is not None:
            plain_text.for_type_by_name(module, cls, lambda obj, p, cycle, text=text: p.text(text(obj)))
    f.formatters["text/html"].for_type_by_name("vllm_notebook.engine.compare", "Comparison", comparison_html)


def show_engine(engine) -> None:
    """Display an engine (its ``_repr_markdown_``), except right after the %vllm_load whose line summarised it."""
    from IPython import get_ipython
    from IPython.display import Markdown, display

    shell = get_ipython()
    if shell is not None and engine.announced_in == shell.execution_count and engine.backend.summarised_on_load:
        return
    display(Markdown(engine._repr_markdown_()))


def comparison_html(cmp) -> str:
    """Prompt per row, one column per engine or setting; model output escaped (``html_table``)."""
    columns = [g.first_texts() for g in cmp.generations.values()]
    rows, skipped = _bounded([(i, p, *(col[i] for col in columns)) for i, p in enumerate(cmp.prompts)])
    rows = [("…", f"{skipped:,} more rows (all of them: .to_pandas())", *([""] * len(columns))) if r is None else r
            for r in rows]
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
