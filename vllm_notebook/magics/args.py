"""How our magics read their line: shell-quoted words, ``{name}`` filled per word, one-line errors.

Shared by every topic's magics (``magics/*.py``).
"""

from __future__ import annotations

import difflib
import json
import re
import shlex

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic_arguments import argument

from ..engine.prompts import interpolate
from ..errors import UsageError

#: ``--name``: the engine a magic acts on.
engine_name = argument("--name", help="engine (default: the only one, or 'default')")


#: Flags whose value is itself a template, filled per row (``--template "The capital of {country} is"``):
#: their ``{column}`` fields are kept for the rows, never filled from the notebook's variables.
VERBATIM = ("--template",)


def line_words(name: str, line: str, namespace) -> list[str]:
    """A magic's line as typed, split into words; then ``$name`` and ``{name}`` in each word are replaced.

    IPython's own expansion of the whole line is off for our magics (``@no_var_expand``): it rewrote regexes
    such as ``\\d{2,4}`` and JSON, and let a value add flags. Here, per word and with IPython's rules, ``$name``,
    ``${name}`` and ``{name}`` (or ``{obj.attr}``) give a variable's value and ``$$``, ``{{``, ``}}`` literal
    characters; unknown names and a word that is JSON stay as written. A value fills one word only, and a
    value that would read as a flag is refused. The values of ``VERBATIM`` flags are left as typed.

    Words are split with shell quoting, except that a bracket (``[``, ``(``, ``{``) runs to the one that closes
    it, quotes and spaces inside kept (``-i ['a', 'b']``, ``-i f(a, b)``, inline JSON). A ``#`` that begins a word
    (outside quotes) begins a comment, as in Python. A trailing ``;`` means what it means in IPython: no displayed
    result for the cell.
    """
    line = _quiet_if_semicolon(line)
    words = split_words(name, line)
    argv = []
    for k, word in enumerate(words):
        if ("=" in word and word.split("=", 1)[0] in VERBATIM) or (k > 0 and words[k - 1] in VERBATIM):
            argv.append(word)
            continue
        value = expand(word, namespace)
        if value != word and value.startswith("-") and not word.startswith("-"):
            raise UsageError(f"%{name}: {word} gives {value!r}, which would read as a flag; "
                             "write the flag itself on the line")
        argv.append(value)
    return argv


_DOLLAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)")


def expand(word: str, namespace) -> str:
    """``$name``/``${name}``/``$$`` and ``{name}``/``{{``/``}}`` in one word (IPython's rules); JSON as typed."""
    if word[:1] in "[{" and _is_json(word):
        return word

    def dollar(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        key = m.group(1) or m.group(2)
        return str(namespace[key]) if key in namespace else m.group(0)

    return interpolate(_DOLLAR.sub(dollar, word), namespace)


def _is_json(word: str) -> bool:
    try:
        json.loads(word)
    except ValueError:
        return False
    return True


_CLOSE = {"[": "]", "(": ")", "{": "}"}


def split_words(name: str, line: str) -> list[str]:
    """Shell-quoted words, with bracketed words kept whole (see ``line_words``)."""
    spans: list[str] = []
    kept, i, quote = [], 0, ""
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                kept.append(line[i:i + 2])
                i += 2
                continue
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):  # a comment, as in Python: the rest of the line
            break
        elif c in _CLOSE and (end := _closing(line, i)) is not None:
            while end < len(line) and not line[end].isspace():
                end += 1
            kept.append(f"\0{len(spans)}\0")
            spans.append(line[i:end])
            i = end
            continue
        kept.append(c)
        i += 1
    try:
        words = shlex.split("".join(kept))
    except ValueError as exc:
        raise UsageError(f"%{name}: {exc}") from None
    return [re.sub(r"\0(\d+)\0", lambda m: spans[int(m.group(1))], w) for w in words]


def _closing(line: str, start: int) -> int | None:
    """The index after the bracket that closes the one at ``start`` (Python strings skipped); None if none."""
    depth, i, quote = 0, start, ""
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _quiet_if_semicolon(line: str) -> str:
    """A line ending in ``;``: the ``;`` off, and the cell's result not displayed (IPython's habit)."""
    stripped = line.rstrip()
    if not stripped.endswith(";") or stripped.endswith("\\;"):
        return line
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        quiet_this_cell(shell)
    return stripped[:-1]


def quiet_this_cell(shell) -> None:
    """No displayed result for the cell now running (as a trailing ``;`` gives in IPython)."""
    hook = shell.displayhook
    if "quiet" in vars(hook):
        return
    hook.quiet = lambda: True

    def restore(*_args) -> None:
        vars(hook).pop("quiet", None)
        shell.events.unregister("post_run_cell", restore)

    shell.events.register("post_run_cell", restore)


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
