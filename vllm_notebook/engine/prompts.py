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
