"""Importing vLLM, once, on the first load: its import-time chatter goes to a session log, never a cell."""

from __future__ import annotations

import os
import sys

from .. import logs, paths


def vllm_api():
    """``engine/vllm_api.py`` (which imports vLLM and torch), imported with its output sent to a session log."""
    if "vllm_notebook.engine.vllm_api" in sys.modules:
        return sys.modules["vllm_notebook.engine.vllm_api"]
    # Log files are read by people and by root_cause(): no colour codes. Compute nodes
    # are usually offline: do not try to send usage statistics.
    os.environ.setdefault("VLLM_LOGGING_COLOR", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    path = paths.log_dir() / f"session-{os.getpid()}.log"
    with logs.capture_output(path):
        from . import vllm_api as api

        logs.route_vllm_logs(path, api.vllm_loggers())
    return api
