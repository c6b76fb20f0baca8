"""vLLM servers that outlive the kernel (``%vllm_load --server``), public as ``vllm_notebook.servers``.

- ``record``: a server's record, the per-user store of them of servers and their API key files;
- ``process``: starting and stopping ``vllm serve`` processes;
- ``http``: plain HTTP to a server (health, JSON endpoints, metrics);
- ``guard``: the middleware that asks for the key on every path.

The engine over a server is ``backends/server.py`` (``ServerBackend``); over a Slurm job, ``backends/slurm.py``
(the job itself: ``backends/slurm_job.py``).
"""

from __future__ import annotations

from .process import start, stop, wait_ready
from .record import (
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
