"""``%vllm_load MODEL --slurm "OPTIONS"``: the engine as a Slurm batch job, driven from a notebook with no GPU.

``submit`` writes a batch script that runs ``vllm-notebook serve`` (the server of ``--server``: bound to
the job node's address, its key required on every path) and submits it with the user's sbatch options,
plus ``chain`` successors that each start before the previous job's walltime ends
(``--dependency=after:PREV+MINUTES``). It returns at once: an engine over ``backends/slurm.py``'s ``SlurmBackend`` is the handle, and a watcher
thread follows the job (PENDING with Slurm's reason and start estimate, RUNNING with the server's loading
phase, READY, FAILED with the root cause from the job's output) and connects when the server is ready.

Everything about one submission lives in a 0700 folder ``<cache>/jobs/<id>/``: the job record
(``job.json``), the archived script, the API key (0600) and Slurm's output files, so nothing of it is
readable by others, and the same line in a restarted kernel finds the queued or running job instead of
submitting a second one. The kernel reaches the job's server at the node's address on the cluster network
(the key on every path); a site must let login nodes open TCP connections to compute nodes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import logs, paths
from ..cluster import slurm
from ..errors import UsageError
from ..tables import Table
from ..server import record as server_records

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
    for server in server_records.records(prune=False):
        if server.job_id in rec.jobs:
            server_records.forget(server)
    shutil.rmtree(rec.folder, ignore_errors=True)
    return f"cancelled job{'s' if len(rec.jobs) > 1 else ''} {', '.join(rec.jobs)} ({rec.model})"


# ------------------------------------------------------------------ where a job stands
@dataclass
class Progress:
    """Where a submission stands: ``pending``, ``starting``, ``ready``, ``failed`` or ``ended``."""

    phase: str
    job_id: str = ""
    text: str = ""  # one line for people
    server: server_records.ServerRecord | None = None
    time_left_s: int | None = None
    successor_live: bool = False


def progress_of(rec: JobRecord, states: dict[str, slurm.JobState] | None = None,
                servers: list[server_records.ServerRecord] | None = None) -> Progress:
    """The newest job of the chain that serves (or will): its phase and a line saying so."""
    states = states if states is not None else slurm.job_states(rec.jobs)
    servers = servers if servers is not None else server_records.records()
    ready = {s.job_id: s for s in servers if s.job_id in rec.jobs and s.ready}
    started = {s.job_id: s for s in servers if s.job_id in rec.jobs}
    for i, jid in reversed(list(enumerate(rec.jobs))):  # the newest ready job serves
        st = states.get(jid, slurm.JobState(jid))
        if jid in ready and st.live:
            later = any(states.get(j, slurm.JobState(j)).live for j in rec.jobs[i + 1:])
            left = f", {minutes(st.time_left_s)} left" if st.time_left_s is not None else ""
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


def minutes(seconds: int | None) -> str:
    if seconds is None:
        return "no limit"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class JobList(Table):
    """``%vllm_jobs``: our submissions, with the job that serves (or will), its state, node and time left."""

    COLUMNS = ("engine", "jobs", "state", "node", "time left", "model", "URL", "record")

    def __init__(self, recs: list[JobRecord], states: dict[str, slurm.JobState],
                 servers: list[server_records.ServerRecord]):
        self.recs, self.states, self.servers = recs, states, servers

    def rows(self) -> list[tuple]:
        rows = []
        for r in self.recs:
            p = progress_of(r, self.states, self.servers)
            st = self.states.get(p.job_id, slurm.JobState(p.job_id))
            state = {"starting": "RUNNING (server starting)"}.get(p.phase, p.phase.upper())
            state += f" ({st.reason})" if p.phase == "pending" and st.reason else ""
            rows.append((r.name, ",".join(r.jobs), state, st.nodes or "-",
                         minutes(st.time_left_s) if st.live and not st.pending else "-", r.model,
                         p.server.url if p.server is not None and p.phase == "ready" else "-", r.id))
        return rows

    def empty(self) -> str:
        return 'no submitted jobs — submit one with %vllm_load MODEL --slurm "SBATCH OPTIONS"'


def listing() -> JobList:
    recs = records()
    states = slurm.job_states(j for r in recs for j in r.jobs) if recs else {}
    return JobList(recs, states, server_records.records() if recs else [])
