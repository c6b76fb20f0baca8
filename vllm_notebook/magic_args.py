"""How our magics read their line: shell-quoted words, ``{name}`` filled per word, one-line errors.

Shared by ``magics.py`` and ``task_magics.py``.
"""

from __future__ import annotations

import difflib
import shlex

from IPython.core.error import UsageError as IPythonUsageError

from .engine.prompts import interpolate
from .errors import UsageError


#: Flags whose value is itself a template, filled per row (``--template "The capital of {country} is"``):
#: their ``{column}`` fields are kept for the rows, never filled from the notebook's variables.
VERBATIM = ("--template",)


def line_words(name: str, line: str, namespace) -> list[str]:
    """A magic's line as typed, split with shell quoting; then ``{name}`` in each word is replaced.

    IPython's own expansion (``{...}`` and ``$name`` on the whole line) is off for our magics
    (``@no_var_expand``): it rewrote regexes such as ``\\d{2,4}`` and let a value add flags. Here a
    value fills one word only, and a value that would read as a flag is refused. The values of
    ``VERBATIM`` flags are left as typed.
    """
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%{name}: {exc}") from None
    argv = []
    for k, word in enumerate(words):
        if ("=" in word and word.split("=", 1)[0] in VERBATIM) or (k > 0 and words[k - 1] in VERBATIM):
            argv.append(word)
            continue
        value = interpolate(word, namespace)
        if value != word and value.startswith("-") and not word.startswith("-"):
            raise UsageError(f"%{name}: {word} gives {value!r}, which would read as a flag; "
                             "write the flag itself on the line")
        argv.append(value)
    return argv


def parse_line(magic, line: str, namespace):
    """Parse a magic's line (see ``_argv``), with a "did you mean" for mistyped flags."""
    argv = line_words(magic.__name__, line, namespace)
    try:
        return magic.parser.parse_args(argv)
    except IPythonUsageError as exc:
        msg = str(exc)
        name = magic.__name__
        if "unrecognized arguments" in msg:
            known = [o for a in magic.parser._actions for o in a.option_strings]
            for word in line.split():
                flag = word.split("=")[0]
                if flag.startswith("-") and flag not in known:
                    near = difflib.get_close_matches(flag, known, n=1)
                    tip = f" (did you mean {near[0]}?)" if near else ""
                    raise UsageError(f"%{name}: unknown flag {flag}{tip}; see %{name}? for every flag") from None
        raise UsageError(f"%{name}: {msg}; see %{name}? for every flag") from None


def value_of(shell, expr: str):
    """A variable, or an expression over variables (``df.prompt``, ``rows[:10]``), for ``-i`` and the like."""
    ns = shell.user_ns
    if expr in ns:
        return ns[expr]
    if expr.isidentifier():
        raise UsageError(f"no variable named {expr!r}")
    try:
        return shell.ev(expr)
    except Exception as exc:  # noqa: BLE001 - the user's expression: one line
        raise UsageError(f"{expr}: {type(exc).__name__}: {exc}") from None


SECRET_MASK = "<secret removed>"


def forget_secret(shell, secret: str) -> bool:
    """Remove ``secret`` (a token typed on a magic's line) from IPython's history: ``In``, ``_i``/``_iN``, the
    lines not yet written and ``history.sqlite``. True when it was found somewhere."""
    if len(secret) < 4:  # too short to be a token; replacing it would mangle unrelated history
        return False
    found = False
    hm = shell.history_manager
    for lines in (hm.input_hist_parsed, hm.input_hist_raw):
        for i, src in enumerate(lines):
            if secret in src:
                lines[i], found = src.replace(secret, SECRET_MASK), True
    for attr in ("_i00", "_i", "_ii", "_iii"):  # the next cell copies these into _i, _ii, _iii
        value = getattr(hm, attr, None)
        if isinstance(value, str) and secret in value:
            setattr(hm, attr, value.replace(secret, SECRET_MASK))
    ns = shell.user_ns
    for name in [n for n in ns if n in ("_i", "_ii", "_iii") or (n.startswith("_i") and n[2:].isdigit())]:
        if isinstance(ns[name], str) and secret in ns[name]:
            ns[name] = ns[name].replace(secret, SECRET_MASK)
    with hm.db_input_cache_lock:  # the saving thread writes the cache under this lock: nothing slips past
        hm.db_input_cache = [tuple(v.replace(secret, SECRET_MASK) if isinstance(v, str) else v for v in row)
                             for row in hm.db_input_cache]
        db = getattr(hm, "db", None)
        if getattr(hm, "enabled", False) and db is not None:
            try:
                with db:
                    cur = db.execute("UPDATE history SET source = replace(source, ?1, ?2), "
                                     "source_raw = replace(source_raw, ?1, ?2) "
                                     "WHERE instr(source, ?1) > 0 OR instr(source_raw, ?1) > 0", (secret, SECRET_MASK))
                    found = found or cur.rowcount > 0
            except Exception:  # noqa: BLE001 - a locked or read-only history: the message still says to revoke
                pass
    return found
