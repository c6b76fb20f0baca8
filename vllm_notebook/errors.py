"""Errors that users cause, shown as one line instead of a traceback.

IPython calls ``_render_traceback_`` when an exception escapes a cell; returning a
single line keeps user mistakes readable. Internal bugs are ordinary exceptions
and keep their full traceback.
"""

from __future__ import annotations


class VllmNotebookError(Exception):
    """Base class of every error a user can fix. ``str(err)`` says what to do."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class UsageError(VllmNotebookError):
    """Bad flags or arguments."""


class NoEngineError(VllmNotebookError):
    """No engine is loaded under the requested name."""


class ModelNotFoundError(VllmNotebookError):
    """The model path or name cannot be resolved."""


class EngineStartError(VllmNotebookError):
    """The engine failed to start; the message carries the root cause from its log."""


class EngineDiedError(VllmNotebookError):
    """The engine's process is gone."""


class RequestError(VllmNotebookError):
    """The engine rejected a request (prompt too long, invalid schema, ...)."""
