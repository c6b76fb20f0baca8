"""``LocalBackend``: the back-end that runs vLLM's ``AsyncLLM`` inside this kernel.

vLLM is imported on the first load, through ``vllm_api`` (the one module that
touches vLLM). The engine's processes lead process groups of their own
(``procs.own_process_group``), so Jupyter's interrupt never reaches them; Ctrl-C
aborts requests instead (``Engine.run``).
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import logs, private, procs
from ..progress import in_kernel
from ..engine.lora import BASE_ID, BASE_NAME, PROMPT_LOGPROBS_ON_CPU, Adapter, Adapters, zero_adapter
from ..engine.pooling import Pooled, Pooling
from ..engine.requests import (
    PromptRejected,
    Run,
    first_line,
    request_error,
    suppress_errors,
)
from ..engine.sampling import as_dict, build_params
from ..errors import (
    EngineDiedError,
    EngineStartError,
    RequestError,
    UsageError,
    VllmNotebookError,
)
from .base import Backend

#: Prompts of a batch tokenized per call (``LocalBackend._batch``): one call per chunk costs no more than one
#: per batch, and the engine starts on the first chunk while the next is tokenized.
RENDER_CHUNK = 512
#: How often a batch waiting on one request also takes the final outputs of the others (``LocalBackend._batch``).
SWEEP_S = 0.1
SHUTDOWN_GRACE_S = 0.5  # what vLLM's own shutdown gets before the engine's processes are stopped by us


def _vllm():
    """vLLM, through the one module that touches it: imported on the first load, never at ``%load_ext``."""
    from ..engine import vllm_api

    return vllm_api


class LocalBackend(Backend):
    """vLLM's ``AsyncLLM`` driven from the engine's private event-loop thread, in this kernel."""

    kind = "local"
    summarised_on_load = True

    def __init__(self, args: Any, key: tuple, log_path: str, plan: dict | None = None):
        super().__init__(key, log_path, plan)
        self.args = args  # vLLM's AsyncEngineArgs
        self._llm = None
        self._tokenizer = None
        self._defaults: dict[str, Any] | None = None
        self._groups: list[int] = []
        self._base = None  # the all-zero adapter base-model requests use on vLLM's CPU build (lora.BASE_NAME)
        self.tmp: Path | None = None  # the engine's private folder: its sockets and rendezvous files
        self._sharing_cores = False
        self._started_at = time.time()
        self._closed = False

    def start(self, progress: Callable[[str, float], None] | None = None) -> None:
        groups_before = set(procs.started_groups())
        t0 = time.monotonic()
        fut = asyncio.run_coroutine_threadsafe(self._create(), self.loop)
        phase = "starting engine"
        shown = 0.0
        try:
            while True:
                try:
                    fut.result(timeout=0.05)  # the load returns within 50 ms of the engine being ready
                    break
                except TimeoutError:
                    pass
                if progress and time.monotonic() - shown >= 0.25:
                    shown = time.monotonic()
                    phase = logs.phase_of("\n".join(logs.tail(self.log_path, 30)), phase)
                    progress(phase, time.monotonic() - t0)
        except KeyboardInterrupt:
            for pgid in set(procs.started_groups()) - groups_before:
                procs.stop_group(pgid, timeout=2.0)
            with suppress_errors():
                fut.result(timeout=30)
            self._forget_folder()
            raise VllmNotebookError("load interrupted; the half-started engine was stopped") from None
        except BaseException as exc:
            self._forget_folder()
            if isinstance(exc, VllmNotebookError):
                raise
            lines = logs.root_cause(self.log_path, exc)
            msg = "; ".join(lines) or f"{type(exc).__name__}: {exc}"
            raise EngineStartError(f"engine failed to start: {msg}  (full log: {self.log_path})") from None
        self.load_seconds = time.monotonic() - t0
        self._groups = [g for g in procs.started_groups() if g not in groups_before]
        if _vllm().is_cpu_build() and in_kernel():  # it keeps every core busy: the Jupyter server gets its moments
            self._sharing_cores = True
            procs.share_cores_while(True)

    async def _create(self) -> None:
        self.tmp = private.engine_dir("kernel", self.name)
        procs.remove_at_exit(self.tmp, self._started_at)  # if the kernel dies first: the watchdog removes it
        with (logs.capture_output(self.log_path), procs.own_process_group(), procs.main_script_hidden(),
              private.engine_environment(self.tmp)):
            vllm_api = _vllm()
            logs.route_vllm_logs(self.log_path, vllm_api.vllm_loggers())
            try:
                self._llm = vllm_api.start_engine(self.args, self.usage)
            finally:
                logs.route_vllm_logs(self.log_path, vllm_api.vllm_loggers())
            self._tokenizer = vllm_api.tokenizer(self._llm)
            self.facts = vllm_api.engine_facts(self._llm)
            lora = self.facts.get("lora") or {}
            self.adapters = Adapters(enabled=bool(lora), max_rank=lora.get("max_lora_rank"),
                                     max_loras=lora.get("max_loras"))
            self.vllm_version = self.facts.get("vllm_version")

    # ---------------------------------------------------------------- provenance
    def identity(self) -> dict[str, Any]:
        path = str(self.facts.get("path") or getattr(self.args, "model", ""))
        # a Hugging Face cache snapshot: .../models--org--name/snapshots/<commit hash>
        revision = Path(path).name if Path(path).parent.name == "snapshots" else None
        return {"model": self.model, "path": path, "revision": revision, "flags": dict(self.key)}

    def sampling_record(self, params: Any) -> dict[str, Any]:
        return as_dict(params)

    def place(self) -> str:
        return "kernel"

    def where(self) -> dict[str, Any]:
        return {"node": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID")}

    # ---------------------------------------------------------------- state
    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._closed and not self._llm.errored

    @property
    def model(self) -> str:
        return str(self.facts.get("model") or getattr(self.args, "model", ""))

    @property
    def tokenizer(self):
        return self._tokenizer

    def check_usable(self) -> None:
        if self._llm is None or self._llm.errored:
            raise _died(self)

    def rows(self) -> list[tuple[str, Any]]:
        f = self.facts
        return [
            ("model", f.get("model")), ("dtype", f.get("dtype") or "unknown"), ("max_model_len", f.get("max_model_len")),
            ("tensor / pipeline parallel", f"{f.get('tensor_parallel_size')} / {f.get('pipeline_parallel_size')}"),
            ("device", f.get("device")),
            ("KV cache", f"{f['kv_cache_tokens']:,} tokens" if f.get("kv_cache_tokens") else "unknown"),
            ("loaded in", f"{self.load_seconds:.1f} s" if self.load_seconds else "-"),
            ("log", self.log_path),
        ]

    def sampling(self, base: Any = None, overrides: dict[str, Any] | None = None):
        """Sampling for this engine: the model's defaults, then ``base`` (dict or SamplingParams), then ``overrides``."""
        return build_params(base, overrides, self.default_sampling())

    def default_sampling(self) -> dict[str, Any]:
        """The model's own sampling defaults (its generation_config), as vLLM applies them."""
        if self._defaults is None:
            vllm_api = _vllm()
            self._defaults = vllm_api.default_sampling(self._llm) if self._llm is not None else {}
        return dict(self._defaults)

    # ---------------------------------------------------------------- prompts
    def chat_prompt(self, messages: Sequence[dict]) -> dict:
        """Apply the model's chat template; returns an engine prompt with token ids."""
        tok = self._tokenizer
        try:
            text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # no template, bad roles, ...
            raise RequestError(f"cannot apply the chat template of {self.model}: {exc}") from None
        return {"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text}

    def prepare(self, params: Any, stream: bool):
        """The engine's form of ``params`` for one run (a copy; the caller's object is left alone)."""
        vllm_api = _vllm()
        if isinstance(params, Pooling):
            return vllm_api.pooling_params(params.task, params.dimensions)
        if not isinstance(params, vllm_api.SamplingParams):
            params = self.sampling(params)
        if params.prompt_logprobs is not None and self.adapters.enabled and vllm_api.is_cpu_build():
            raise UsageError(PROMPT_LOGPROBS_ON_CPU)
        params = params.clone()
        params.output_kind = vllm_api.CUMULATIVE if stream else vllm_api.FINAL_ONLY
        return params

    def sends(self, items, params, run: Run) -> list[tuple[int, Any]]:
        """A batch that wants only final outputs goes as one coroutine (``_batch``); other generation (a stream,
        one prompt) is rendered in one call first (``vllm_api.render_batch``), as ``LLM.generate`` does. Pooling
        keeps vLLM's own per-request path."""
        vllm_api = _vllm()
        if isinstance(params, vllm_api.SamplingParams):
            if len(items) > 1 and params.output_kind == vllm_api.FINAL_ONLY:
                return [(0, self._batch(items, params, run))]
            items = vllm_api.render_batch(self._llm, items) or items  # vLLM 0.32 deprecates unrendered prompts
        return super().sends(items, params, run)

    async def _batch(self, prompts: list, params, run: Run) -> None:
        """Tokenize a batch a chunk at a time and add each request, then read each one's final output as it ends.

        That is what ``AsyncLLM.generate`` does for one request, without a coroutine and a task per request:
        on a big batch, front-end CPU that a small node's engine core gets back. Chunks let the engine start
        on the first prompts while the rest are tokenized, and let streams beside a huge batch go on. A
        chunk that cannot be tokenized at once (a prompt too long) goes prompt by prompt, so an error is told
        under its own prompt; the others go on. Cancelled (Ctrl-C), it aborts the requests still running.

        Outputs are read in prompt order, and every ``SWEEP_S`` that the first unread request keeps running the
        others are looked at too: a result that ends before an earlier prompt's goes to the caller (and the
        journal) within ``SWEEP_S``, so a kernel or engine that dies keeps it.
        """
        vllm_api = _vllm()
        llm, q, added = self._llm, run.q, []
        pending: deque = deque()
        try:
            for start in range(0, len(prompts), RENDER_CHUNK):
                chunk = prompts[start:start + RENDER_CHUNK]
                for i, prompt in enumerate(vllm_api.render_batch(llm, chunk) or chunk, start):
                    try:
                        lora = self._lora_request(run.loras[i])
                        added.append((i, await llm.add_request(run.rids[i], prompt, params, lora_request=lora)))
                        pending.append(added[-1])
                    except vllm_api.EngineDeadError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - this prompt's error, handed to the caller
                        q.put((i, PromptRejected(exc)))
                await asyncio.sleep(0)  # outputs and other runs' requests between chunks
            while pending:
                i, collector = pending[0]
                try:
                    out = collector.get_nowait()
                    if out is None:
                        timer = asyncio.timeout(SWEEP_S)
                        try:
                            async with timer:
                                out = await collector.get()
                        except TimeoutError:
                            if not timer.expired():
                                raise
                            pending = _sweep(pending, q)  # the head still runs: take what ended after it
                            continue
                except Exception as exc:  # noqa: BLE001 - handed to the caller (a cancel is no Exception)
                    q.put((i, exc))
                    pending.popleft()
                    continue
                q.put((i, out))
                if out.finished:
                    pending.popleft()
        except asyncio.CancelledError:
            with suppress_errors():
                await llm.abort([c.request_id for _, c in pending], internal=True)
            raise
        finally:
            for _, collector in added:
                collector.close()

    def _lora_request(self, lora):
        """vLLM's request for ``lora`` (None: the base model, or its zero adapter; see lora.BASE_NAME)."""
        vllm_api = _vllm()
        lora = self._base if lora is None else lora
        return vllm_api.lora_request(lora) if lora is not None else None

    def tokens_in_flight(self, run: Run) -> int | None:
        if self._llm is None:
            return None
        return _vllm().tokens_in_flight(self._llm, run.rid_set)

    def abort(self, run: Run, pending: list[str]) -> None:
        if self.alive:
            fut = asyncio.run_coroutine_threadsafe(self._llm.abort(pending), self.loop)
            with suppress_errors():
                fut.result(timeout=1.0)

    def translate(self, exc: BaseException) -> BaseException:
        vllm_api = _vllm()
        if isinstance(exc, VllmNotebookError):
            return exc
        if isinstance(exc, vllm_api.EngineDeadError) or (self._llm is not None and self._llm.errored):
            return _died(self)
        return request_error(first_line(exc))

    async def request(self, i: int, prompt, params, rid: str, q: queue.Queue, lora=None) -> None:
        vllm_api = _vllm()
        lora_request = self._lora_request(lora)
        if isinstance(params, vllm_api.PoolingParams):
            async for out in self._llm.encode(prompt, params, rid, lora_request=lora_request):
                q.put((i, Pooled(rid, vllm_api.pooled_vector(out), list(out.prompt_token_ids or ()), out.finished)))
            return
        async for out in self._llm.generate(prompt, params, rid, lora_request=lora_request):
            q.put((i, out))

    # ---------------------------------------------------------------- LoRA adapters
    async def add_lora(self, adapter) -> None:
        vllm_api = _vllm()
        try:
            await self._llm.add_lora(vllm_api.lora_request(adapter))
        except Exception as exc:  # noqa: BLE001 - vLLM's reason, in one line
            raise UsageError(f"cannot load adapter '{adapter.name}' from {adapter.path}: {first_line(exc)}") from None
        if self._base is None and vllm_api.is_cpu_build():  # see lora.BASE_NAME
            base = Adapter(BASE_NAME, await asyncio.to_thread(zero_adapter, adapter.path), BASE_ID)
            await self._llm.add_lora(vllm_api.lora_request(base))
            self._base = base

    async def remove_lora(self, adapter) -> None:
        await self._llm.remove_lora(adapter.id)

    # ---------------------------------------------------------------- sleep mode
    def can_sleep(self) -> bool:
        vllm_api = _vllm()
        return vllm_api.sleep_mode_enabled(self._llm)

    async def sleep(self, level: int) -> None:
        vllm_api = _vllm()
        await vllm_api.sleep(self._llm, level)

    async def wake(self, level: int) -> None:
        vllm_api = _vllm()
        await vllm_api.wake(self._llm, level)

    # ---------------------------------------------------------------- stop
    def close(self) -> None:
        """Shut vLLM down on the engine's loop; its processes are stopped if it takes long (``stop`` sweeps)."""
        self._closed = True
        llm, self._llm, self._tokenizer = self._llm, None, None
        if llm is None:
            return
        fut = asyncio.run_coroutine_threadsafe(_shutdown(llm), self.loop)
        try:
            fut.result(timeout=SHUTDOWN_GRACE_S)
        except TimeoutError:
            # vLLM has told its processes to stop and waits ~4 s for them (measured on CPU); nothing they
            # hold outlives them (memory, GPU memory; the /dev/shm segments are swept below): stop them now.
            procs.terminate_groups(self._groups, grace=0.3)
            with suppress_errors():
                fut.result(timeout=60)
        except Exception:  # noqa: BLE001 - a shutdown that failed: the groups are stopped below all the same
            pass
        del llm

    def stop(self) -> str:
        """Stop the engine's processes (what vLLM's shutdown left) and release their memory."""
        self._closed = True
        if self._sharing_cores:
            self._sharing_cores = False
            procs.share_cores_while(False)
        self._llm = self._tokenizer = None
        for pgid in self._groups:  # anything vLLM's shutdown left behind
            procs.stop_group(pgid)
        self._forget_folder()
        with suppress_errors():  # collects garbage (gc.collect) and frees cached device memory
            vllm_api = _vllm()
            vllm_api.free_memory()
        return f"unloaded engine '{self.name}' ({self.model})"

    def _forget_folder(self) -> None:
        """Remove the engine's private folder (sockets, rendezvous files) and the /dev/shm segments it left."""
        if self.tmp is not None:
            private.remove(self.tmp, since=self._started_at)
            procs.remove_at_exit(self.tmp, add=False)


async def _shutdown(llm) -> None:
    vllm_api = _vllm()
    vllm_api.stop_engine(llm)


def _dead_reason(engine: LocalBackend) -> str:
    lines = logs.root_cause(engine.log_path)
    return lines[-1] if lines else "its process exited"


def _died(engine: LocalBackend) -> EngineDiedError:
    return EngineDiedError(f"engine '{engine.name}' has died ({_dead_reason(engine)}); "
                           f"run %vllm_load again to restart it  (log: {engine.log_path})")


def _sweep(pending: deque, q: queue.Queue) -> deque:
    """Hand ``q`` every output that ``pending``'s requests have ready; the requests that have not ended."""
    left: deque = deque()
    for i, collector in pending:
        try:
            out = collector.get_nowait()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            q.put((i, exc))
            continue
        if out is not None:
            q.put((i, out))
            if out.finished:
                continue
        left.append((i, collector))
    return left
