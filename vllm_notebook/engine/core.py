"""``Engine``: one engine, whatever runs it; the request machinery every back-end shares.

An engine runs prompts on vLLM and streams their outputs back. Everything above
(magics, the panel, status, batches, chat) talks to this class only. What runs
the engine is its back-end (``vllm_notebook.backends``): vLLM in this kernel, a
server, or a server in a Slurm job, all behind one contract (``Backend``).

Every public method is thread-safe and synchronous, so cells, widgets and user
threads can share one engine: requests go out from the engine's private
event-loop thread and meet in vLLM's scheduler, which batches them. The back-end
supplies how one request is sent, aborted and how its errors read; this class
does the rest: submitting a batch at once, streaming, Ctrl-C and Stop, results,
the journal, statistics, sleep and wake. Nothing here imports IPython or vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import NoEngineError, RequestError, UsageError, VllmNotebookError
from . import gpus, journal, registry
from . import sleep as sleep_mode
from .generation import Generation
from .outputs import from_record, merged
from .pooling import Pooling
from .requests import (
    Progress,
    Prompt,
    PromptRejected,
    Run,
    aborted,
    as_batch,
    engine_prompt,
    first_line,
    prompt_text,
    too_long,
)
from .sleep import SleepReport
from .tasks import TaskMethods

if TYPE_CHECKING:  # pragma: no cover
    from ..backends.base import Backend

_DONE = object()
_ids = itertools.count()
PROGRESS_S = 0.2  # how often a batch's progress is told (``Engine.run``'s ``on_progress``)


@dataclass
class Stats:
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    aborted: int = 0
    running: int = 0
    last_tokens_per_s: float | None = None  # output tokens per second of the last run that made any


class Engine(TaskMethods):
    """A running vLLM engine, in this kernel, behind a server or in a Slurm job (its ``backend``).

    Create one with ``vllm_notebook.load`` (or ``attach``, ``submit``)."""

    def __init__(self, name: str, backend: Backend):
        self.name = name
        self.backend = backend
        backend.name = name
        self.stats = Stats()
        self.on_unload: list[Callable[[Engine], None]] = []  # run after the engine has stopped
        self.announced_in: int | None = None  # the cell that loaded it (its summary is shown there)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._asleep = 0  # the sleep level, 0 when awake

    # ---------------------------------------------------------------- what the back-end knows
    @property
    def kind(self) -> str:
        """What runs the engine: ``local`` (this kernel), ``server``, ``slurm``, or ``replicas`` (several of one
        kind, as one)."""
        return self.backend.kind

    @property
    def key(self) -> tuple:
        """What identifies the configuration: a re-run of the same load reuses the engine."""
        return self.backend.key

    @property
    def facts(self) -> dict[str, Any]:
        return self.backend.facts

    @property
    def plan(self) -> dict[str, Any]:
        return self.backend.plan

    @property
    def usage(self) -> dict[str, Any]:
        """The scheduler's latest KV-cache use and queue lengths."""
        return self.backend.usage

    @property
    def adapters(self):
        """The LoRA adapters requests can name (``lora=``)."""
        return self.backend.adapters

    @property
    def log_path(self) -> str:
        return self.backend.log_path

    @property
    def load_seconds(self) -> float | None:
        return self.backend.load_seconds

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def owned(self) -> bool:
        """Started by vllm-notebook, so ``unload`` stops it (an attached server is only detached)."""
        return self.backend.owned

    @property
    def tokenizer(self):
        """The model's tokenizer where it lives in this process (in-kernel engines), else None."""
        return self.backend.tokenizer

    @property
    def closed(self) -> bool:
        """Unloaded or detached: this kernel no longer uses it."""
        return self._closed

    @property
    def alive(self) -> bool:
        """The engine can answer (it may be asleep)."""
        return not self._closed and self.backend.alive

    def params(self, base: Any = None, overrides: dict[str, Any] | None = None) -> Any:
        """Sampling for this engine: the model's defaults, then ``base`` (dict or SamplingParams), then ``overrides``."""
        return self.backend.sampling(base, overrides)

    def default_sampling(self) -> dict[str, Any]:
        """The model's own sampling defaults, as the engine applies them."""
        return self.backend.default_sampling()

    def chat_prompt(self, messages: Sequence[dict]) -> dict:
        """An engine prompt for one assistant reply to ``messages``."""
        self._check()
        return self.backend.chat_prompt(messages)

    def refresh_usage(self) -> None:
        """Update ``usage`` (KV-cache use, queue lengths) where the back-end must ask for it."""
        if not self._closed:
            self.backend.refresh_usage()

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        """``text`` as the model's tokens (``special``: with the tokens the tokenizer adds, such as BOS)."""
        self._check()
        return self.backend.token_ids(text, special)

    # ---------------------------------------------------------------- start and stop
    def start(self, progress: Callable[[str, float], None] | None = None) -> Engine:
        """Start the event loop and the back-end on it (``progress(phase, seconds)`` while it loads)."""
        self._start_loop()
        self.backend.loop = self._loop
        try:
            self.backend.start(progress)
        except BaseException:
            self._stop_loop()
            raise
        self._asleep = self.backend.sleeping_at()
        return self

    def unload(self) -> str:
        """Stop the engine (for a server we did not start, detach); returns what was done."""
        registry.unregister(self)
        if self._closed:
            return f"engine '{self.name}' was unloaded already"
        self._close()
        said = self.backend.stop()
        for callback in self.on_unload:  # e.g. stop the Ray cluster started for this engine
            callback(self)
        return said

    def detach(self) -> str:
        """Stop using the engine from this kernel; a server or a job goes on (an in-kernel engine unloads)."""
        if not self.backend.outlives_kernel:
            return self.unload()
        registry.unregister(self)
        self._close()
        return self.backend.detached()

    def close_at_exit(self) -> None:
        """At kernel exit: stop what lives only as long as this kernel (servers and jobs outlive it)."""
        if self.backend.outlives_kernel:
            registry.unregister(self)
            self._close()
        else:
            self.unload()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._loop.is_running():
            self.backend.close()
        self._stop_loop()

    # ---------------------------------------------------------------- state
    def _check_usable(self) -> None:
        """Raise a one-line error if the engine was unloaded or has died."""
        if self._closed:
            raise NoEngineError(f"engine '{self.name}' was unloaded; load it again with %vllm_load")
        self.backend.check_usable()

    def _check(self) -> None:
        """Raise a one-line error unless the engine can take requests now."""
        self._check_usable()
        if self._asleep:
            raise UsageError(f"engine '{self.name}' is asleep (level {self._asleep}): "
                             "wake it with %vllm_wake (or .wake()) first")

    @property
    def state(self) -> str:
        """``running``, ``asleep (level N)``, ``unloaded`` or ``dead`` (or a job's own state)."""
        if self._closed:
            return "unloaded"
        own = self.backend.state()
        if own is not None:
            return own
        if not self.alive:
            return "dead"
        return f"asleep (level {self._asleep})" if self._asleep else "running"

    def __repr__(self) -> str:
        return f"<Engine {self.name!r} ({self.kind}) model={self.model!r} {self.state}>"

    def rows(self) -> list[tuple[str, Any]]:
        """What the engine is, as (label, value) rows: its back-end's."""
        return self.backend.rows()

    def _repr_markdown_(self) -> str:
        body = "\n".join(f"| {k} | `{str(v).replace('`', chr(39))}` |" for k, v in self.rows())
        return f"**{self.backend.title()} `{self.name}`** ({self.state})\n\n| | |\n|---|---|\n{body}\n"

    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"vllm-notebook:{self.name}", daemon=True
        )
        self._thread.start()

    # ---------------------------------------------------------------- generation
    def run(
        self,
        prompts: Sequence[Prompt],
        params: Any,
        *,
        stream: bool = False,
        on_output: Callable[[int, Any], None] | None = None,
        stop_event: threading.Event | None = None,
        resume: bool | None = None,
        journal_results: bool = True,
        lora: str | Sequence[str | None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Generation:
        """Submit all prompts at once and wait for them.

        ``on_output(index, request_output)`` is called in the calling thread for
        every update (each token when ``stream``; only final outputs otherwise).
        Ctrl-C (KeyboardInterrupt), or setting ``stop_event`` from another thread,
        aborts the requests within a second and returns the partial result with
        ``interrupted=True``.

        Each finished result is appended to the journal (unless ``journal_results``
        is False or the journal is off). ``resume`` takes results of the same model,
        flags, sampling and prompt from the journal instead of generating them again
        (greedy ones, or sampled with a seed); None means "for batches".

        ``lora``: the name of a LoRA adapter for every prompt, or one name (None: the base model) per prompt.

        ``on_progress(Progress)`` is called in the calling thread about five times a second while the run goes on,
        with the tokens made so far (also while no output has come back, where the back-end can count them).
        """
        adapters = self.adapters.for_prompts(lora, len(prompts))
        record = self._record(params, adapters)
        book = journal.current() if journal_results else None
        keys, restored = self._from_journal(book, prompts, adapters, record,
                                            len(prompts) > 1 if resume is None else resume)
        record["reused"] = len(restored)
        todo = [i for i in range(len(prompts)) if i not in restored]
        if on_output is not None:
            for i in sorted(restored):
                on_output(i, restored[i])
        if not todo:
            return self._merged(None, prompts, todo, restored, record, interrupted=False)
        run = self._submit([prompts[i] for i in todo], params, stream=stream, loras=[adapters[i] for i in todo])
        if book is not None:
            self._journaled(run, book, record, [keys[i] for i in todo], [prompts[i] for i in todo])
        interrupted = False
        tick = self._progress_ticker(run, len(prompts), restored, on_progress) if on_progress else None
        try:
            with _ctrl_c_flag() as ctrl_c:
                for j, out in self._events(run, stop_event=_AnyOf(stop_event, ctrl_c), keep_going=len(todo) > 1,
                                           tick=tick):
                    if on_output is not None:
                        on_output(todo[j], out)
            if tick is not None:
                tick(final=True)
        except (KeyboardInterrupt, _Stopped):
            interrupted = True
            self._stop_run(run)
        except BaseException:
            self._stop_run(run)
            self._result(run, [prompts[i] for i in todo], interrupted=True)
            raise
        if run.errors and len(run.errors) == len(todo) and not restored:  # nothing came back: the error itself
            self._result(run, [prompts[i] for i in todo], interrupted=False)
            first = min(run.errors)
            raise RequestError(f"every prompt failed; prompt {first}: {run.errors[first]}")
        return self._merged(run, prompts, todo, restored, record, interrupted)

    def _progress_ticker(self, run: Run, prompts: int, restored: dict[int, Any],
                         on_progress: Callable[[Progress], None]) -> Callable[..., None]:
        """A function ``_events`` calls while it waits: ``on_progress`` at most every ``PROGRESS_S``."""
        base_tokens = sum(len(c.token_ids) for o in restored.values() for c in o.outputs)
        next_at = 0.0

        def tick(final: bool = False) -> None:
            nonlocal next_at
            now = time.monotonic()
            if now < next_at and not final:
                return
            next_at = now + PROGRESS_S
            done_tokens = base_tokens + run.finished_tokens
            flying = None if final else self.backend.tokens_in_flight(run)
            on_progress(Progress(prompts=prompts, done=len(restored) + run.finished, done_tokens=done_tokens,
                                 tokens=done_tokens + (flying or 0), elapsed=now - run.started, final=final))
        return tick

    def _record(self, params: Any, adapters: list) -> dict[str, Any]:
        """The run record of ``params`` on this engine, with the adapters the prompts use."""
        record = self.run_record(params)
        if any(adapters):
            record["lora"] = sorted({a.name for a in adapters if a}) if len(set(adapters)) > 1 else adapters[0].name
        return record

    def _journaled(self, run: Run, book, record: dict, keys: list[str], prompts: Sequence[Prompt]) -> None:
        """Append ``run``'s record to ``book``; ``_events`` then appends each result as it finishes."""
        try:
            book.append({"kind": "run", **record})
        except (OSError, VllmNotebookError) as exc:  # the run goes on, unjournaled
            _not_journaled(run, exc)
            return
        run.book, run.run_id = book, record["run"]
        run.keys, run.texts = keys, [prompt_text(p) for p in prompts]

    def _from_journal(self, book, prompts, adapters, record: dict, resume: bool) -> tuple[list[str], dict[int, Any]]:
        """Each prompt's journal key, and the finished results the journal holds for them (when resuming)."""
        if book is None:
            return [], {}
        identity = {k: record.get(k) for k in ("model", "revision", "flags")}
        keys = [journal.result_key({**identity, "lora": a.as_dict()} if a else identity, record["sampling"],
                                   engine_prompt(p)) for p, a in zip(prompts, adapters)]
        if not (resume and journal.reusable(record["sampling"])):
            return keys, {}
        try:
            found = book.lookup(keys, run={k: record.get(k) for k in ("model", "revision", "flags", "sampling")})
        except VllmNotebookError as exc:  # the batch runs whole; appending will tell the same in its line
            print(f"vllm-notebook: nothing is resumed: {first_line(exc)}")
            return keys, {}
        return keys, {i: from_record(f"{self.name}-journal-{i}", prompt_text(p), found[k])
                      for i, (p, k) in enumerate(zip(prompts, keys)) if k in found}

    def _merged(self, run: Run | None, prompts, todo: list[int], restored: dict[int, Any], record: dict,
                interrupted: bool) -> Generation:
        """The whole result in the prompts' order: what ran now and what the journal gave back."""
        if run is not None and not restored:
            gen = self._result(run, prompts, interrupted)
        else:
            sent = self._result(run, [prompts[i] for i in todo], interrupted) if run is not None else None
            outputs = [restored.get(i) for i in range(len(prompts))]
            for j, i in enumerate(todo):
                outputs[i] = sent.outputs[j]
            gen = Generation(prompts=[prompt_text(p) for p in prompts], outputs=outputs,
                             params=run.params if run else record.get("sampling"),
                             engine=self.name, elapsed=sent.metrics["elapsed_s"] if sent else 0.0,
                             ttft=sent.metrics["ttft_s"] if sent else None, interrupted=interrupted,
                             aborted=sent.aborted if sent else 0, reused=list(restored),
                             errors={todo[j]: e for j, e in sent.errors.items()} if sent else None)
        gen.provenance = record
        if run is not None:
            gen.notes = list(run.notes)
        return gen

    # ---------------------------------------------------------------- provenance
    @property
    def provenance(self) -> dict[str, Any]:
        """What produces this engine's results: model, revision, versions, engine flags, node and job."""
        b = self.backend
        return {"engine": self.name, "backend": b.kind, **b.identity(), "vllm": b.vllm_version,
                "vllm_notebook": __version__, **b.where()}

    def run_record(self, params: Any) -> dict[str, Any]:
        """The provenance of one run with ``params``: the engine's, the sampling settings and seed, the time."""
        sampling = self.backend.sampling_record(params)
        return {"run": journal.new_run_id(), "time": time.time(), **self.provenance, "sampling": sampling,
                "seed": sampling.get("seed")}

    def stream(self, prompt: Prompt, params: Any = None, *, lora: str | None = None, **sampling) -> Iterator[str]:
        """Yield text deltas of one completion as they are generated.

        Closing the iterator (or breaking out of the loop) aborts the request. A finished completion is
        journaled like ``run``'s results (and a batch resumes from it); a stream is always generated anew.
        """
        params, adapters = self.params(params, sampling), self.adapters.for_prompts(lora, 1)
        run = self._submit([prompt], params, stream=True, loras=adapters)
        book = journal.current()
        if book is not None:
            record = self._record(params, adapters)
            self._journaled(run, book, {**record, "reused": 0},
                            self._from_journal(book, [prompt], adapters, record, resume=False)[0], [prompt])
        shown = ""
        try:
            for _, out in self._events(run):
                text = out.outputs[0].text
                if len(text) > len(shown) and text.startswith(shown):
                    yield text[len(shown):]
                    shown = text
                elif not shown.startswith(text):  # sent again whole (cut by a Slurm job's end), a different text
                    raise RequestError(f"engine '{self.name}': the request was sent again and its new text "
                                       "differs from what was streamed; run it again")
        finally:
            closed_early = not run.done
            if closed_early:
                self._stop_run(run)
            self._result(run, [prompt], interrupted=closed_early)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: Any = None, *,
                 lora: str | Sequence[str | None] | None = None, **sampling) -> Generation:
        """Generate for one prompt or a batch (submitted at once). Sampling as keyword arguments;
        ``lora`` names an adapter (or one per prompt)."""
        return self.run(as_batch(prompts), self.params(params, sampling), lora=lora)

    def chat(self, messages: str | Sequence[dict], params: Any = None, *, lora: str | None = None,
             **sampling) -> Generation:
        """One assistant reply to ``messages`` (OpenAI-style role/content dicts; a string is one user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.run([self.chat_prompt(messages)], self.params(params, sampling), lora=lora)

    def _submit(self, prompts: Sequence[Prompt], params: Any, *, stream: bool, loras: list | None = None) -> Run:
        self._check()
        self._check_runner(pooling=isinstance(params, Pooling))
        params = self.backend.prepare(params, stream)
        items = [engine_prompt(p) for p in prompts]
        run = Run(rids=[f"{self.name}-{next(_ids)}" for _ in items], outputs=[None] * len(items),
                  loras=list(loras) if loras else [None] * len(items))
        run.params = params
        run.texts = [prompt_text(p) if isinstance(p, str) else "" for p in prompts]
        with self._lock:
            self.stats.running += len(items)
        run.started = time.monotonic()
        run.future = asyncio.run_coroutine_threadsafe(self._drive(items, params, run), self._loop)
        return run

    def _events(self, run: Run, deadline: float | None = None, stop_event: threading.Event | None = None,
                keep_going: bool = False, tick: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output)`` until the run ends (or ``deadline``); one-line errors on failure. With
        ``keep_going`` a request's own error (a prompt too long, refused) goes to ``run.errors`` and the others
        go on; an engine's death still raises."""
        while True:
            if stop_event is not None and stop_event.is_set():
                raise _Stopped
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            else:
                timeout = 0.05 if stop_event is not None else None
            if tick is not None:
                tick()
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
                rejected = isinstance(out, PromptRejected)
                error = self.backend.translate(out.error if rejected else out)
                if run.texts and i < len(run.texts):  # vLLM counts characters first: told in tokens
                    error = too_long(error, lambda: len(self.token_ids(run.texts[i] or _no_text())))
                if not (keep_going and rejected and isinstance(error, RequestError)):
                    raise error from None
                run.errors[i] = str(error)  # this prompt's alone: the others go on (run() raises if all fail)
                continue
            if run.first_token_at is None:
                run.first_token_at = time.monotonic()
            run.outputs[i] = out = merged(run.outputs[i], out)
            if out.finished and not aborted(out):
                run.finished += 1
                run.finished_tokens += sum(len(c.token_ids) for c in out.outputs)
                if run.book is not None:
                    self._journal(run, i, out)
            yield i, out

    def _journal(self, run: Run, i: int, out: Any) -> None:
        """Append one finished result to the journal (a journal that cannot be written is told once)."""
        try:
            run.book.append({"kind": "result", "run": run.run_id, "key": run.keys[i], "time": time.time(),
                             "prompt": run.texts[i], "prompt_token_ids": list(out.prompt_token_ids or ()),
                             "outputs": journal.output_record(out),
                             "elapsed_s": round(time.monotonic() - run.started, 4)})
        except (OSError, VllmNotebookError) as exc:
            _not_journaled(run, exc)

    def _stop_run(self, run: Run) -> None:
        """Abort what is still running and collect the final (partial) outputs, within ~1 s."""
        pending = [r for r, o in zip(run.rids, run.outputs) if o is None or not o.finished]
        run.stopping = True
        if pending:
            self.backend.abort(run, pending)
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

    def _result(self, run: Run, prompts: Sequence[Prompt], interrupted: bool) -> Generation:
        elapsed = time.monotonic() - run.started
        ttft = (run.first_token_at - run.started) if run.first_token_at else None
        unfinished = sum(1 for o in run.outputs if o is None or not o.finished or aborted(o))
        failed = set(run.errors)
        gen = Generation(
            prompts=[prompt_text(p) for p in prompts], outputs=run.outputs, params=run.params,
            engine=self.name, elapsed=elapsed, ttft=ttft, interrupted=interrupted,
            aborted=unfinished - len(failed) if interrupted else 0, errors=run.errors,
        )
        self._account(run, gen.aborted)
        return gen

    def _account(self, run: Run, aborted_requests: int) -> None:
        """Add a finished run to ``stats``."""
        with self._lock:
            self.stats.running -= len(run.rids)
            self.stats.requests += len(run.rids)
            self.stats.aborted += aborted_requests
            made = 0
            for o in run.outputs:
                if o is not None:
                    self.stats.prompt_tokens += len(o.prompt_token_ids or [])
                    made += sum(len(c.token_ids) for c in o.outputs)
            self.stats.output_tokens += made
            elapsed = time.monotonic() - run.started
            if made and elapsed > 0:
                self.stats.last_tokens_per_s = made / elapsed

    async def _drive(self, items, params, run: Run) -> None:
        """Run every request of ``run`` concurrently; outputs and errors go to ``run.q``, then ``_DONE``."""
        q = run.q

        async def one(i: int, send) -> None:
            try:
                await send
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                q.put((i, exc))

        try:
            await asyncio.gather(*(one(i, send) for i, send in self.backend.sends(items, params, run)))
        finally:
            q.put(_DONE)

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
        self._check_usable()
        if self._asleep:
            raise UsageError(f"engine '{self.name}' is already asleep (level {self._asleep})")
        if not self.backend.can_sleep():
            raise sleep_mode.not_enabled(self.name)
        if self.stats.running:
            raise UsageError(f"engine '{self.name}' has {self.stats.running} request(s) running: "
                             "let them finish (or stop them) before it sleeps")
        before, t0 = gpus.used_mib(), time.monotonic()
        self._call(self.backend.sleep(level))
        self._asleep = level
        return SleepReport(self.name, "sleep", level, time.monotonic() - t0, before, gpus.used_mib())

    def wake(self) -> SleepReport:
        """Bring a sleeping engine back: its GPU memory, then (level 2) its weights from disk."""
        self._check_usable()
        if not self._asleep:
            raise UsageError(f"engine '{self.name}' is awake already")
        level, before, t0 = self._asleep, gpus.used_mib(), time.monotonic()
        self._call(self.backend.wake(level))
        self._asleep = 0
        return SleepReport(self.name, "wake", level, time.monotonic() - t0, before, gpus.used_mib())

    def _call(self, coro, timeout: float | None = None):
        """Run ``coro`` on the engine's loop and wait; Ctrl-C waits too (a half-done sleep is worse)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        while True:
            try:
                return fut.result(timeout=timeout)
            except KeyboardInterrupt:
                print(f"vllm-notebook: engine '{self.name}' is finishing a sleep, a wake or an adapter change; "
                      "waiting for it")
            except BaseException as exc:
                raise self.backend.translate(exc) from None

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            if not loop.is_running():
                loop.close()



class _Stopped(BaseException):
    """A run's stop_event was set (the panel's Stop button), or Ctrl-C's KeyboardInterrupt was lost."""


class _AnyOf:
    """Set when any of the events is (None ones are left out)."""

    def __init__(self, *events: threading.Event | None):
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


@contextlib.contextmanager
def _ctrl_c_flag() -> Iterator[threading.Event]:
    """An event that Ctrl-C sets, besides raising KeyboardInterrupt as before.

    Python raises the KeyboardInterrupt at the main thread's next bytecode. When that is in a finalizer (a
    ``__del__`` the garbage collector runs), it is printed as "Exception ignored" and lost, and a run would go on
    to its end; a run checks this event every 50 ms. Only the main thread gets signals, and only a handler that
    raises (Python's, ipykernel's during a cell) is wrapped; the previous handler is back afterwards.
    """
    flag = threading.Event()
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield flag
        return

    def on_sigint(signum, frame):
        flag.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)



def _no_text() -> str:
    raise ValueError("not a text prompt")


def _not_journaled(run: Run, exc: BaseException) -> None:
    """A journal that cannot be written: told once, in one line; the run goes on without it."""
    run.book = None
    print(f"vllm-notebook: results are not journaled: {first_line(exc)}")


