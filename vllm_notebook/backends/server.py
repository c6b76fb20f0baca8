"""``ServerBackend``: an engine that is an OpenAI-compatible vLLM server, over HTTP.

Requests go out over HTTP from the engine's private event-loop thread (httpx),
one per prompt, all at once, so the server batches them as vLLM batches any
concurrent requests. Streaming uses server-sent events; closing a stream (Ctrl-C,
the panel's Stop, leaving a ``stream()`` loop) drops the connection and the
server aborts the request. Neither vLLM nor torch is imported in the kernel:
attaching to a running server takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..engine.core import Engine
from ..engine.lora import BASE_ID, BASE_NAME, PROMPT_LOGPROBS_ON_CPU, Adapter, Adapters, zero_adapter
from ..engine.outputs import (
    Completion,
    RequestOutput,
    StopsAcrossCut,
    continuation,
    stop_strings,
)
from ..engine.pooling import Pooled, Pooling
from ..engine.requests import (
    PromptRejected,
    Run,
    first_line,
    request_error,
    suppress_errors,
)
from ..engine.sampling import request_fields
from ..errors import (
    AuthRefusedError,
    EngineDiedError,
    RequestError,
    UsageError,
    VllmNotebookError,
)
from ..server import process, record
from ..server.http import (
    auth_header,
    cache_facts,
    error_message,
    get_json,
    healthy,
    metrics,
)
from .base import Backend

# ------------------------------------------------------------------ the engine
#: Prompts per completions request of a batch (see ``ServerBackend.sends``): few requests, and still results
#: (and the progress bar) coming in as the batch goes.
CHUNK = 32


def _prompt_field(prompt) -> str | list[int]:
    """A completions request's ``prompt``: the text, or the token ids."""
    if isinstance(prompt, dict):
        return list(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else prompt.get("prompt", "")
    return prompt


#: What vLLM's server answers (HTTP 500) once its EngineCore has died (``EngineDeadError``'s message).
ENGINE_DEAD = "EngineCore encountered an issue"

class ServerBackend(Backend):
    """An engine that is a vLLM server: one we started (``record``) or any we attached to."""

    kind = "server"
    outlives_kernel = True

    def __init__(self, url: str, api_key: str | None, record=None, model: str | None = None, launcher=None):
        super().__init__(("server", record.id if record is not None else url),
                         record.log if record is not None else "", plan=dict(record.plan) if record is not None else {})
        self.url = url.rstrip("/")
        self.record: record.ServerRecord | None = record
        self._api_key = api_key  # never printed, logged or stored
        self._wanted = model
        self._client = None
        self._gone: str | None = None
        self._base = None  # the all-zero adapter base-model requests use on a CPU-build server (lora.BASE_NAME)
        self._closed = False
        self._sleeping = 0  # the level the server slept at when this kernel connected
        self.launcher = launcher  # what starts and stops a server elsewhere (``step.Step``), None otherwise
        if launcher is not None:
            self.outlives_kernel, self.holds_devices_here = launcher.outlives_kernel, launcher.holds_devices_here

    @property
    def owned(self) -> bool:
        """Started by vllm-notebook (then ``unload`` stops it); otherwise only attached."""
        return self.record is not None

    # ---------------------------------------------------------------- connect
    def start(self, progress=None) -> None:
        t0 = time.monotonic()
        if self.launcher is not None and self.record is None:  # a server to start first (a replica's job step)
            rec = self.launcher.start(progress)
            self.url, self.record, self.plan, self.log_path = rec.url.rstrip("/"), rec, dict(rec.plan), rec.log
            self._api_key = rec.api_key()
        listed = get_json(self.url, "/v1/models", self._api_key).get("data") or []
        served = [m for m in listed if not m.get("parent")]  # LoRA adapters are listed with their base as parent
        ids = [m.get("id") for m in served]
        if self._wanted and self._wanted in ids:
            entry = served[ids.index(self._wanted)]
        elif len(served) == 1 or (served and not self._wanted):
            entry = served[0]
        else:
            raise VllmNotebookError(f"the server at {self.url} serves {', '.join(ids) or 'no model'}, "
                                    f"not {self._wanted!r}")
        self.facts = {"model": entry.get("id"), "max_model_len": entry.get("max_model_len"),
                      "root": entry.get("root"), "url": self.url, "device": "server", "runner": self._flag("runner"),
                      "tensor_parallel_size": self.plan.get("tensor_parallel_size", "?"),
                      "pipeline_parallel_size": self.plan.get("pipeline_parallel_size", "?")}
        self._client = new_client(self.url, self._api_key)
        self.load_seconds = time.monotonic() - t0
        self._sleeping = self._sleep_level_now()
        # Adapters: those the server lists; one we started says whether it has LoRA and its rank limit.
        known = self.record is not None
        rank = self._flag("max_lora_rank")
        self.adapters = Adapters(enabled=bool(self._flag("enable_lora")) or not known or
                                 any(m.get("parent") for m in listed),
                                 max_rank=int(rank) if rank else (16 if known else None))
        self.checks_rank = known
        for m in listed:
            if m.get("parent") != entry.get("id"):
                continue
            adapter = Adapter(str(m.get("id")), str(m.get("root") or ""), len(self.adapters) + 2)
            if adapter.name == BASE_NAME:
                self._base = adapter
            else:
                self.adapters.add(adapter)
        if len(self.adapters):
            asyncio.run_coroutine_threadsafe(self._ensure_base(next(iter(self.adapters)).path), self.loop).result()
        try:
            self.vllm_version = get_json(self.url, "/version", self._api_key, timeout=5.0).get("version")
        except VllmNotebookError:
            self.vllm_version = None
        self.facts.update(cache_facts(self.url, api_key=self._api_key))
        self.facts["dtype"] = self._dtype()

    def _dtype(self) -> str:
        """The weights' dtype: the server's --dtype, else the model's own (its config.json, where this machine
        can read it: vLLM's "auto"), else "auto"."""
        flag = self._flag("dtype")
        if flag and flag != "auto":
            return str(flag)
        root = Path(str(self.facts.get("root") or ""))
        try:
            config = json.loads((root / "config.json").read_text())
        except (OSError, ValueError):
            return "auto"
        found = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        return f"{found} (auto)" if found else "auto"

    def _flag(self, name: str) -> Any:
        """A flag of a server we started (from its record; None for an attached one or a flag not given)."""
        if self.record is None:
            return None
        flag = "--" + name.replace("_", "-")
        argv = list(self.record.argv)
        for k, v in self.record.key or ():
            if str(k) == name:
                return True if v == "True" else None if v in ("None", "False") else str(v).strip("'\"")
        if flag in argv:
            i = argv.index(flag)
            return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
        return None

    # ---------------------------------------------------------------- provenance
    def identity(self) -> dict[str, Any]:
        root = str(self.facts.get("root") or "")
        revision = root.rsplit("/", 1)[-1] if "/snapshots/" in root else None
        if self.record is not None:
            flags = {str(k): v for k, v in self.record.key} if self.record.key else {"argv": list(self.record.argv)}
        else:
            flags = {"server": self.url}
        return {"model": self.model, "path": root, "revision": revision, "flags": flags}

    def sampling_record(self, params: Any) -> dict[str, Any]:
        return fields_record(params)

    def place(self) -> str:
        if self.launcher is not None:
            return self.launcher.place
        port = self.url.rstrip("/").rsplit(":", 1)[-1].split("/")[0] if self.url else "?"
        return f"server :{port}"

    def where(self) -> dict[str, Any]:
        if self.record is None:
            return {"node": None, "job": None, "url": self.url}
        return {"node": self.record.node, "job": self.record.job_id, "url": self.url}

    # ---------------------------------------------------------------- state
    @property
    def alive(self) -> bool:
        return not self._closed and self._client is not None and self._gone is None and self._process_alive()

    def abandon_start(self) -> None:
        if self.launcher is not None:
            self.launcher.abandon()

    def _process_alive(self) -> bool:
        if self.launcher is not None:
            return self.launcher.alive()
        if self.record is None or not self.record.here:
            return True
        return self.record.alive()

    def check_usable(self) -> None:
        if self._gone is None and not self._process_alive():
            self._gone = "its process exited"
        if self._gone is not None:
            raise self._died()

    def _died(self) -> EngineDiedError:
        log = f"  (log: {self.log_path})" if self.log_path else ""
        again = "run %vllm_load again to start a new one" if self.owned else "check the server, then %vllm_load --attach again"
        return EngineDiedError(f"server '{self.name}' at {self.url} is gone ({self._gone}); {again}{log}")

    def default_sampling(self) -> dict[str, Any]:
        return {}  # the server applies the model's generation_config itself

    def sampling(self, base: Any = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return request_fields(base, overrides)

    def refresh_usage(self) -> None:
        self.usage.update(metrics(self.url, api_key=self._api_key))

    def chat_prompt(self, messages) -> dict:
        """The server applies the chat template: the prompt is the messages themselves."""
        messages = [dict(m) for m in messages]
        return {"messages": messages, "prompt": str(messages[-1].get("content", "")) if messages else ""}

    # ---------------------------------------------------------------- requests
    def prepare(self, params: Any, stream: bool) -> dict[str, Any] | Pooling:
        if isinstance(params, Pooling):
            return params
        fields = dict(params) if isinstance(params, dict) else self.sampling(params)
        if fields.get("prompt_logprobs") is not None and self.adapters.enabled and self.plan.get("devices") == "CPU":
            raise UsageError(PROMPT_LOGPROBS_ON_CPU)  # a server we started on vLLM's CPU build
        fields["stream"] = stream
        return fields

    def _body(self, prompt, fields: dict) -> tuple[str, dict, bool]:
        body = {"model": self.facts["model"], **fields, "return_token_ids": True}
        if isinstance(prompt, dict) and "messages" in prompt:
            body["messages"] = prompt["messages"]
            if body.get("logprobs"):
                body["top_logprobs"], body["logprobs"] = body["logprobs"], True
            return "/v1/chat/completions", body, True
        body["prompt"] = _prompt_field(prompt)
        return "/v1/completions", body, False

    async def request(self, i: int, prompt, fields: dict | Pooling, rid: str, q, lora=None,
                       base: RequestOutput | None = None):
        """Send one request; its outputs go to ``q`` as they come. Returns the final output.

        ``base``: the output this request continues (its text and tokens stay first; see ``continuation``)."""
        if isinstance(fields, Pooling):
            return await self._embed_request(i, prompt, fields, rid, q, lora)
        path, body, chat = self._body(prompt, fields)
        lora = self._base if lora is None else lora
        if lora is not None:
            body["model"] = lora.name  # vLLM serves each adapter as a model of its own name
        text = prompt if isinstance(prompt, str) else None
        out = base or RequestOutput(rid, text, outputs=[Completion(index=k) for k in range(int(fields.get("n") or 1))])
        if not fields.get("stream"):
            r = await self._client.post(path, json=body, headers={"X-Request-Id": rid})
            if r.status_code != 200:
                raise self._http_error(r.status_code, r.content)
            out.apply(r.json(), chat)
            out.finished = True
            q.put((i, out))
            return out
        async with self._client.stream("POST", path, json=body, headers={"X-Request-Id": rid}) as r:
            if r.status_code != 200:
                raise self._http_error(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise request_error(error_message(json.dumps(chunk)))
                out.apply(chunk, chat)
                q.put((i, out))
        if not out.finished:  # the stream ended without finish reasons (server shutting down)
            raise RequestError(f"the server at {self.url} closed the stream early")
        return out

    async def continue_stream(self, i: int, prompt, fields: dict, rid: str, q, lora, cut: RequestOutput | None):
        """Go on with the stream ``cut``, which another server's end broke off, from its last token on this server
        (``continuation``; sent again whole when it cannot be). Stop strings hold as if nothing was cut. Sent once:
        this back-end's own ``request``, not the Slurm back-end's retrying one."""
        send = self.request
        cont = continuation(fields, cut)
        if cont is None:
            return await send(i, prompt, fields, rid, q, lora)
        if cont[1].get("max_tokens") == 0:  # the end came between the last token and the finish reason
            cut.outputs[0].finish_reason, cut.finished = "length", True
            q.put((i, cut))
            return cut
        stops = await self._stops_across_cut(fields, cut)
        if stops is None:
            return await send(i, *cont, rid, q, lora, base=cut)
        try:
            return await send(i, *cont, rid, _Checked(q, stops), lora, base=cut)
        except _StopFound:  # leaving the stream closes it, and the server aborts the request
            return cut

    async def _stops_across_cut(self, fields: dict, cut) -> StopsAcrossCut | None:
        """The check of stop strings across the cut, with the text the first server held back (decoded by the
        successor: the made tokens' text after the prompt's); None when the request has no stop strings."""
        stop = stop_strings(fields)
        if not stop:
            return None
        made = cut.outputs[0]
        include, held = bool(fields.get("include_stop_str_in_output")), ""
        if not include:  # vLLM streams all but the last len(longest stop) - 1 characters
            text, why = "", ""
            for attempt in range(3):  # a successor just up can fail its first request: ask again
                try:
                    before = await self._text(cut.prompt_token_ids)
                    after = await self._text(cut.prompt_token_ids + made.token_ids)
                except Exception as e:  # noqa: BLE001 - the text stays short by what was held (said below)
                    why = f"{type(e).__name__}: {e}"
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                # the made tokens' own text: after the prompt's, else decoded alone (a tokenizer that joins the two)
                text = after[len(before):] if after.startswith(before) else await self._text(made.token_ids)
                why = "" if text.startswith(made.text) else f"the successor decodes the tokens as {text[:40]!r}…"
                break
            if not why and len(text) - len(made.text) < max(map(len, stop)):
                held = text[len(made.text):]
            elif why:
                print(f"vllm-notebook: warning: up to {max(map(len, stop)) - 1} characters made before the cut "
                      f"may be missing from the continued text ({why})", file=sys.stderr)
        return StopsAcrossCut(cut, held, stop, include, watch=len(made.token_ids) >= int(fields.get("min_tokens") or 0))

    def sends(self, items, params, run: Run, one=None, many=None) -> list[tuple[int, Any]]:
        """A batch (no streaming, completions API) goes as lists of prompts, ``CHUNK`` per request: vLLM's server
        spends more per HTTP request than its engine spends on a short prompt (64 x 16 tokens on CPU: 1.6 s as
        one request per prompt, 0.4 s as one list). Chat, streams and embeddings: one request per prompt.

        ``one`` and ``many`` send a request and a list (``request`` and ``request_many`` unless given: the Slurm
        back-end passes its retrying ones)."""
        one, many = one or self.request, many or self.request_many
        if isinstance(params, Pooling) or params.get("stream") or len(items) < 2:
            return [(i, one(i, p, params, rid, run.q, run.loras[i])) for i, (p, rid) in enumerate(zip(items, run.rids))]
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            kind = "chat" if isinstance(item, dict) and "messages" in item else \
                "tokens" if isinstance(item, dict) and "prompt_token_ids" in item else "text"
            groups.setdefault((kind, id(run.loras[i])), []).append(i)
        sends = []
        for (kind, _), idx in groups.items():
            if kind == "chat":
                sends += [(i, one(i, items[i], params, run.rids[i], run.q, run.loras[i])) for i in idx]
                continue
            for k in range(0, len(idx), CHUNK):
                part = idx[k:k + CHUNK]
                sends.append((part[0], many(part, [items[i] for i in part], params,
                                            [run.rids[i] for i in part], run.q, run.loras[part[0]])))
        return sends

    async def request_many(self, idx: list[int], prompts: list, fields: dict, rids: list[str], q,
                            lora=None) -> list[RequestOutput]:
        """Send prompts (all text, or all token ids) as one completions request; each prompt's output goes to
        ``q`` under its index. A request the server refuses (one prompt too long, ...) is sent again one prompt
        at a time, so the error names what the single request would."""
        path, body, _ = self._body(prompts[0], fields)
        body["prompt"] = [_prompt_field(p) for p in prompts]
        model = self._base if lora is None else lora
        if model is not None:
            body["model"] = model.name
        r = await self._client.post(path, json=body, headers={"X-Request-Id": rids[0]})
        if r.status_code == 400:
            async def alone(i: int, p, rid: str):
                try:
                    return await self.request(i, p, fields, rid, q, lora)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this prompt's error, under its own index
                    refused = isinstance(self.translate(exc), RequestError)  # a 400; not a server gone
                    q.put((i, PromptRejected(exc) if refused else exc))
                    return None

            outs = await asyncio.gather(*(alone(i, p, rid) for i, p, rid in zip(idx, prompts, rids)))
            return [o for o in outs if o is not None]
        if r.status_code != 200:
            raise self._http_error(r.status_code, r.content)
        n = int(fields.get("n") or 1)
        outs = [RequestOutput(rid, p if isinstance(p, str) else None, outputs=[Completion(index=k) for k in range(n)])
                for p, rid in zip(prompts, rids)]
        for j, ch in enumerate(r.json().get("choices") or ()):
            j = int(ch.get("index", j))
            outs[j // n].apply({"choices": [{**ch, "index": j % n}]}, False)
        for i, out in zip(idx, outs):
            out.finished = True
            q.put((i, out))
        return outs

    async def _embed_request(self, i: int, prompt, pooling: Pooling, rid: str, q, lora=None) -> Pooled:
        body: dict[str, Any] = {"model": lora.name if lora is not None else self.facts["model"],
                                "input": list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else prompt,
                                "encoding_format": "float"}
        if pooling.dimensions is not None:
            body["dimensions"] = pooling.dimensions
        data = await self._post_json("/v1/embeddings", body, rid)
        out = Pooled(rid, (data.get("data") or [{}])[0].get("embedding"))
        q.put((i, out))
        return out

    async def _post_json(self, path: str, body: dict, rid: str | None = None) -> dict:
        headers = {"X-Request-Id": rid} if rid else None
        r = await self._client.post(path, json=body, headers=headers)
        if r.status_code != 200:
            raise self._http_error(r.status_code, r.content)
        return r.json()

    # ---------------------------------------------------------------- tokens, scores, adapters
    def token_ids(self, text: str, special: bool = True) -> list[int]:
        data = self._call(self._post_json("/tokenize", {"model": self.facts["model"], "prompt": text,
                                                        "add_special_tokens": special}))
        return list(data.get("tokens") or ())

    async def _text(self, token_ids: list[int]) -> str:
        """The tokens as text, as this server's tokenizer decodes them (vLLM's ``/detokenize``)."""
        data = await self._post_json("/detokenize", {"model": self.facts["model"], "tokens": list(token_ids)})
        return data.get("prompt") or ""

    def scores(self, query: str, documents: list[str], lora) -> list[float]:
        """vLLM's ``/score``: cosine similarity for embedding models, the model's own score for cross-encoders."""
        model = self.adapters.get(lora).name if lora else self.facts["model"]
        body = {"model": model, "queries": query, "documents": documents}
        data = self._call(self._post_json("/score", body))
        scores = {int(d.get("index", k)): float(d["score"]) for k, d in enumerate(data.get("data") or ())}
        return [scores[k] for k in range(len(documents))]

    async def add_lora(self, adapter) -> None:
        r = await self._client.post("/v1/load_lora_adapter", json={"lora_name": adapter.name,
                                                                   "lora_path": adapter.path})
        if r.status_code == 404:
            raise UsageError(f"the server at {self.url} does not add adapters at run time: start it with "
                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (vllm-notebook's --server does, with "
                             "--enable-lora)")
        if r.status_code != 200:
            raise UsageError(f"cannot load adapter '{adapter.name}' from {adapter.path}: {error_message(r.content)}")
        if adapter.name != BASE_NAME:
            await self._ensure_base(adapter.path)

    async def _ensure_base(self, like: str) -> None:
        """On a server we started on vLLM's CPU build: the all-zero adapter for base-model requests
        (see lora.BASE_NAME), made like the adapter ``like``."""
        if self._base is None and self.plan.get("devices") == "CPU":
            base = Adapter(BASE_NAME, await asyncio.to_thread(zero_adapter, like), BASE_ID)
            await self.add_lora(base)
            self._base = base

    async def remove_lora(self, adapter) -> None:
        r = await self._client.post("/v1/unload_lora_adapter", json={"lora_name": adapter.name})
        if r.status_code != 200:
            raise UsageError(f"cannot remove adapter '{adapter.name}': {error_message(r.content)}")

    def _http_error(self, status: int, content: bytes) -> VllmNotebookError:
        if status == 401:
            return AuthRefusedError(self.url)
        msg = error_message(content)
        if status >= 500 and ENGINE_DEAD in msg:  # the server answers, its engine is gone: no request can succeed
            self._gone = f"its engine died: {msg.split('. See')[0]}"
            return self._died()
        return request_error(msg if status == 400 else f"server error {status}: {msg}")

    def abort(self, run: Run, pending: list[str]) -> None:
        """Cancel the HTTP requests: closing a connection makes vLLM's server abort its request."""
        if run.future is not None:
            run.future.cancel()

    def translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, VllmNotebookError):
            return exc
        import httpx

        if isinstance(exc, httpx.TransportError):
            if not self._process_alive() or not healthy(self.url, timeout=1.0, api_key=self._api_key):
                self._gone = "its process exited" if not self._process_alive() else \
                    f"no answer: {type(exc).__name__}"
                return self._died()
            return RequestError(f"the connection to the server at {self.url} failed: {exc or type(exc).__name__}")
        return request_error(first_line(exc))

    # ---------------------------------------------------------------- sleep mode (vLLM's dev endpoints)
    def _sleep_level_now(self) -> int:
        """The level a server sleeps at now: its record's, else 1 if ``/is_sleeping`` says so; 0 awake."""
        try:
            sleeping = bool(get_json(self.url, "/is_sleeping", self._api_key, timeout=5.0).get("is_sleeping"))
        except VllmNotebookError:  # 404: no dev endpoints, so no sleep mode
            return 0
        recorded = self.record.asleep if self.record is not None else 0
        return (recorded or 1) if sleeping else 0

    def can_sleep(self) -> bool:
        try:
            get_json(self.url, "/is_sleeping", self._api_key, timeout=5.0)
        except VllmNotebookError:
            return False
        return True

    async def _post(self, path: str, **kwargs) -> None:
        r = await self._client.post(path, **kwargs)
        if r.status_code != 200:
            raise self._http_error(r.status_code, r.content)

    async def sleep(self, level: int) -> None:
        await self._post("/sleep", params={"level": str(level)})
        self._remember_sleep(level)

    async def wake(self, level: int) -> None:
        if level >= 2:  # the weights were dropped: reload them before the KV cache comes back
            await self._post("/wake_up", params={"tags": "weights"})
            await self._post("/collective_rpc", json={"method": "reload_weights"})
            await self._post("/wake_up", params={"tags": "kv_cache"})
        else:
            await self._post("/wake_up")
        self._remember_sleep(0)

    def _remember_sleep(self, level: int) -> None:
        """Keep the level in the registry, so a restarted kernel knows how to wake the server."""
        if self.record is not None:
            self.record.asleep = level
            record.update(self.record)

    def sleeping_at(self) -> int:
        return self._sleeping

    @property
    def origin(self) -> list[str] | None:
        """A server we started: its ``%vllm_load`` line (without ``--name``), to start it again."""
        rec = self.record
        if rec is None:
            return None
        return [rec.model, *rec.argv, "--server", *(["--host", rec.host] if rec.host not in ("", "127.0.0.1") else [])]

    @origin.setter
    def origin(self, value) -> None:  # Backend's constructor sets it; a server's comes from its record
        pass

    @property
    def gone(self) -> str | None:
        """Why the server is gone (it stopped answering, its process exited), or None while it serves."""
        return self._gone

    def uses_server(self, record_id: str) -> bool:
        return self.record is not None and self.record.id == record_id

    def answers(self, timeout: float = 2.0) -> bool:
        """The server answers its health check now."""
        return healthy(self.url, timeout=timeout, api_key=self._api_key)

    def _call(self, coro):
        """Run ``coro`` on the engine's loop and wait (``Engine`` calls these while its loop runs)."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        except BaseException as exc:
            raise self.translate(exc) from None

    # ---------------------------------------------------------------- moving to another server
    def move_to(self, url: str, api_key: str | None, record) -> None:
        """Use the server at ``url`` from now on (a chained Slurm job's successor): a new connection pool first,
        so a request that sees the new url gets its client; the old pool closes in the background."""
        old, self._client = self._client, new_client(url, api_key)
        self.url, self._api_key, self.record = url, api_key, record
        self.plan = dict(record.plan)
        self._gone = None
        if old is not None:
            asyncio.run_coroutine_threadsafe(old.aclose(), self.loop)

    # ---------------------------------------------------------------- stop
    def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            fut = asyncio.run_coroutine_threadsafe(client.aclose(), self.loop)
            with suppress_errors():
                fut.result(timeout=5)

    def detached(self) -> str:
        return f"detached from the server at {self.url} (still running)"

    def stop(self) -> str:
        """Stop the server if vllm-notebook started it; only detach from one we attached to."""
        self._closed = True
        if self.launcher is not None:
            self.launcher.stop()
            return f"stopped the server at {self.url} ({self.model}) on {self.launcher.place}"
        if not self.owned:
            return f"detached from the server at {self.url} (not stopped: vllm-notebook did not start it)"
        process.stop(self.record)
        return f"stopped the server at {self.url} ({self.model})"

    def title(self) -> str:
        return "vLLM server"

    def rows(self) -> list[tuple[str, Any]]:
        rows = [("model", self.model), ("URL", self.url), ("max_model_len", self.facts.get("max_model_len")),
                ("started by", "vllm-notebook (%vllm_unload stops it)" if self.owned else "someone else (attached)")]
        if self.record is not None:
            rows += [("pid", self.record.pid), ("uptime", self.record.uptime()), ("job", self.record.job_id or "-"),
                     ("log", self.log_path)]
        return rows


def fields_record(params: Any) -> dict[str, Any]:
    """A request's sampling fields as the journal and the run record keep them."""
    return {k: v for k, v in dict(params).items() if k != "stream"}


def new_client(url: str, api_key: str | None):
    """An HTTP connection pool to the server at ``url``, with its key on every request."""
    import httpx

    # trust_env=False: a cluster's HTTP(S)_PROXY must not capture requests to a node-local server.
    return httpx.AsyncClient(base_url=url, headers=auth_header(api_key), trust_env=False,
                             timeout=httpx.Timeout(None, connect=10.0),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def connect(name: str, url: str, api_key: str | None, record=None, model: str | None = None) -> Engine:
    """An engine called ``name`` over the running server at ``url`` (not registered: the loader does that)."""
    return Engine(name, ServerBackend(url, api_key, record=record, model=model)).start()


class _StopFound(Exception):
    """A stop string across the cut ended a continued stream (its final output is on the queue)."""


class _Checked:
    """A continued stream's queue: what it shows is checked for stop strings across the cut (``StopsAcrossCut``)."""

    def __init__(self, q, stops: StopsAcrossCut):
        self.q, self.stops = q, stops

    def put(self, item) -> None:
        shown, ended = self.stops.check(item[1])
        self.q.put((item[0], shown))
        if ended:
            raise _StopFound
