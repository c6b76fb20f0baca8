"""Prompt text: ``{name}`` interpolation and splitting a cell into a batch."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError

_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{name}`` (or ``{obj.attr}``) with the variable's value.

    Unknown names and anything else in braces (JSON, code) stay as written;
    ``{{`` and ``}}`` give literal braces.
    """

    def sub(m: re.Match) -> str:
        token = m.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        head, *attrs = m.group(1).split(".")
        if head not in namespace:
            return token
        value = namespace[head]
        for attr in attrs:
            if not hasattr(value, attr):
                return token
            value = getattr(value, attr)
        return str(value)

    return _FIELD.sub(sub, text)


def split(text: str, mode: str | None) -> list[str]:
    """One prompt, or a batch: ``lines`` (each non-empty line) or ``blank`` (blank-line blocks)."""
    if mode in (None, "none"):
        return [text]
    if mode == "lines":
        parts = [ln.strip() for ln in text.splitlines()]
    elif mode == "blank":
        parts = [blk.strip() for blk in re.split(r"\n\s*\n", text)]
    else:
        raise UsageError(f"--split takes 'lines' or 'blank', not {mode!r}")
    return [p for p in parts if p]


def prompts_from_value(value: Any, name: str) -> list[str]:
    """A str, or a list/tuple/Series of str, from the user's namespace."""
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist") and not isinstance(value, list | tuple):
        value = value.tolist()
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list | tuple) and not value:
        raise UsageError(f"{name} is empty: nothing to generate")
    raise UsageError(f"{name} must be a str or a list of str, not {type(value).__name__}")


def prompts_from_rows(value: Any, template: str, name: str) -> list[str]:
    """One prompt per row of a DataFrame (or a list of dicts): ``template`` filled with the row's columns."""
    if hasattr(value, "to_dict") and hasattr(value, "columns"):
        rows, columns = value.to_dict("records"), [str(c) for c in value.columns]
    elif isinstance(value, list | tuple) and all(isinstance(r, dict) for r in value):
        rows, columns = list(value), sorted({str(k) for r in value for k in r})
    else:
        raise UsageError(f"--template needs -i to name a DataFrame (or a list of dicts); {name} is a "
                         f"{type(value).__name__}")
    if not rows:
        raise UsageError(f"{name} is empty: nothing to generate")
    out = []
    for row in rows:
        try:
            out.append(template.format_map({str(k): v for k, v in row.items()}))
        except KeyError as exc:
            raise UsageError(f"--template uses {{{exc.args[0]}}}, which is not a column of {name} "
                             f"(columns: {', '.join(columns)})") from None
        except (ValueError, IndexError) as exc:
            raise UsageError(f"--template: {exc} (write {{{{ and }}}} for literal braces)") from None
    return out
