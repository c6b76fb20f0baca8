"""A back-end with no engine behind it, for the fast tier: the magics, display, the panel's logic and the
journal run on it in milliseconds. It keeps the ``Backend`` contract (``vllm_notebook/backends/base.py``), so
everything above it behaves as with a real engine; every behaviour tested here also has a real-parts test
in the slow tier.

It "generates" by repeating the prompt's words in turn, one word a token, so outputs are exact and easy to
predict: ``"a b c"`` gives ``" a b c a"`` for four tokens. It honours ``max_tokens``, ``n``, ``stop``,
``ignore_eos`` (there is no EOS), a maximum prompt length (``max_model_len`` words), streaming, aborts and
pooling (an embedding per text).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from typing import Any

from vllm_notebook.backends.base import Backend
from vllm_notebook.engine.core import Engine
from vllm_notebook.engine.outputs import Completion, RequestOutput, stop_strings
from vllm_notebook.engine.pooling import Pooled, Pooling
from vllm_notebook.engine.requests import first_line, request_error
from vllm_notebook.engine.sampling import request_fields
from vllm_notebook.errors import EngineDiedError, RequestError, VllmNotebookError


class FakeBackend(Backend):
    """See the module's text. ``delay``: seconds per token (a stream to interrupt needs some)."""

    kind = "fake"

    def __init__(self, model: str = "fake/echo", *, delay: float = 0.0, max_model_len: int = 64):
        super().__init__(key=(("model", repr(model)),), log_path="")
        self.facts = {"model": model, "max_model_len": max_model_len, "dtype": "float32", "device": "cpu",
                      "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "kv_cache_tokens": 4096,
                      "runner": "generate"}
        self.delay = delay
        self.sent: list[tuple[str, dict]] = []  # every request: (prompt text, fields)
        self.died = False
        self._closed = False
        self.vllm_version = "fake"

    # ---------------------------------------------------------------- the contract
    @property
    def alive(self) -> bool:
        return not self._closed and not self.died

    def start(self, progress=None) -> None:
        if progress is not None:
            progress("starting engine", 0.0)
        self.load_seconds = 0.0

    def check_usable(self) -> None:
        if self.died:
            raise EngineDiedError(f"engine '{self.name}' has died (the fake said so)")

    def translate(self, exc: BaseException) -> BaseException:
        return exc if isinstance(exc, VllmNotebookError) else request_error(first_line(exc))

    def sampling(self, base: Any = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return request_fields(base, overrides)

    def default_sampling(self) -> dict[str, Any]:
        return {}

    def chat_prompt(self, messages) -> dict:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return {"prompt": text}

    def sampling_record(self, params: Any) -> dict[str, Any]:
        return {k: v for k, v in dict(params).items() if k != "stream"} if not isinstance(params, Pooling) else {}

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "path": "", "revision": None, "flags": dict(self.key)}

    def where(self) -> dict[str, Any]:
        return {"node": "fake-node", "job": None}

    def prepare(self, params: Any, stream: bool) -> Any:
        if isinstance(params, Pooling):
            return params
        fields = dict(params) if isinstance(params, dict) else self.sampling(params)
        fields["stream"] = stream
        return fields

    async def request(self, i: int, prompt, fields, rid: str, q, lora=None):
        text = prompt if isinstance(prompt, str) else str(prompt.get("prompt", prompt.get("prompt_token_ids", "")))
        words = text.split() or ["…"]
        if len(words) > self.facts["max_model_len"]:
            raise RequestError(f"This model's maximum context length is {self.facts['max_model_len']} tokens; "
                               f"the prompt has {len(words)}")
        if isinstance(fields, Pooling):
            out = Pooled(rid, [b / 255 for b in hashlib.sha256(text.encode()).digest()[:8]], list(range(len(words))))
            q.put((i, out))
            return out
        self.sent.append((text, dict(fields)))
        n, max_tokens = int(fields.get("n") or 1), int(fields.get("max_tokens") or 16)
        stops = stop_strings(fields)
        out = RequestOutput(rid, text, prompt_token_ids=list(range(len(words))),
                            outputs=[Completion(index=k) for k in range(n)])
        for t in range(max_tokens):
            for c in out.outputs:
                if c.finish_reason:
                    continue
                c.text += " " + words[(t + c.index) % len(words)]
                c.token_ids.append(t)
                hit = next((s for s in stops if s in c.text), None)
                if hit is not None:
                    c.text = c.text[:c.text.index(hit)]
                    c.finish_reason, c.stop_reason = "stop", hit
                elif t == max_tokens - 1:
                    c.finish_reason = "length"
            out.finished = all(c.finish_reason for c in out.outputs)
            if fields.get("stream") or out.finished:
                q.put((i, copy.deepcopy(out)))
            if out.finished:
                return out
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
        return out

    def abort(self, run, pending: list[str]) -> None:
        if run.future is not None:
            run.future.cancel()

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def can_sleep(self) -> bool:
        return True

    async def sleep(self, level: int) -> None:
        pass

    async def wake(self, level: int) -> None:
        pass

    def close(self) -> None:
        self._closed = True

    def stop(self) -> str:
        self._closed = True
        return f"unloaded engine '{self.name}' ({self.model})"


def fake_engine(name: str = "default", **kw) -> Engine:
    """A started engine over a ``FakeBackend`` (not registered)."""
    return Engine(name, FakeBackend(**kw)).start()
