"""``SlurmBackend``: an engine whose server runs in a Slurm batch job, usable as soon as it is submitted.

The job itself (its record, script, submission, state and cancellation) is ``slurm_job.py``; this is
the engine's side. A watcher thread follows the job and, when its server is ready, connects a
``ServerBackend`` to it; with a chain, that back-end moves to the successor's server when it is ready, and
a request cut off by the switch is sent again, once, to the new server (a stream goes on from its last
token). Requests made before the server is ready wait (with progress) or, with ``wait=False``, fail at once
with where the job stands.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import threading
import time
from typing import Any

from ..cluster import slurm
from ..engine.core import Engine
from ..engine.pooling import Pooling
from ..engine.sampling import request_fields
from ..errors import EngineDiedError, EngineStartError, VllmNotebookError
from ..server import record
from .slurm_job import (
    POLL_S,
    WARN_BEFORE_S,
    JobRecord,
    Progress,
    cancel,
    minutes,
    progress_of,
)
from ..progress import LiveLine
from .base import Backend
from .server import ServerBackend, fields_record


class SlurmBackend(Backend):
    """A server in a batch job: a ``ServerBackend`` once the job's server is ready (see the module's text)."""

    kind = "slurm"
    outlives_kernel = True
    holds_devices_here = False  # it runs on the job's nodes: a replacement here need not wait for it to go

    def __init__(self, job: JobRecord, *, wait: bool = True, progress: bool = True):
        super().__init__(("slurm", job.id))
        self.job = job
        self.wait = wait
        self.progress = Progress("pending", job.jobs[0] if job.jobs else "", "submitted")
        self.server: ServerBackend | None = None  # the job's server, once it is ready
        self.facts = {"model": job.model}
        self._job_id: str | None = None  # the job whose server this back-end uses
        self._gone: str | None = None
        self._closed = False
        self._inflight = 0  # requests on their way (the old job of a chain is cancelled only when none are)
        self._poll_lock = threading.Lock()
        self._warned: set[str] = set()
        self._line = LiveLine(enabled=progress)
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---------------------------------------------------------------- what the engine is
    @property
    def model(self) -> str:
        return self.job.model

    @property
    def url(self) -> str:
        return self.server.url if self.server is not None else ""

    @property
    def record(self):
        """The registry record of the job's server (None until it is ready)."""
        return self.server.record if self.server is not None else None

    @property
    def log_path(self) -> str:  # the job's output until its server has a log of its own
        srv = self.progress.server
        return srv.log if srv is not None and srv.log else str(self.job.output(self.progress.job_id or "?"))

    @log_path.setter
    def log_path(self, value: str) -> None:  # Backend's constructor sets it; the job's output is the log
        pass

    @property
    def tokenizer(self):
        return None

    @property
    def ready(self) -> bool:
        return self.server is not None and self._job_id is not None and not self._closed

    @property
    def alive(self) -> bool:
        return not self._closed and self.progress.phase not in ("failed", "ended") and self._gone is None

    def state(self) -> str | None:
        if self.ready and self.progress.phase == "ready":
            left = self.progress.time_left_s
            return "running" + (f" (job {self._job_id}, {minutes(left)} left)" if left is not None else "")
        return self.progress.text or self.progress.phase

    def uses_server(self, record_id: str) -> bool:
        return self.server is not None and self.server.uses_server(record_id)

    def title(self) -> str:
        return "vLLM engine as a Slurm job"

    def rows(self) -> list[tuple[str, Any]]:
        return [("model", self.job.model), ("jobs", ", ".join(self.job.jobs)), ("state", self.state()),
                ("URL", self.url or "-"), ("sbatch options", shlex.join(self.job.options)),
                ("script", str(self.job.script)), ("output", str(self.job.output(self.progress.job_id or "?")))]

    # ---------------------------------------------------------------- following the job
    def start(self, progress=None) -> None:
        """Follow the job in the background, updating the status line, until its server is ready (or fails)."""
        self._show()
        self._watcher = threading.Thread(target=self._watch, name=f"vllm-notebook:{self.name}:job", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop_watch.is_set():
            try:
                self.poll()
            except VllmNotebookError as exc:  # squeue hiccup: say so, try again
                self._line.update(f"vllm-notebook: engine '{self.name}': {exc}")
            if self.progress.phase in ("failed", "ended"):
                return
            # queued or loading: every few seconds; serving: twice a minute, for the time left and a successor
            self._stop_watch.wait(POLL_S if not self.ready else (4 * POLL_S if self.progress.successor_live else 30))

    def poll(self) -> Progress:
        """Ask Slurm once; connect (or move to a successor) when a server is ready. Thread-safe."""
        with self._poll_lock:
            if self._closed:
                return self.progress
            p = progress_of(self.job)
            if p.phase == "ready" and p.job_id != self._job_id:
                self._connect(p)
            elif p.phase in ("failed", "ended") and self.server is not None:
                self._gone = p.text
            self.progress = p
            self._show()
            return p

    def _show(self) -> None:
        p = self.progress
        if p.phase == "ready" and self.ready:
            ending = p.time_left_s is not None and p.time_left_s <= WARN_BEFORE_S and not p.successor_live
            self._line.update(f"vllm-notebook: engine '{self.name}' ready — {self.model} · {p.text}"
                              + (" — ends soon: --chain N keeps the model up across jobs" if ending else ""))
        elif p.phase in ("failed", "ended"):
            self._line.update(f"vllm-notebook: engine '{self.name}': {p.text}")
        else:
            self._line.update(f"vllm-notebook: engine '{self.name}': {p.text} … "
                              f"{time.time() - self.job.submitted:.0f} s since submission")

    def _connect(self, p: Progress) -> None:
        """Use the server of job ``p.job_id`` from now on (the first one, or a chain's successor)."""
        key = record.read_key(self.job.key_file)
        old_job = self._job_id
        if self.server is None:
            server = ServerBackend(p.server.url, key, record=p.server, model=self.job.model)
            server.name, server.loop = self.name, self.loop
            server.start()
            self.server = server
            self.facts, self.usage, self.adapters, self.plan = server.facts, server.usage, server.adapters, server.plan
            self.load_seconds, self.vllm_version = server.load_seconds, server.vllm_version
            self.checks_rank = server.checks_rank
        else:  # the successor: same loop, a new connection pool
            self.server.move_to(p.server.url, key, p.server)
            self.plan = self.server.plan
        self._job_id, self._gone = p.job_id, None
        if old_job is not None and not self._inflight:
            slurm.scancel([old_job])  # its successor serves now; free its GPUs before the walltime does

    def refresh_usage(self) -> None:
        if self.ready:
            self.server.refresh_usage()

    # ---------------------------------------------------------------- requests
    def check_usable(self) -> None:
        if not self.ready or self.progress.successor_live:
            self._wait_ready()
        if self._gone is not None:
            raise self._died()
        self.server.check_usable()
        self._warn_walltime()

    def _wait_ready(self) -> None:
        p = self.poll()
        if self.ready and p.phase == "ready":
            return
        if p.phase in ("failed", "ended"):
            raise EngineStartError(f"engine '{self.name}': {p.text}") if not self.ready else self._died()
        if self.ready:  # a successor is on its way; this server still serves
            return
        if not self.wait:
            raise EngineStartError(f"engine '{self.name}' is not ready yet: {p.text} "
                                   "(requests wait for it unless loaded with --no-wait)")
        line, t0 = LiveLine(), time.monotonic()
        try:
            while not self.ready:
                line.update(f"vllm-notebook: waiting for engine '{self.name}': {p.text} … "
                            f"{time.monotonic() - t0:.0f} s", key=p.phase)
                time.sleep(1.0)
                p = self.poll()
                if p.phase in ("failed", "ended"):
                    line.done(f"vllm-notebook: engine '{self.name}': {p.text}")
                    raise EngineStartError(f"engine '{self.name}': {p.text}")
        except KeyboardInterrupt:
            raise VllmNotebookError(f"stopped waiting; job {p.job_id} goes on ({p.text}); "
                                    "%vllm_jobs shows it") from None
        line.done(f"vllm-notebook: engine '{self.name}' ready after {time.monotonic() - t0:.0f} s — {p.text}")

    def _warn_walltime(self) -> None:
        p = self.progress
        if p.time_left_s is None or p.successor_live or p.job_id in self._warned or p.time_left_s > WARN_BEFORE_S:
            return
        self._warned.add(p.job_id)
        print(f"vllm-notebook: warning: job {p.job_id} of engine '{self.name}' ends in {minutes(p.time_left_s)} "
              "(walltime); load with --chain N to keep the model up across jobs", file=sys.stderr)

    def _server(self) -> ServerBackend:
        if self.server is None:
            raise EngineStartError(f"engine '{self.name}' is not ready yet: {self.progress.text}")
        return self.server

    def translate(self, exc: BaseException) -> BaseException:
        if self.server is None:
            return exc if isinstance(exc, VllmNotebookError) else EngineStartError(str(exc))
        error = self.server.translate(exc)
        if isinstance(error, EngineDiedError):  # the job's server is gone: said as the job's engine
            self._gone = self.server.gone or self._gone
            return self._died()
        return error

    def sampling(self, base: Any = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return request_fields(base, overrides)  # as a server's (the same before the job's server is ready)

    def default_sampling(self) -> dict[str, Any]:
        return {}

    def chat_prompt(self, messages) -> dict:
        return self._server().chat_prompt(messages)

    def sampling_record(self, params: Any) -> dict[str, Any]:
        return fields_record(params)  # before the job's server is ready too: a run's record is made first

    def identity(self) -> dict[str, Any]:
        return self.server.identity() if self.server is not None else {"model": self.model, "path": "",
                                                                       "revision": None, "flags": {}}

    def place(self) -> str:
        return f"job {self._job_id or self.progress.job_id or '?'}"

    def where(self) -> dict[str, Any]:
        return self.server.where() if self.server is not None else {"node": None, "job": self.progress.job_id}

    def prepare(self, params: Any, stream: bool) -> Any:
        return self._server().prepare(params, stream)

    def sends(self, items: list, params: Any, run) -> list[tuple[int, Any]]:
        return self._server().sends(items, params, run, one=self.request, many=self._request_many)

    async def request(self, i: int, prompt, fields, rid: str, q, lora=None):
        """A stream cut by the end of its job goes on from its last token on the successor's server, so what was
        streamed stays and the text only grows (``continuation``); any other request is sent again whole."""
        server = self._server()
        if isinstance(fields, Pooling) or not fields.get("stream"):
            return await self._retried(lambda: server.request(i, prompt, fields, rid, q, lora),
                                       lambda out: out.outputs)
        seen = _Latest(q)

        async def again():
            return await server.continue_stream(i, prompt, fields, rid, q, lora, seen.out)
        return await self._retried(lambda: server.request(i, prompt, fields, rid, seen, lora),
                                   lambda out: out.outputs, again)

    async def _request_many(self, idx: list[int], prompts: list, fields: dict, rids: list[str], q, lora=None):
        server = self._server()
        return await self._retried(lambda: server.request_many(idx, prompts, fields, rids, q, lora),
                                   lambda outs: [c for out in outs for c in out.outputs])

    async def _retried(self, send, completions, again=None):
        """One retry (``again()``, else ``send()``) on the successor's server for a request cut by the end of its
        job: the connection broke, or the dying server answered ``finish_reason="abort"`` (its engine went first).
        Our own aborts (Ctrl-C, Stop) cancel this task, so they never come here."""
        url = self.url
        self._inflight += 1
        try:
            return await self._retry_once(url, send, completions, again)
        finally:
            self._inflight -= 1

    async def _retry_once(self, url: str, send, completions, again):
        try:
            out = await send()
        except Exception:  # noqa: BLE001 - re-raised unless the job moved on
            if not await asyncio.to_thread(self._moved_on, url):
                raise
            return await (again or send)()
        if any(c.finish_reason == "abort" for c in completions(out)) and await asyncio.to_thread(self._moved_on, url):
            return await (again or send)()
        return out

    def _moved_on(self, url: str, timeout: float = 900) -> bool:
        """After a request to ``url`` failed: True once the back-end uses a successor's server (waiting for it
        while one is on its way); False at once when the server still serves (the error was the request's own)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.poll()
                if self.url != url:
                    return True
                states = slurm.job_states(self.job.jobs)
            except slurm.SlurmError:  # squeue hiccup (slurmctld busy ending the job): ask again, as _watch does
                time.sleep(1.0)
                continue
            serving = states.get(self._job_id or "", slurm.JobState(""))
            ending = not serving.live or serving.state == "COMPLETING" or (
                serving.time_left_s is not None and serving.time_left_s <= 10)
            if not ending and self.server.answers(timeout=2.0):
                return False
            if not any(st.live for jid, st in states.items() if jid != self._job_id):
                return False  # nothing to move on to
            time.sleep(1.0)
        return False

    def abort(self, run, pending: list[str]) -> None:
        if run.future is not None:
            run.future.cancel()

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        return self._server().token_ids(text, special)

    def scores(self, query: str, documents: list[str], lora) -> list[float]:
        return self._server().scores(query, documents, lora)

    async def add_lora(self, adapter) -> None:
        await self._server().add_lora(adapter)

    async def remove_lora(self, adapter) -> None:
        await self._server().remove_lora(adapter)

    def can_sleep(self) -> bool:
        return self._server().can_sleep()

    async def sleep(self, level: int) -> None:
        await self._server().sleep(level)

    async def wake(self, level: int) -> None:
        await self._server().wake(level)

    def _died(self) -> EngineDiedError:
        return EngineDiedError(f"engine '{self.name}': {self._gone or self.progress.text}; "
                               "run %vllm_load again to submit a new job")

    # ---------------------------------------------------------------- stop
    def close(self) -> None:
        self._stop_watch.set()
        with self._poll_lock:
            self._closed = True
        if self.server is not None:
            self.server.close()

    def stop(self) -> str:
        """Cancel the job (and its chain), forget its servers."""
        self._stop_watch.set()
        self._closed = True
        return cancel(self.job)

    def detached(self) -> str:
        return f"detached from job {','.join(self.job.jobs)} (still queued or running; %vllm_jobs shows it)"


def follow(name: str, rec: JobRecord, *, wait: bool = True, progress: bool = True, earlier: bool = False) -> Engine:
    """An engine called ``name`` over the submission ``rec`` (``earlier``: found again, not submitted now), at once;
    it follows the job in the background (not registered: the loader does that)."""
    backend = SlurmBackend(rec, wait=wait, progress=progress)
    backend.progress = Progress("pending", rec.jobs[0], f"{'found' if earlier else 'submitted'} job "
                                f"{', '.join(rec.jobs)}{' (submitted earlier)' if earlier else ''}")
    return Engine(name, backend).start()


class _Latest:
    """A request's queue that also keeps the last output put on it (a stream's output so far)."""

    def __init__(self, q):
        self.q, self.out = q, None

    def put(self, item) -> None:
        self.out = item[1]
        self.q.put(item)
