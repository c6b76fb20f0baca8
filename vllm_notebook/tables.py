"""Tables, as text in a terminal and as HTML in a notebook: every table vllm-notebook shows is made here.

Every cell is escaped: values can hold model output or names others chose.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence


MAX_LINES = 5  # a cut cell's most lines: 10 rows of a result table (its first and last 5) stay one screen
LINE_CHARS = 80  # what a cut cell counts as one line: a longer line wraps, and counts once per 80 characters


def cell(value, limit: int | None = None) -> str:
    """One escaped HTML cell (newlines kept as line breaks; long text cut at ``limit`` characters and at
    ``MAX_LINES`` lines, a line of more than ``LINE_CHARS`` characters counting as the lines it wraps to)."""
    text = str(value)
    if limit is not None:
        text = _cut(text, limit)
    return html.escape(text).replace("\n", "<br>")


def _cut(text: str, limit: int) -> str:
    kept, used = [], 0
    for line in text[:limit].split("\n"):
        need = max(1, -(-len(line) // LINE_CHARS))
        if used + need > MAX_LINES:
            if MAX_LINES - used > 0:
                kept.append(line[:(MAX_LINES - used) * LINE_CHARS])
            return "\n".join(kept) + " …"
        kept.append(line)
        used += need
    return "\n".join(kept) + ("…" if len(text) > limit else "")


def html_table(rows: Iterable[Sequence], header: Sequence[str] = (), limit: int | None = None) -> str:
    head = "<tr>" + "".join(f"<th style='text-align:left'>{cell(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{cell(v, limit)}</td>" for v in r) + "</tr>"
                   for r in rows)
    return f"<table>{head}{body}</table>"


def html_pairs(pairs: Iterable[tuple]) -> str:
    """A two-column table of ``(name, value)`` rows, names as row headers."""
    body = "".join(f"<tr><th style='text-align:left'>{cell(k)}</th><td style='text-align:left'>{cell(v)}</td></tr>"
                   for k, v in pairs)
    return f"<table>{body}</table>"


def text_pairs(pairs: Sequence[tuple], indent: str = "") -> list[str]:
    """``(name, value)`` rows as aligned text lines."""
    width = max((len(str(k)) for k, _ in pairs), default=0)
    return [f"{indent}{str(k):<{width}}  {v}" for k, v in pairs]


class Table:
    """Subclasses give ``COLUMNS``, ``rows()``, and optionally ``title()`` and ``empty()``.

    A dataclass subclass needs ``repr=False``: IPython prefers a class's own ``__repr__``.
    """

    COLUMNS: tuple[str, ...] = ()

    def rows(self) -> list[tuple]:
        raise NotImplementedError

    def title(self) -> str:
        return ""

    def empty(self) -> str:
        return "nothing to show"

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return self.empty()
        table = [self.COLUMNS, *[tuple(map(str, r)) for r in rows]]
        widths = [max(len(r[i]) for r in table) for i in range(len(self.COLUMNS))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
        return "\n".join(([self.title()] if self.title() else []) + lines)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        rows = self.rows()
        if not rows:
            return f"<p>{html.escape(self.empty())}</p>"
        title = f"<p>{html.escape(self.title())}</p>" if self.title() else ""
        return title + html_table(rows, self.COLUMNS)
