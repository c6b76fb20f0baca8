"""``Table``: results shown as a table, as text in a terminal and as HTML in a notebook."""

from __future__ import annotations

import html


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
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(v))}</td>" for v in r)
                       + "</tr>" for r in rows)
        title = f"<p>{html.escape(self.title())}</p>" if self.title() else ""
        return f"{title}<table><tr>{head}</tr>{body}</table>"
