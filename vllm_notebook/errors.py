"""Every error a user (or a script) can act on, each message written once.

IPython calls ``_render_traceback_`` when an exception escapes a cell; returning a
single line keeps user mistakes readable. Internal bugs are ordinary exceptions
and keep their full traceback. Scripts catch the classes below:

    try:
        eng = vllm_notebook.attach(url, api_key_file=key)
    except vllm_notebook.errors.ServerUnreachableError:
        ...
"""

from __future__ import annotations


class VllmNotebookError(Exception):
    """Base class of every error a user can fix. ``str(err)`` says what to do."""

    def _render_traceback_(self) -> list[str]:
        # The name in bold, not red: JupyterLab's ANSI red on its error background is 2.7:1 (under WCAG's 4.5:1),
        # and the background already says "error".
        return [f"\x1b[1m{type(self).__name__}\x1b[0m: {self}"]


class UsageError(VllmNotebookError):
    """Bad flags or arguments."""


class NoEngineError(VllmNotebookError):
    """No engine is loaded under the requested name (or it was unloaded)."""


class ModelNotFoundError(VllmNotebookError):
    """The model path or name cannot be resolved."""


class EngineStartError(VllmNotebookError):
    """The engine (or server) failed to start; the message carries the root cause from its log."""


class EngineDiedError(VllmNotebookError):
    """The engine's process (or the server) is gone."""


class RequestError(VllmNotebookError):
    """The engine rejected a request (prompt too long, invalid schema, ...)."""


class ServerUnreachableError(VllmNotebookError):
    """Nothing answers HTTP at a server's address."""

    def __init__(self, url: str, reason: object = ""):
        super().__init__(f"cannot reach a vLLM server at {url} ({reason})" if reason else
                         f"cannot reach a vLLM server at {url}")
        self.url = url


class AuthRefusedError(VllmNotebookError):
    """A server refused the API key (401)."""

    def __init__(self, url: str):
        super().__init__(f"the server at {url} refused the API key (401 Unauthorized): "
                         "give the right one with --api-key-file FILE")
        self.url = url


class ServerError(VllmNotebookError):
    """Something about a registered server (not found, on another node, unreadable key or registry)."""


class UnsafePathError(VllmNotebookError):
    """A folder or file that another user of this machine could read or replace (made by them, a link, or open
    to the group or others): refused, since what vLLM or torch put there could be read, forged or run."""


class SecretOnLineError(UsageError):
    """A token or key typed on a magic's line: refused (it would show in ``ps``, logs and the registry). ``secret``
    is the value typed, so the magic can remove it from IPython's history."""

    def __init__(self, message: str, secret: str = ""):
        super().__init__(message)
        self.secret = secret
