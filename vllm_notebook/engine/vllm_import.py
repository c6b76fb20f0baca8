"""Importing vLLM, once, on the first load (or in the background from ``%load_ext``, when configured): its
import-time chatter goes to a session log, never a cell."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from .. import logs, paths, private
from ..errors import VllmNotebookError
from .journal import ON_WORDS

_API = "vllm_notebook.engine.vllm_api"
_preload: threading.Thread | None = None
_imported = threading.Event()  # set when the background import has ended (done or failed)


def vllm_api(waiting=None):
    """``engine/vllm_api.py`` (which imports vLLM and torch), imported with its output sent to a session log.

    The import runs in a thread of its own and this one waits for it: Ctrl-C during the ~10 s import stops the
    wait, in one line, not the import. An import cut by KeyboardInterrupt would leave half-initialised modules
    in ``sys.modules`` (seen: ``partially initialized module 'ray' has no attribute '_private'`` at the next
    load), and nothing but a kernel restart mends that; this way the next ``%vllm_load`` finds it done.
    ``waiting(seconds, done)`` is called every 0.1 s of the wait, and once at its end (a progress line).
    """
    if _API in sys.modules and not preloading():
        return sys.modules[_API]
    t0 = time.monotonic()
    if waiting is not None:  # before the import starts: loading torch's libraries holds the GIL for seconds
        waiting(0.0, False)
    preload()
    try:
        while preloading():
            _imported.wait(0.1)  # not Thread.join: interrupted, it can mark the thread stopped while it runs
            if waiting is not None:
                waiting(time.monotonic() - t0, False)
        if waiting is not None:
            waiting(time.monotonic() - t0, True)
    except KeyboardInterrupt:
        raise VllmNotebookError("interrupted while vLLM was being imported (it goes on in the background, "
                                "~10 s): run the line again") from None
    if _API in sys.modules:
        return sys.modules[_API]
    _environment()  # the import in the thread failed (its log says why): again here, to raise its error
    path = _log_path()
    with logs.capture_output(path):
        from . import vllm_api as api

        logs.route_vllm_logs(path, api.vllm_loggers())
    return api


def preload() -> bool:
    """Start importing vLLM and torch in a background thread, so that a later ``%vllm_load`` skips the
    ~10 s import (``%config VllmMagics.preload = True``, or ``$VLLM_NOTEBOOK_PRELOAD=1`` at ``%load_ext``).
    What the import prints goes to the session log; the notebook's own output is untouched. False when
    vLLM is imported already (or being imported)."""
    global _preload
    if preloading() or _API in sys.modules:
        return False
    _environment()
    _imported.clear()
    _preload = threading.Thread(target=_import_quietly, name="vllm-notebook:preload", daemon=True)
    _preload.start()
    return True


def preload_by_environment() -> bool:
    """True when ``$VLLM_NOTEBOOK_PRELOAD`` asks for the background import."""
    return os.environ.get("VLLM_NOTEBOOK_PRELOAD", "").strip().lower() in ON_WORDS


def preloading() -> bool:
    """True while a background import runs."""
    return _preload is not None and not _imported.is_set()


def _import_quietly() -> None:
    try:
        _import_logged()
    finally:
        _imported.set()


def _import_logged() -> None:
    path = _log_path()
    me = threading.current_thread()
    with open(path, "a", buffering=1) as log:
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = (_ThreadOutput(s, log, me) for s in streams)
        try:
            from . import vllm_api as api

            logs.route_vllm_logs(path, api.vllm_loggers())
        except BaseException as exc:  # noqa: BLE001 - told in the log; %vllm_load imports again and says why
            print(f"vllm-notebook: importing vLLM in the background failed: {exc!r}", file=log)
        finally:
            for name, own in zip(("stdout", "stderr"), streams):
                if isinstance(getattr(sys, name), _ThreadOutput):  # unless something replaced it since
                    setattr(sys, name, own)


class _ThreadOutput:
    """``sys.stdout`` or ``sys.stderr`` during a background import: the import thread's writes go to the log,
    every other thread's where they always went."""

    def __init__(self, own, log, thread: threading.Thread):
        self._own, self._log, self._thread = own, log, thread

    def write(self, text: str) -> int:
        if threading.current_thread() is self._thread and not self._log.closed:
            return self._log.write(text)
        return self._own.write(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._own.flush()

    def __getattr__(self, name: str):
        return getattr(self._own, name)


def _environment() -> None:
    # Before torch and vLLM fix their temp folders (torch inductor's at import): ours, private to the user.
    private.protect_process()
    # Log files are read by people and by root_cause(): no colour codes. Compute nodes
    # are usually offline: do not try to send usage statistics.
    os.environ.setdefault("VLLM_LOGGING_COLOR", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def _log_path():
    return paths.log_dir() / f"session-{os.getpid()}.log"
