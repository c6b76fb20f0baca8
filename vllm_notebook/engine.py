"""``Engine``: one vLLM ``AsyncLLM`` driven from a private event-loop thread.

Every public method is thread-safe and synchronous, so cells, widgets and user
threads can share one engine; their requests meet in vLLM's scheduler and are
batched there. Nothing here imports IPython; vLLM is imported on first load.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import gpus, logs, sleep_mode
from .errors import EngineDiedError, EngineStartError, NoEngineError, RequestError, UsageError, VllmNotebookError
from .generation import Generation
from .sleep_mode import SleepReport

_DONE = object()
_ids = itertools.count()
_ENGINES: dict[str, Engine] = {}
_registry_lock = threading.RLock()

Prompt = str | dict  # a text prompt, or {"prompt_token_ids": [...]}


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    aborted: int = 0
    running: int = 0


@dataclass
class _Run:
    """The state of one call to ``Engine.run``: its requests and their latest outputs."""

    rids: list[str]
    outputs: list[Any]
    q: queue.Queue = field(default_factory=queue.Queue)
    future: Any = None
    params: Any = None
    started: float = 0.0
    first_token_at: float | None = None
    done: bool = False


class Engine:
    """A running vLLM engine. Create with ``vllm_notebook.load``."""

    def __init__(self, name: str, args: Any, key: tuple, log_path: str, plan: dict | None = None):
        self.name = name
        self.args = args
        self.key = key
        self.log_path = str(log_path)
        self.plan = plan or {}
        self.facts: dict[str, Any] = {}
        self.stats = Stats()
        self.usage: dict[str, Any] = {}  # the scheduler's latest KV-cache use and queue lengths
        self.load_seconds: float | None = None
        self._llm = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._tokenizer = None
        self._defaults: dict[str, Any] | None = None
        self._groups: list[int] = []
        self.ray_cluster = None  # the Ray cluster a multi-node engine runs on
        self._announced_in: int | None = None
        self._asleep = 0  # the sleep level, 0 when awake

    # ---------------------------------------------------------------- start
    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"vllm-notebook:{self.name}", daemon=True
        )
        self._thread.start()

    def _start(self, progress: Callable[[str, float], None] | None = None) -> None:
        self._start_loop()
        from . import procs

        groups_before = set(procs.started_groups())
        t0 = time.monotonic()
        fut = asyncio.run_coroutine_threadsafe(self._create(), self._loop)
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
            with _suppress():
                fut.result(timeout=30)
            self._stop_loop()
            raise VllmNotebookError("load interrupted; the half-started engine was stopped") from None
        except BaseException as exc:
            self._stop_loop()
            if isinstance(exc, VllmNotebookError):
                raise
            lines = logs.root_cause(self.log_path, exc)
            msg = "; ".join(lines) or f"{type(exc).__name__}: {exc}"
            raise EngineStartError(f"engine failed to start: {msg}  (full log: {self.log_path})") from None
        self.load_seconds = time.monotonic() - t0
        self._groups = [g for g in procs.started_groups() if g not in groups_before]

    async def _create(self) -> None:
        from .procs import own_process_group

        with logs.capture_output(self.log_path), own_process_group():
            from . import _vllm

            logs.route_vllm_logs(self.log_path, _vllm.vllm_loggers())
            try:
                self._llm = _vllm.start_engine(self.args, self.usage)
            finally:
                logs.route_vllm_logs(self.log_path, _vllm.vllm_loggers())
            self._tokenizer = _vllm.tokenizer(self._llm)
            self.facts = _vllm.engine_facts(self._llm)

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

    def _check(self) -> None:
        """Raise a one-line error unless the engine can take requests now."""
        self._check_alive()
        if self._asleep:
            raise UsageError(f"engine '{self.name}' is asleep (level {self._asleep}): "
                             "wake it with %vllm_wake (or .wake()) first")

    def _check_alive(self) -> None:
        if self._closed or self._llm is None:
            raise NoEngineError(f"engine '{self.name}' was unloaded; load it again with %vllm_load")
        if self._llm.errored:
            raise EngineDiedError(
                f"engine '{self.name}' has died ({_dead_reason(self)}); "
                f"run %vllm_load again to restart it  (log: {self.log_path})"
            )

    @property
    def state(self) -> str:
        """``running``, ``asleep (level N)``, ``unloaded`` or ``dead``."""
        if self._closed:
            return "unloaded"
        if not self.alive:
            return "dead"
        return f"asleep (level {self._asleep})" if self._asleep else "running"

    def __repr__(self) -> str:
        return f"<Engine {self.name!r} model={self.model!r} {self.state}>"

    def _repr_markdown_(self) -> str:
        from .render import engine_markdown

        return engine_markdown(self)

    def _ipython_display_(self) -> None:
        from .render import show_engine

        show_engine(self)

    def params(self, base: Any = None, overrides: dict[str, Any] | None = None):
        """Sampling for this engine: the model's defaults, then ``base`` (dict or SamplingParams), then ``overrides``."""
        from .sampling import build_params

        return build_params(base, overrides, self.default_sampling())

    def default_sampling(self) -> dict[str, Any]:
        """The model's own sampling defaults (its generation_config), as vLLM applies them."""
        if self._defaults is None:
            from . import _vllm

            self._defaults = _vllm.default_sampling(self._llm) if self._llm is not None else {}
        return dict(self._defaults)

    # ---------------------------------------------------------------- prompts
    def chat_prompt(self, messages: Sequence[dict]) -> dict:
        """Apply the model's chat template; returns an engine prompt with token ids."""
        self._check()
        tok = self._tokenizer
        try:
            text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # no template, bad roles, ...
            raise RequestError(f"cannot apply the chat template of {self.model}: {exc}") from None
        return {"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text}

    # ---------------------------------------------------------------- generation
    def run(
        self,
        prompts: Sequence[Prompt],
        params: Any,
        *,
        stream: bool = False,
        on_output: Callable[[int, Any], None] | None = None,
        stop_event: threading.Event | None = None,
    ) -> Generation:
        """Submit all prompts at once and wait for them.

        ``on_output(index, request_output)`` is called in the calling thread for
        every update (each token when ``stream``; only final outputs otherwise).
        Ctrl-C (KeyboardInterrupt), or setting ``stop_event`` from another thread,
        aborts the requests within a second and returns the partial result with
        ``interrupted=True``.
        """
        run = self._submit(prompts, params, stream=stream)
        interrupted = False
        try:
            for i, out in self._events(run, stop_event=stop_event):
                if on_output is not None:
                    on_output(i, out)
        except (KeyboardInterrupt, _Stopped):
            interrupted = True
            self._stop_run(run)
        except BaseException:
            self._stop_run(run)
            self._result(run, prompts, interrupted=True)
            raise
        return self._result(run, prompts, interrupted)

    def stream(self, prompt: Prompt, params: Any = None, **sampling) -> Iterator[str]:
        """Yield text deltas of one completion as they are generated.

        Closing the iterator (or breaking out of the loop) aborts the request.
        """
        run = self._submit([prompt], self.params(params, sampling), stream=True)
        seen = 0
        try:
            for _, out in self._events(run):
                text = out.outputs[0].text
                if len(text) > seen:
                    yield text[seen:]
                    seen = len(text)
        finally:
            closed_early = not run.done
            if closed_early:
                self._stop_run(run)
            self._result(run, [prompt], interrupted=closed_early)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: Any = None, **sampling) -> Generation:
        """Generate for one prompt or a batch (submitted at once). Sampling as keyword arguments."""
        return self.run(_as_batch(prompts), self.params(params, sampling))

    def chat(self, messages: Sequence[dict], params: Any = None, **sampling) -> Generation:
        """One assistant reply to ``messages`` (OpenAI-style role/content dicts)."""
        return self.run([self.chat_prompt(messages)], self.params(params, sampling))

    def _prepare(self, params: Any, stream: bool):
        """The engine's form of ``params`` for one run (a copy; the caller's object is left alone)."""
        from . import _vllm

        if not isinstance(params, _vllm.SamplingParams):
            params = self.params(params)
        params = params.clone()
        params.output_kind = _vllm.CUMULATIVE if stream else _vllm.FINAL_ONLY
        return params

    def _submit(self, prompts: Sequence[Prompt], params: Any, *, stream: bool) -> _Run:
        self._check()
        params = self._prepare(params, stream)
        items = [_engine_prompt(p) for p in prompts]
        run = _Run(rids=[f"{self.name}-{next(_ids)}" for _ in items], outputs=[None] * len(items))
        run.params = params
        with self._lock:
            self.stats.running += len(items)
        run.started = time.monotonic()
        run.future = asyncio.run_coroutine_threadsafe(self._drive(items, params, run), self._loop)
        return run

    def _events(self, run: _Run, deadline: float | None = None,
                stop_event: threading.Event | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output)`` until the run ends (or ``deadline``); one-line errors on failure."""
        while True:
            if stop_event is not None and stop_event.is_set():
                raise _Stopped
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            else:
                timeout = 0.05 if stop_event is not None else None
            try:
                item = run.q.get(timeout=timeout)
            except queue.Empty:
                if deadline is not None:
                    return
                continue
            if item is _DONE:
                run.done = True
                return
            i, out = item
            if isinstance(out, BaseException):
                raise self._translate(out) from None
            if run.first_token_at is None:
                run.first_token_at = time.monotonic()
            run.outputs[i] = out
            yield i, out

    def _stop_run(self, run: _Run) -> None:
        """Abort what is still running and collect the final (partial) outputs, within ~1 s."""
        pending = [r for r, o in zip(run.rids, run.outputs) if o is None or not o.finished]
        if pending:
            self._abort(run, pending)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                for _ in self._events(run, deadline):
                    pass
                break
            except KeyboardInterrupt:  # a second Ctrl-C while cleaning up
                continue
            except VllmNotebookError:
                continue
        if not run.done:
            run.future.cancel()

    def _abort(self, run: _Run, pending: list[str]) -> None:
        if self.alive:
            fut = asyncio.run_coroutine_threadsafe(self._llm.abort(pending), self._loop)
            with _suppress():
                fut.result(timeout=1.0)

    def _translate(self, exc: BaseException) -> BaseException:
        return _translate(self, exc)

    def _result(self, run: _Run, prompts: Sequence[Prompt], interrupted: bool) -> Generation:
        elapsed = time.monotonic() - run.started
        ttft = (run.first_token_at - run.started) if run.first_token_at else None
        unfinished = sum(1 for o in run.outputs if o is None or not o.finished or _aborted(o))
        gen = Generation(
            prompts=[_prompt_text(p) for p in prompts], outputs=run.outputs, params=run.params,
            engine=self.name, elapsed=elapsed, ttft=ttft, interrupted=interrupted,
            aborted=unfinished if interrupted else 0,
        )
        with self._lock:
            self.stats.running -= len(run.rids)
            self.stats.requests += len(run.rids)
            self.stats.aborted += gen.aborted
            for o in run.outputs:
                if o is not None:
                    self.stats.prompt_tokens += len(o.prompt_token_ids or [])
                    self.stats.output_tokens += sum(len(c.token_ids) for c in o.outputs)
        return gen

    async def _drive(self, items, params, run: _Run) -> None:
        """Run every request of ``run`` concurrently; outputs and errors go to ``run.q``, then ``_DONE``."""
        q = run.q

        async def one(i: int, prompt, rid: str) -> None:
            try:
                await self._request(i, prompt, params, rid, q)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                q.put((i, exc))

        try:
            await asyncio.gather(*(one(i, p, r) for i, (p, r) in enumerate(zip(items, run.rids))))
        finally:
            q.put(_DONE)

    async def _request(self, i: int, prompt, params, rid: str, q: queue.Queue) -> None:
        async for out in self._llm.generate(prompt, params, rid):
            q.put((i, out))

    # ---------------------------------------------------------------- sleep mode
    @property
    def asleep(self) -> int:
        """0 when awake, else the level the engine sleeps at."""
        return self._asleep

    def sleep(self, level: int = 1) -> SleepReport:
        """Free the GPU and keep the engine (loaded with ``--enable-sleep-mode``).

        Level 1 moves the weights to CPU memory and drops the KV cache; level 2
        drops the weights too (``wake`` reloads them from disk). Requests are
        refused until ``wake``.
        """
        sleep_mode.check_level(level)
        self._check_alive()
        if self._asleep:
            raise UsageError(f"engine '{self.name}' is already asleep (level {self._asleep})")
        if not self._can_sleep():
            raise sleep_mode.not_enabled(self.name)
        if self.stats.running:
            raise UsageError(f"engine '{self.name}' has {self.stats.running} request(s) running: "
                             "let them finish (or stop them) before it sleeps")
        before, t0 = gpus.used_mib(), time.monotonic()
        self._call(self._sleep(level))
        self._asleep = level
        return SleepReport(self.name, "sleep", level, time.monotonic() - t0, before, gpus.used_mib())

    def wake(self) -> SleepReport:
        """Bring a sleeping engine back: its GPU memory, then (level 2) its weights from disk."""
        self._check_alive()
        if not self._asleep:
            raise UsageError(f"engine '{self.name}' is awake already")
        level, before, t0 = self._asleep, gpus.used_mib(), time.monotonic()
        self._call(self._wake(level))
        self._asleep = 0
        return SleepReport(self.name, "wake", level, time.monotonic() - t0, before, gpus.used_mib())

    def _can_sleep(self) -> bool:
        from . import _vllm

        return _vllm.sleep_mode_enabled(self._llm)

    async def _sleep(self, level: int) -> None:
        from . import _vllm

        await _vllm.sleep(self._llm, level)

    async def _wake(self, level: int) -> None:
        from . import _vllm

        await _vllm.wake(self._llm, level)

    def _call(self, coro, timeout: float | None = None):
        """Run ``coro`` on the engine's loop and wait; Ctrl-C waits too (a half-done sleep is worse)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        while True:
            try:
                return fut.result(timeout=timeout)
            except KeyboardInterrupt:
                print(f"vllm-notebook: engine '{self.name}' is finishing a sleep or wake; waiting for it")
            except BaseException as exc:
                raise self._translate(exc) from None

    # ---------------------------------------------------------------- stop
    def _at_exit(self) -> None:
        """At kernel exit: stop what lives only as long as this kernel."""
        self.unload()

    def unload(self) -> str | None:
        """Stop the engine and its processes and release their memory."""
        with _registry_lock:
            if _ENGINES.get(self.name) is self:
                del _ENGINES[self.name]
        if self._closed:
            return
        self._closed = True
        llm, self._llm, self._tokenizer = self._llm, None, None
        if llm is not None and self._loop is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(_shutdown(llm), self._loop)
            with _suppress():
                fut.result(timeout=60)
        del llm
        self._stop_loop()
        from .procs import stop_group

        for pgid in self._groups:  # anything vLLM's shutdown left behind
            stop_group(pgid)
        if self.ray_cluster is not None and self.ray_cluster.owned and not _uses_ray(exclude=self):
            from . import ray_cluster

            ray_cluster.down()
        gc.collect()
        with _suppress():
            from . import _vllm

            _vllm.free_memory()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            if not loop.is_running():
                loop.close()


async def _shutdown(llm) -> None:
    from . import _vllm

    _vllm.stop_engine(llm)


class _Stopped(BaseException):
    """A run's stop_event was set (the panel's Stop button)."""


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and not issubclass(exc[0], KeyboardInterrupt | SystemExit)


def _as_batch(prompts) -> list:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, list | tuple) or hasattr(prompts, "tolist"):
        batch = list(prompts.tolist() if hasattr(prompts, "tolist") else prompts)
        if batch:
            return batch
        raise UsageError("no prompts: the list is empty")
    raise UsageError(f"prompts must be a str, a list of str, or {{'prompt_token_ids': [...]}}, "
                     f"not {type(prompts).__name__}")


def _engine_prompt(p: Prompt):
    if not isinstance(p, str | dict):
        raise UsageError(f"each prompt must be a str or {{'prompt_token_ids': [...]}}, not {type(p).__name__}")
    if isinstance(p, dict) and "prompt_token_ids" in p:
        return {"prompt_token_ids": list(p["prompt_token_ids"])}
    return p


def _prompt_text(p: Prompt) -> str:
    if isinstance(p, dict):
        return str(p.get("prompt", p.get("prompt_token_ids", "")))
    return p


def _aborted(o) -> bool:
    return any(c.finish_reason == "abort" for c in o.outputs)


def _dead_reason(engine: Engine) -> str:
    lines = logs.root_cause(engine.log_path)
    return lines[-1] if lines else "its process exited"


def _translate(engine: Engine, exc: BaseException) -> BaseException:
    from . import _vllm

    if isinstance(exc, VllmNotebookError):
        return exc
    if isinstance(exc, _vllm.EngineDeadError) or (engine._llm is not None and engine._llm.errored):
        return EngineDiedError(
            f"engine '{engine.name}' has died ({_dead_reason(engine)}); "
            f"run %vllm_load again to restart it  (log: {engine.log_path})"
        )
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return request_error(msg)


def request_error(msg: str) -> RequestError:
    """A rejected request, with what to do when the prompt is too long."""
    if "maximum context length" in msg or "maximum model length" in msg:
        msg += " — shorten the prompt, or load with a larger --max-model-len"
    return RequestError(msg)


# -------------------------------------------------------------------- registry
def engines() -> dict[str, Engine]:
    """The loaded engines, by name."""
    with _registry_lock:
        return dict(_ENGINES)


def get_engine(name: str | None = None) -> Engine:
    """The engine called ``name``; with no name, the only one (or ``default``)."""
    with _registry_lock:
        if name is None:
            if len(_ENGINES) == 1:
                return next(iter(_ENGINES.values()))
            name = "default"
        eng = _ENGINES.get(name)
    if eng is None:
        loaded = ", ".join(sorted(_ENGINES)) or "none"
        hint = "load one with %vllm_load MODEL" if not _ENGINES else f"loaded: {loaded}; pick one with --name"
        raise NoEngineError(f"no engine named '{name}' — {hint}")
    return eng


def unload_all() -> None:
    for eng in list(engines().values()):
        eng.unload()


def _uses_ray(exclude: Engine) -> bool:
    return any(e.ray_cluster is not None for e in engines().values() if e is not exclude)


def shutdown() -> None:
    """At exit (kernel shutdown, %unload_ext): every in-kernel engine (servers live on), then our Ray cluster."""
    for eng in list(engines().values()):
        eng._at_exit()
    import sys

    if "vllm_notebook.ray_cluster" in sys.modules:
        sys.modules["vllm_notebook.ray_cluster"].down()


def _register(engine: Engine) -> None:
    with _registry_lock:
        _ENGINES[engine.name] = engine


atexit.register(shutdown)
