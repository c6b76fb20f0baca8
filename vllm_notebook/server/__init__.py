"""vLLM servers that outlive the kernel (``%vllm_load --server``), public as ``vllm_notebook.servers``.

- ``registry``: the per-user record of servers and their API key files;
- ``process``: starting and stopping ``vllm serve`` processes;
- ``http``: plain HTTP to a server (health, JSON endpoints, metrics);
- ``guard``: the middleware that asks for the key on every path;
- ``client``: ``ServerEngine``, the engine protocol over HTTP;
- ``launch``: a prepared load started as a server, or found again.
"""

from __future__ import annotations

from .process import start, stop, wait_ready
from .registry import ServerRecord, find, home, listing, lookup, normalize, read_key, records, update

__all__ = ["ServerRecord", "find", "home", "listing", "lookup", "normalize", "read_key", "records", "start",
           "stop", "update", "wait_ready"]
