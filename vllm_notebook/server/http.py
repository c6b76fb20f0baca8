"""Plain HTTP to a vLLM server (standard library): health, JSON endpoints, Prometheus metrics, error text.

Requests never go through a proxy: a cluster's ``HTTP(S)_PROXY`` must not capture
traffic to a node-local server. Servers vllm-notebook starts want the API key on
every path, so every helper takes it.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from typing import Any

from ..errors import AuthRefusedError, RequestError, ServerUnreachableError

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def auth_header(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def healthy(url: str, timeout: float = 2.0, api_key: str | None = None) -> bool:
    """The server answers ``/health`` with 200 (servers we start want the key on every path)."""
    try:
        with _NO_PROXY.open(urllib.request.Request(f"{url}/health", headers=auth_header(api_key)), timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError, http.client.HTTPException):
        return False


def get_json(url: str, path: str, api_key: str | None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(f"{url}{path}", headers=auth_header(api_key))
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise AuthRefusedError(url) from None
        raise RequestError(f"the server at {url} answered {exc.code} to {path}: {error_message(exc.read())}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # HTTPException: the port speaks no HTTP
        raise ServerUnreachableError(url, getattr(exc, "reason", exc)) from None


def metrics(url: str, timeout: float = 2.0, api_key: str | None = None) -> dict[str, float]:
    """KV-cache use and queue lengths from the server's Prometheus ``/metrics``."""
    wanted = {"vllm:kv_cache_usage_perc": "kv_cache_usage", "vllm:num_requests_running": "running",
              "vllm:num_requests_waiting": "waiting"}
    out: dict[str, float] = {}
    try:
        with _NO_PROXY.open(urllib.request.Request(f"{url}/metrics", headers=auth_header(api_key)), timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r"^([\w:]+)(?:\{[^}]*\})?\s+([-+\d.eE]+|NaN)$", line)
        if m and m.group(1) in wanted:
            out[wanted[m.group(1)]] = out.get(wanted[m.group(1)], 0.0) + float(m.group(2))
    for k in ("running", "waiting"):
        if k in out:
            out[k] = int(out[k])
    return out


def cache_facts(url: str, timeout: float = 5.0, api_key: str | None = None) -> dict[str, int]:
    """The KV cache's size from ``vllm:cache_config_info`` of ``/metrics``: ``kv_cache_tokens`` (blocks x block
    size, summed over data-parallel engines) and ``block_size``; empty when the server does not say."""
    try:
        with _NO_PROXY.open(urllib.request.Request(f"{url}/metrics", headers=auth_header(api_key)), timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return {}
    tokens, block = 0, 0
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            try:
                block = int(labels.get("block_size") or 0)
                tokens += int(labels.get("num_gpu_blocks") or 0) * block
            except ValueError:
                continue
    return {"kv_cache_tokens": tokens, "block_size": block} if tokens else {}


def error_message(body: bytes | str) -> str:
    """The first useful line of an error response of vLLM's server."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()] or ["(no message)"]
    if re.match(r"^\d+ validation errors?", lines[0]) and len(lines) > 1:
        m = re.search(r"'msg': '([^']*)'.*'loc': '([^']*)'|'loc': '([^']*)'.*'msg': '([^']*)'", lines[1])
        if m:
            loc, msg = (m.group(2), m.group(1)) if m.group(1) else (m.group(3), m.group(4))
            return f"{loc.removeprefix('body.')}: {msg}"
        return lines[1]
    return lines[0]
