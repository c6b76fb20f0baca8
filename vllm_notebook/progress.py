"""A line of progress that updates in place: a display handle in a kernel, one rewritten line on a terminal,
plain lines in a log. Used by every layer that starts something slow (loads, servers, jobs)."""

from __future__ import annotations

import sys
import time


#: Where terminal lines go while fds 1 and 2 point at an engine's log (``logs.capture_output``): the terminal.
terminal = None


def _stderr():
    return terminal if terminal is not None else sys.stderr


def in_kernel() -> bool:
    """True in a Jupyter kernel (display updates work), False in terminal IPython or a script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


class LiveLine:
    """One line of status that is replaced on every update."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._kernel = enabled and in_kernel()
        self._tty = _stderr().isatty()
        self._handle = None
        self._last = ""
        self._last_key = None
        self.started = time.monotonic()
        self.notes: dict[str, float] = {}  # what the final line reports (e.g. the import's seconds)

    def elapsed(self) -> float:
        """Seconds since the line was made (the start of the operation it reports)."""
        return time.monotonic() - self.started

    def update(self, text: str, key: str | None = None) -> None:
        """Show ``text``; where lines cannot be rewritten, only when ``key`` (e.g. the phase) changes."""
        if not self.enabled or text == self._last:
            return
        if not self._kernel and not self._tty and key is not None and key == self._last_key:
            return
        self._last, self._last_key = text, key
        if self._kernel:
            from IPython.display import display

            data = {"text/plain": text}
            if self._handle is None:
                self._handle = display(data, raw=True, display_id=True)
            else:
                self._handle.update(data, raw=True)
        else:
            out = _stderr()
            out.write("\r\x1b[2K" + text if self._tty else text + "\n")
            out.flush()

    def done(self, text: str) -> None:
        self.update(text)
        if self.enabled and not self._kernel and self._tty:
            _stderr().write("\n")
