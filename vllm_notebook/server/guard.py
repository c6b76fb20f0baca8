"""ASGI middleware for the servers vllm-notebook starts: the API key on every path.

vLLM's own check guards only ``/v1``-style paths; ``/health``, ``/metrics``,
``/tokenize``, ``/invocations`` and, with ``VLLM_SERVER_DEV_MODE=1`` (needed for
sleep mode), ``/sleep``, ``/wake_up`` and ``/collective_rpc`` answer anyone who
reaches the port: on a shared node, every other user. ``servers.start`` passes
``--middleware vllm_notebook.server.guard.RequireKey``; the key is read from the
server's environment (``VLLM_API_KEY``), where it already is. Standard library only:
this runs inside the server process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os


class RequireKey:
    """Refuse (401) every HTTP or websocket request without ``Authorization: Bearer <key>``."""

    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _allowed(self, scope) -> bool:
        if self._digest is None:  # no key configured: nothing to enforce
            return True
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    hashlib.sha256(token.strip().encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": "Unauthorized", "type": "invalid_request_error"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
