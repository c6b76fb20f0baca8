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


class BatchBar:
    """A batch's progress bar (``tqdm.auto``: a widget in a notebook, a text bar in a terminal) in output tokens,
    with the prompts done beside it, drawn at once and moved about five times a second while tokens flow
    (``Engine.run``'s ``on_progress``). Its end is an estimate: the tokens of the prompts done plus ``max_tokens``
    for each prompt still running, so it reaches the end when the last prompt does, early stops or not."""

    def __init__(self, name: str, prompts: int, max_tokens: int | None, n: int = 1):
        self._name, self._prompts = name, prompts
        self._each = max_tokens * n if max_tokens else None
        self.bar = None  # made at the first tick past ``DELAY_S``: a batch done in a blink makes no widget at all

    #: A batch that ends sooner shows no bar. The bar is made while the batch runs, not before it: a widget is
    #: a few comm messages (~13 ms in a kernel), which a 0.3 s batch on a GPU would otherwise wait for.
    DELAY_S = 0.1

    def _make(self):
        from tqdm.auto import tqdm

        total = self._prompts * self._each if self._each else None
        self.bar = tqdm(total=total, desc=f"generating ({self._name})", unit=" tok", leave=False,
                        dynamic_ncols=True, smoothing=0.3, mininterval=0.1)
        self.bar.set_postfix_str(f"0/{self._prompts:,} prompts", refresh=False)
        return self.bar

    def __call__(self, p) -> None:
        bar = self.bar
        if bar is None:
            if p.final or p.elapsed < self.DELAY_S:
                return
            bar = self._make()
        if self._each:
            total = max(p.done_tokens + (p.prompts - p.done) * self._each, p.tokens, 1)
            if total != bar.total:
                bar.total = total
                widget = getattr(bar, "container", None)
                if widget is not None:  # tqdm.notebook's bar keeps its own maximum
                    widget.children[1].max = total
        bar.set_postfix_str(f"{p.done:,}/{p.prompts:,} prompts", refresh=False)
        bar.update(p.tokens - bar.n)  # draws (once ``delay`` has passed), at most every ``mininterval``

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
