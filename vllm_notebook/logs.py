"""Per-engine log files: vLLM's output goes there, never into cells.

While an engine starts, file descriptors 1 and 2 point at its log, so the engine
processes it spawns write there for their whole life. In this process the
``vllm`` logger is routed to the log of the most recently started engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path

from . import paths, progress

_PREFIX = re.compile(r"^\((?:[\w-]+) pid=\d+\)\s*")
_EXC = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")
_GENERIC = re.compile(
    r"Engine core initialization failed|See root cause above|EngineGenerateError|"
    r"Worker failed with error|WorkerProc initialization failed|^$"
)
_DIED = re.compile(r"\S+ died unexpectedly \(exit code: -?\d+\)")
# Log markers of the start phases, in the order vLLM goes through them. A line names a phase only by a message
# vLLM prints when it gets there (not by words of the config dump, such as ``compilation_config``), and the phase
# never goes back: a later marker that shows up in an older line cannot move the line backwards.
PHASES = [
    (re.compile(r"Initializing a V1 LLM engine|EngineCore|Waiting for init message"), "starting engine"),
    (re.compile(r"Starting to load model|Loading weights|Loading safetensors"), "loading weights"),
    (re.compile(r"torch\.compile takes|Compiling a graph|Dynamo bytecode transform|Memory profiling takes"),
     "compiling and profiling"),
    (re.compile(r"KV cache size|Available KV cache memory"), "allocating KV cache"),
    (re.compile(r"Capturing CUDA graph|Graph capturing finished"), "capturing CUDA graphs"),
    (re.compile(r"init engine \(profile|Starting vLLM API server|Application startup complete"), "finishing"),
]
_ORDER = {name: i for i, (_, name) in enumerate(PHASES)}


def new_log_path(name: str) -> Path:
    safe = re.sub(r"[^\w.-]", "_", name)
    return paths.log_dir() / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def tail(path: str | os.PathLike, n: int = 40) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [ln.rstrip("\n") for ln in deque(f, maxlen=n)]
    except FileNotFoundError:
        return []


def phase_of(text: str, current: str) -> str:
    """The latest start phase ``text`` (a log's tail) shows, never one before ``current``."""
    at = _ORDER.get(current, -1)
    for i, (pattern, name) in enumerate(PHASES):
        if i > at and pattern.search(text):
            at, current = i, name
    return current


def root_cause(path: str | os.PathLike | None, exc: BaseException | None = None, limit: int = 3) -> list[str]:
    """The lines that explain a failure: the innermost exception messages in the log."""
    found: list[str] = []
    lines = tail(path, 400) if path else []
    for i, raw in enumerate(lines):
        line = _PREFIX.sub("", raw.strip())
        if _PYDANTIC.search(line) and i + 1 < len(lines):  # the message is on the next line
            detail = pydantic_detail(lines[i + 1])
            if detail and detail not in found:
                found.append(detail)
            continue
        died = _DIED.search(line)
        if died and died.group(0) not in found:
            found.append(died.group(0))
            continue
        m = _EXC.match(line)
        if m and m.group(2) is not None and not _GENERIC.search(line):
            if line not in found:
                found.append(line)
    chain = []
    while exc is not None:
        text = _describe(exc)
        if not _GENERIC.search(text) and str(exc).strip():
            chain.append(text)
        exc = exc.__cause__ or exc.__context__
    for text in reversed(chain):
        if text not in found:
            found.append(text)
    return found[-limit:]


_PYDANTIC = re.compile(r"ValidationError: \d+ validation errors? for \w+")


def pydantic_detail(line: str) -> str:
    """``  Value error, X is wrong. More. [type=...]`` -> ``invalid engine arguments: X is wrong.``"""
    text = re.sub(r"\s*\[type=.*$", "", line.strip()).removeprefix("Value error, ")
    first = re.match(r"(.+?\.)(\s|$)", text)
    return f"invalid engine arguments: {(first.group(1) if first else text)[:300]}" if text else ""


def _describe(exc: BaseException) -> str:
    """One line for an exception; pydantic validation errors list their fields' messages."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors()
            return "invalid engine arguments: " + "; ".join(
                " ".join(str(e.get("msg", "")).split()) for e in items
            )
        except Exception:  # noqa: BLE001 - fall back to the plain message
            pass
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


class _Router(logging.Handler):
    """Writes ``vllm`` log records to the current engine's log file."""

    def __init__(self) -> None:
        super().__init__()
        self._file = None
        self._path: str | None = None

    def set_target(self, path: str | os.PathLike) -> None:
        with self.lock:
            if str(path) != self._path:
                if self._file:
                    self._file.close()
                self._path = str(path)
                self._file = open(path, "a", buffering=1)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            with self.lock:
                if self._file:
                    self._file.write(msg + "\n")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


_router = _Router()
_capture_lock = threading.Lock()


def route_vllm_logs(path: str | os.PathLike, loggers: list[logging.Logger]) -> None:
    """Send every ``vllm`` record of this process to ``path``, keeping vLLM's format."""
    _router.set_target(path)
    for lg in loggers:
        for h in list(lg.handlers):
            if h is not _router:
                if h.formatter is not None and _router.formatter is None:
                    _router.setFormatter(h.formatter)
                lg.removeHandler(h)
        if _router not in lg.handlers:
            lg.addHandler(_router)
        lg.propagate = False


@contextlib.contextmanager
def capture_output(path: str | os.PathLike):
    """Point fds 1 and 2 (and sys.stdout/err) at ``path`` while the block runs.

    Processes started inside the block keep writing to the log afterwards.
    """
    with _capture_lock:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        log = open(path, "a", buffering=1)
        saved = (os.dup(1), os.dup(2))
        old_streams = sys.stdout, sys.stderr
        old_terminal = progress.terminal
        progress.terminal = open(os.dup(saved[1]), "w", buffering=1, errors="replace")
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = sys.stderr = log
            yield log
        finally:
            sys.stdout, sys.stderr = old_streams
            with contextlib.suppress(OSError):
                progress.terminal.close()
            progress.terminal = old_terminal
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            log.close()
