"""Streamed text that updates in place: a display handle in a kernel, plain text in a terminal."""

from __future__ import annotations

import sys
import time
import weakref

from ..progress import in_kernel

#: A result -> the display handle it streamed into (True: it streamed to a terminal), until it is shown
#: (``render.show`` takes it). Kept here, not on the result: the engine layer holds no display state.
_streamed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def streamed_into(gen):
    """Where ``gen`` streamed (a display handle, True for a terminal, None), forgotten once asked."""
    return _streamed.pop(gen, None)


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
        _streamed[gen] = self._handle if self._handle is not None else True
