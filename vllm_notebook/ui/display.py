"""Outputs that update in place: a display handle in a kernel, plain lines in a terminal."""

from __future__ import annotations

import sys
import time


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
        self._tty = sys.stderr.isatty()
        self._handle = None
        self._last = ""
        self._last_key = None

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
            sys.stderr.write("\r\x1b[2K" + text if self._tty else text + "\n")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        self.update(text)
        if self.enabled and not self._kernel and self._tty:
            sys.stderr.write("\n")


class TextStream:
    """Streamed text of one completion, at most ``max_hz`` screen updates a second."""

    def __init__(self, max_hz: float = 20.0):
        self._kernel = in_kernel()
        self._interval = 1.0 / max_hz if max_hz > 0 else 0.0
        self._next = 0.0
        self._shown = 0
        self._text = ""
        self.updates = 0
        self._handle = None
        if self._kernel:
            from IPython.display import display

            self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def update(self, text: str) -> None:
        self._text = text
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            self._flush()

    def _flush(self) -> None:
        if len(self._text) == self._shown:
            return
        self.updates += 1
        if self._handle is not None:
            self._handle.update({"text/plain": self._text}, raw=True)
        else:
            sys.stdout.write(self._text[self._shown:])
            sys.stdout.flush()
        self._shown = len(self._text)

    def attach(self, gen) -> None:
        """Hand the output area to the result, which renders its final form there."""
        self._flush()
        if self._handle is not None:
            gen._live = self._handle
        else:
            gen._printed = True
