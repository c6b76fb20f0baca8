"""``%vllm_load MODEL --slurm "OPTIONS"``: the engine as a Slurm batch job, driven from a notebook with no GPU.

``submit`` writes a batch script that runs ``vllm-notebook serve`` (the server of ``--server``: bound to
the job node's address, its key required on every path) and submits it with the user's sbatch options,
plus ``chain`` successors that each start before the previous job's walltime ends
(``--dependency=after:PREV+MINUTES``). It returns at once: ``SlurmEngine`` is the handle, and a watcher
thread follows the job (PENDING with Slurm's reason and start estimate, RUNNING with the server's loading
phase, READY, FAILED with the root cause from the job's output) and connects when the server is ready.

Everything about one submission lives in a 0700 folder ``<cache>/jobs/<id>/``: the job record
(``job.json``), the archived script, the API key (0600) and Slurm's output files, so nothing of it is
readable by others, and the same line in a restarted kernel finds the queued or running job instead of
submitting a second one. The kernel reaches the job's server at the node's address on the cluster network
(the key on every path); a site must let login nodes open TCP connections to compute nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import logs, paths
from ..cluster import slurm
from ..engine import registry as engine_registry
from ..engine.pooling import Pooling
from ..errors import EngineDiedError, EngineStartError, UsageError, VllmNotebookError
from ..ui.display import LiveLine
from ..ui.tables import Table, cell
from . import registry
from .client import ServerEngine
from .http import auth_header, healthy

WARN_BEFORE_S = 600  # warn when the serving job has less walltime left than this (and no successor)
POLL_S = 3.0  # how often the watcher asks squeue while the job is queued or loading


# ------------------------------------------------------------------ the job record
@dataclass
class JobRecord:
    """One submission (a job, or a chain of them) as ``<cache>/jobs/<id>/job.json`` keeps it."""

    id: str
    name: str
    model: str
    flags: list[str]  # vllm serve flags, normalised
    options: list[str]  # the user's sbatch options
    jobs: list[str] = field(default_factory=list)  # the chain: Slurm job ids, in order
    submitted: float = 0.0
    lead_s: int = 0  # a successor starts this long before its predecessor's walltime ends

    @property
    def folder(self) -> Path:
        return home() / self.id

    @property
    def key_file(self) -> Path:
        return self.folder / "api.key"

    @property
    def script(self) -> Path:
        return self.folder / "job.sbatch"

    def output(self, job_id: str) -> Path:
        return self.folder / f"slurm-{job_id}.out"

    def save(self) -> None:
        path = self.folder / "job.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def home() -> Path:
    return paths.private_dir(paths.cache_root() / "jobs")


def records() -> list[JobRecord]:
    """Every submission still on record (unloaded ones are removed; ended ones stay until unloaded)."""
    out = []
    for path in sorted(home().glob("*/job.json")):
        try:
            raw = json.loads(path.read_text())
            out.append(JobRecord(**{k: v for k, v in raw.items() if k in JobRecord.__dataclass_fields__}))
        except (OSError, ValueError, TypeError):
            continue  # half-written by a kernel that died mid-submit: not a job of ours
    return out


def lookup(what: str) -> JobRecord:
    """A submission by record id, Slurm job id, engine name or model."""
    recs = records()
    hits = [r for r in recs if what in (r.id, r.name, r.model, *r.jobs)]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(f"{r.id} (jobs {','.join(r.jobs)})" for r in recs) or "none"
    raise UsageError(f"{'several' if hits else 'no'} submitted jobs match {what!r}; on record: {known}")


def find(model: str, flags: list[str], options: list[str]) -> JobRecord | None:
    """A submission of the same model, flags and sbatch options with a job still queued or running."""
    same = [r for r in records() if r.model == model and r.flags == flags and r.options == options]
    if not same:
        return None
    states = slurm.job_states(j for r in same for j in r.jobs)
    live = [r for r in same if any(states[j].live for j in r.jobs)]
    return live[-1] if live else None


# ------------------------------------------------------------------ submitting
# A job's files for its user alone; its temp folder (sockets, caches) private on its node: the submitting
# kernel's folders, which sbatch would pass on in the environment, are not that node's.
PRIVATE_LINES = ("umask 077", "unset VLLM_NOTEBOOK_RUNTIME_DIR",
                 'export TMPDIR="${SLURM_TMPDIR:-${VLLM_NOTEBOOK_TMPDIR:-/tmp}}" VLLM_NOTEBOOK_TMPDIR=')


def script_text(rec: JobRecord, *, job_name: str) -> str:
    """The batch script: ``vllm-notebook serve`` on the job's first node, its output in the private folder."""
    for word in (*rec.flags, rec.model, job_name):
        if any(ch in word for ch in "\n\r\0"):
            raise UsageError("engine flags must be one line each: a line break would add commands to the script")
    serve = [sys.executable, "-m", "vllm_notebook.cli", "serve", rec.model, *rec.flags,
             "--api-key-file", str(rec.key_file)]
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", "#SBATCH --nodes=1" if not _sets_nodes(rec.options)
             else "", "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={rec.folder}/slurm-%j.out",
             f"# Written by vllm-notebook for engine '{rec.name}' ({time.strftime('%Y-%m-%d %H:%M')}); submitted "
             f"with: sbatch {shlex.join(rec.options)}",
             "set -euo pipefail", f"export VLLM_NOTEBOOK_CACHE={shlex.quote(str(paths.cache_root()))}",
             "export HF_HUB_OFFLINE=1   # compute nodes have no internet: models come from the cache",
             *PRIVATE_LINES, f"exec {shlex.join(serve)}"]
    return "\n".join(ln for ln in lines if ln) + "\n"


def _sets_nodes(options: list[str]) -> bool:
    return any(o in ("-N", "--nodes") or o.startswith(("--nodes=", "-N")) for o in options)


def submit(name: str, model: str, flags: list[str], options: list[str], chain: int = 0) -> JobRecord:
    """Write the script and key, submit the job (and ``chain`` successors); the record, at once."""
    if chain < 0 or chain > 50:
        raise UsageError(f"--chain takes 0 to 50 successor jobs, not {chain}")
    rec = JobRecord(id=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}", name=name, model=model,
                    flags=list(flags), options=list(options), submitted=time.time())
    paths.private_dir(rec.folder)
    try:
        fd = os.open(rec.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        rec.script.write_text(script_text(rec, job_name=f"vnb-{name}"))
        rec.jobs.append(slurm.sbatch(str(rec.script), options, cwd=str(rec.folder)))
        rec.save()
        if chain:
            limit = slurm.job_states(rec.jobs)[rec.jobs[0]].time_limit_s
            if not limit:
                raise UsageError("--chain needs a time limit: add --time (-t) to the sbatch options")
            rec.lead_s = min(WARN_BEFORE_S, max(60, limit // 2))
            after = max(1, math.ceil((limit - rec.lead_s) / 60))  # minutes after the previous job started
            for _ in range(chain):
                rec.jobs.append(slurm.sbatch(str(rec.script), [*options, f"--dependency=after:{rec.jobs[-1]}+{after}"],
                                             cwd=str(rec.folder)))
                rec.save()
    except BaseException:
        slurm.scancel(rec.jobs)  # nothing stays queued that no record knows
        shutil.rmtree(rec.folder, ignore_errors=True)
        raise
    return rec


def cancel(rec: JobRecord) -> str:
    """Cancel every job of ``rec``, forget their servers, remove the record's folder."""
    slurm.scancel(rec.jobs)
    for server in registry.records(prune=False):
        if server.job_id in rec.jobs:
            registry.forget(server)
    shutil.rmtree(rec.folder, ignore_errors=True)
    return f"cancelled job{'s' if len(rec.jobs) > 1 else ''} {', '.join(rec.jobs)} ({rec.model})"


# ------------------------------------------------------------------ where a job stands
@dataclass
class Progress:
    """Where a submission stands: ``pending``, ``starting``, ``ready``, ``failed`` or ``ended``."""

    phase: str
    job_id: str = ""
    text: str = ""  # one line for people
    server: registry.ServerRecord | None = None
    time_left_s: int | None = None
    successor_live: bool = False


def progress_of(rec: JobRecord, states: dict[str, slurm.JobState] | None = None,
                servers: list[registry.ServerRecord] | None = None) -> Progress:
    """The newest job of the chain that serves (or will): its phase and a line saying so."""
    states = states if states is not None else slurm.job_states(rec.jobs)
    servers = servers if servers is not None else registry.records()
    ready = {s.job_id: s for s in servers if s.job_id in rec.jobs and s.ready}
    started = {s.job_id: s for s in servers if s.job_id in rec.jobs}
    for i, jid in reversed(list(enumerate(rec.jobs))):  # the newest ready job serves
        st = states.get(jid, slurm.JobState(jid))
        if jid in ready and st.live:
            later = any(states.get(j, slurm.JobState(j)).live for j in rec.jobs[i + 1:])
            left = f", {_minutes(st.time_left_s)} left" if st.time_left_s is not None else ""
            return Progress("ready", jid, f"job {jid} READY on {st.nodes} at {ready[jid].url}{left}", ready[jid],
                            st.time_left_s, later)
    for jid in rec.jobs:  # else the first job that is still on its way
        st = states.get(jid, slurm.JobState(jid))
        if not st.live:
            continue
        if st.pending:
            why = f" ({st.reason})" if st.reason else ""
            when = f", expected to start {st.start.replace('T', ' ')}" if st.start else ""
            return Progress("pending", jid, f"job {jid} PENDING{why}{when}")
        srv = started.get(jid)
        phase = logs.phase_of("\n".join(logs.tail(srv.log, 30)), "starting") if srv and srv.log else "starting"
        return Progress("starting", jid, f"job {jid} RUNNING on {st.nodes}: server {phase}", srv, st.time_left_s)
    ran = [j for j in rec.jobs if rec.output(j).exists()] or rec.jobs[:1] or ["?"]
    last = ran[-1]  # every job has ended: the last one that ran says how
    if any(ln.startswith("serving ") for ln in logs.tail(rec.output(last), 400)):
        return Progress("ended", last, f"job {last} has ended (walltime, scancel or a crash); "
                                       f"see {rec.output(last)}")
    why = _job_error(rec.output(last)) or "it ended before its server started"
    return Progress("failed", last, f"job {last} FAILED: {why}  (output: {rec.output(last)})")


def _job_error(path: Path) -> str:
    """Why a job failed, from its output: the error line of ``vllm-notebook serve``, else the log's root cause."""
    marker = "vllm-notebook: error: "
    errors = [ln.split(marker, 1)[1].strip() for ln in logs.tail(path, 300) if marker in ln]
    if errors:
        return errors[-1]
    slurm_said = [ln.strip() for ln in logs.tail(path, 50) if "slurmstepd" in ln and "error" in ln]
    return "; ".join(logs.root_cause(path)) or (slurm_said[-1] if slurm_said else "")


def _minutes(seconds: int | None) -> str:
    if seconds is None:
        return "no limit"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class JobList(Table):
    """``%vllm_jobs``: our submissions, with the job that serves (or will), its state, node and time left."""

    COLUMNS = ("engine", "jobs", "state", "node", "time left", "model", "URL", "record")

    def __init__(self, recs: list[JobRecord], states: dict[str, slurm.JobState],
                 servers: list[registry.ServerRecord]):
        self.recs, self.states, self.servers = recs, states, servers

    def rows(self) -> list[tuple]:
        rows = []
        for r in self.recs:
            p = progress_of(r, self.states, self.servers)
            st = self.states.get(p.job_id, slurm.JobState(p.job_id))
            state = {"starting": "RUNNING (server starting)"}.get(p.phase, p.phase.upper())
            state += f" ({st.reason})" if p.phase == "pending" and st.reason else ""
            rows.append((r.name, ",".join(r.jobs), state, st.nodes or "-",
                         _minutes(st.time_left_s) if st.live and not st.pending else "-", r.model,
                         p.server.url if p.server is not None and p.phase == "ready" else "-", r.id))
        return rows

    def empty(self) -> str:
        return 'no submitted jobs — submit one with %vllm_load MODEL --slurm "SBATCH OPTIONS"'


def listing() -> JobList:
    recs = records()
    states = slurm.job_states(j for r in recs for j in r.jobs) if recs else {}
    return JobList(recs, states, registry.records() if recs else [])


# ------------------------------------------------------------------ the engine handle
class SlurmEngine(ServerEngine):
    """A ``ServerEngine`` whose server is a batch job: usable at once, connected when the job's server is ready.

    Requests made before then wait (with progress) or, with ``wait=False``, fail at once with where the job
    stands. With a chain, the handle moves to the successor's server when it is ready; a request cut off by
    the switch is sent again, once, to the new server.
    """

    def __init__(self, name: str, job: JobRecord, *, wait: bool = True, progress: bool = True):
        super().__init__(name, "", None, model=job.model)
        self.job = job
        self.key = ("slurm", job.id)
        self.wait = wait
        self.progress = Progress("pending", job.jobs[0] if job.jobs else "", "submitted")
        self._job_id: str | None = None  # the job whose server this handle uses
        self._poll_lock = threading.Lock()
        self._warned: set[str] = set()
        self._line = LiveLine(enabled=progress)
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def owned(self) -> bool:
        return True

    @property
    def log_path(self) -> str:  # the job's output until its server has a log of its own
        srv = self.progress.server
        return srv.log if srv is not None and srv.log else str(self.job.output(self.progress.job_id or "?"))

    @log_path.setter
    def log_path(self, value: str) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self._client is not None and self._job_id is not None

    @property
    def alive(self) -> bool:
        return not self._closed and self.progress.phase not in ("failed", "ended") and self._gone is None

    @property
    def state(self) -> str:
        if self._closed:
            return "unloaded"
        if self.ready and self.progress.phase == "ready":
            left = self.progress.time_left_s
            return "running" + (f" (job {self._job_id}, {_minutes(left)} left)" if left is not None else "")
        return self.progress.text or self.progress.phase

    def __repr__(self) -> str:
        return f"<SlurmEngine {self.name!r} model={self.job.model!r} jobs={','.join(self.job.jobs)} {self.state}>"

    # ---------------------------------------------------------------- following the job
    def watch(self) -> None:
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
            elif p.phase in ("failed", "ended") and self._client is not None:
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
        key = registry.read_key(self.job.key_file)
        old_client, old_job = self._client, self._job_id
        if old_client is None:
            self.url, self._api_key, self.record = p.server.url, key, p.server
            self.plan = dict(p.server.plan)
            self._start()
        else:  # the successor: same loop, a new connection pool; the old one closes in the background
            import httpx

            # the client first: a request that sees the new url (another thread's _moved_on) must get its client
            self._client = httpx.AsyncClient(base_url=p.server.url, headers=auth_header(key), trust_env=False,
                                             timeout=httpx.Timeout(None, connect=10.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            self.url, self._api_key, self.record = p.server.url, key, p.server
            self.plan = dict(p.server.plan)
            asyncio.run_coroutine_threadsafe(old_client.aclose(), self._loop)
        self._job_id, self._gone = p.job_id, None
        if old_job is not None and self.stats.running == 0:
            slurm.scancel([old_job])  # its successor serves now; free its GPUs before the walltime does

    def _process_alive(self) -> bool:
        return self._gone is None

    def refresh_usage(self) -> None:
        if self.ready:
            super().refresh_usage()

    # ---------------------------------------------------------------- requests
    def _check_usable(self) -> None:
        if self._closed:
            super()._check_usable()
        if not self.ready or self.progress.successor_live:
            self._wait_ready()
        if self._gone is not None:
            raise self._died()
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
        print(f"vllm-notebook: warning: job {p.job_id} of engine '{self.name}' ends in {_minutes(p.time_left_s)} "
              "(walltime); load with --chain N to keep the model up across jobs", file=sys.stderr)

    async def _request(self, i: int, prompt, fields, rid: str, q, lora=None):
        """A stream cut by the end of its job goes on from its last token on the successor's server, so what was
        streamed stays and the text only grows (``continuation``); any other request is sent again whole."""
        send = super()._request
        if isinstance(fields, Pooling) or not fields.get("stream"):
            return await self._retried(lambda: send(i, prompt, fields, rid, q, lora), lambda out: out.outputs)
        seen = _Latest(q)

        async def again():
            return await self._continue(i, prompt, fields, rid, q, lora, seen.out)
        return await self._retried(lambda: send(i, prompt, fields, rid, seen, lora), lambda out: out.outputs, again)

    async def _request_many(self, idx: list[int], prompts: list, fields: dict, rids: list[str], q, lora=None):
        send = super()._request_many
        return await self._retried(lambda: send(idx, prompts, fields, rids, q, lora),
                                   lambda outs: [c for out in outs for c in out.outputs])

    async def _retried(self, send, completions, again=None):
        """One retry (``again()``, else ``send()``) on the successor's server for a request cut by the end of its
        job: the connection broke, or the dying server answered ``finish_reason="abort"`` (its engine went first).
        Our own aborts (Ctrl-C, Stop) cancel this task, so they never come here."""
        url = self.url
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
        """After a request to ``url`` failed: True once the handle uses a successor's server (waiting for it
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
            if not ending and healthy(url, timeout=2.0, api_key=self._api_key):
                return False
            if not any(st.live for jid, st in states.items() if jid != self._job_id):
                return False  # nothing to move on to
            time.sleep(1.0)
        return False

    def _died(self) -> EngineDiedError:
        return EngineDiedError(f"engine '{self.name}': {self._gone or self.progress.text}; "
                               "run %vllm_load again to submit a new job")

    # ---------------------------------------------------------------- stop
    def _close(self) -> bool:
        self._stop_watch.set()
        return super()._close()

    def unload(self) -> str:
        """Cancel the job (and its chain), forget its servers."""
        self._close()
        return cancel(self.job)

    def detach(self) -> str:
        self._close()
        return f"detached from job {','.join(self.job.jobs)} (still queued or running; %vllm_jobs shows it)"

    def close_at_exit(self) -> None:
        self._close()  # the job outlives the kernel: the same line in a new kernel finds it

    def _repr_markdown_(self) -> str:
        rows = [("model", self.job.model), ("jobs", ", ".join(self.job.jobs)), ("state", self.state),
                ("URL", self.url or "-"), ("sbatch options", shlex.join(self.job.options)),
                ("script", str(self.job.script)), ("output", str(self.job.output(self.progress.job_id or "?")))]
        body = "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)
        return f"**vLLM engine `{self.name}` as a Slurm job**\n\n| | |\n|---|---|\n{body}\n"


def start(name: str, model: str, flags: list[str], options: list[str], *, chain: int = 0, wait: bool = True,
          progress: bool = True, found: JobRecord | None = None) -> SlurmEngine:
    """Submit (or find again) the job and return its handle at once; the handle follows the job.

    ``found``: the live submission the caller already found with ``find`` (so Slurm is asked once).
    """
    rec = found if found is not None else find(model, flags, options)
    earlier = rec is not None
    current = engine_registry.engines().get(name)
    if earlier and isinstance(current, SlurmEngine) and current.job.id == rec.id and not current._closed:
        LiveLine(enabled=progress).done(f"vllm-notebook: engine '{name}' already follows job {', '.join(rec.jobs)} "
                                        f"(reused): {current.state}")
        return current
    if rec is None:  # submitted first: a submission sbatch refuses leaves the engine of this name serving
        try:
            rec = submit(name, model, flags, options, chain)
        except VllmNotebookError as exc:
            old = engine_registry.engines().get(name)
            if old is None or not old.alive:
                raise
            raise type(exc)(f"{exc}; engine '{name}' ({old.model}) still serves") from None
    eng = SlurmEngine(name, rec, wait=wait, progress=progress)
    eng.progress = Progress("pending", rec.jobs[0], f"{'found' if earlier else 'submitted'} job "
                            f"{', '.join(rec.jobs)}{' (submitted earlier)' if earlier else ''}")
    old = engine_registry.register(eng)
    if old is not None and old is not eng:
        with contextlib.suppress(VllmNotebookError):
            old.detach() if isinstance(old, SlurmEngine) and old.job.id == rec.id else old.unload()
    eng.watch()
    return eng


class _Latest:
    """A request's queue that also keeps the last output put on it (a stream's output so far)."""

    def __init__(self, q):
        self.q, self.out = q, None

    def put(self, item) -> None:
        self.out = item[1]
        self.q.put(item)
