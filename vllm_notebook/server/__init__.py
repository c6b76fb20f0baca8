"""vLLM servers that outlive the kernel (``%vllm_load --server``), public as ``vllm_notebook.servers``.

- ``registry``: the per-user record of servers and their API key files;
- ``process``: starting and stopping ``vllm serve`` processes;
- ``http``: plain HTTP to a server (health, JSON endpoints, metrics);
- ``guard``: the middleware that asks for the key on every path;
- ``slurm_job``: a server as a Slurm batch job: its record, script, submission, state and cancellation.

The engine over a server is ``backends/server.py`` (``ServerBackend``); over a job, ``backends/slurm.py``.
"""

from __future__ import annotations

from .process import start, stop, wait_ready
from .registry import (
           ServerRecord,
           find,
           home,
           listing,
           lookup,
           normalize,
           read_key,
           records,
           update,
)

__all__ = ["ServerRecord", "find", "home", "listing", "lookup", "normalize", "read_key", "records", "start",
           "stop", "update", "wait_ready"]
