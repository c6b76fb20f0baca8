"""Questions for Slurm's commands (``squeue``), asked once for many jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import VllmNotebookError

LIVE = {"RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


def ended_jobs(job_ids: Iterable[str]) -> set[str]:
    """The jobs of ``job_ids`` that have ended, from one ``squeue`` call.

    The job this process runs in is alive by definition. Without ``squeue`` (no Slurm here) or when it
    fails for another reason, nothing is declared ended: a record is never dropped on a guess.
    """
    wanted = {str(j) for j in job_ids if j and str(j) != os.environ.get("SLURM_JOB_ID")}
    if not wanted or not shutil.which("squeue"):
        return set()
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(sorted(wanted)), "-o", "%i %T"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if out.returncode != 0:  # "Invalid job id specified": every one of them is long gone
        return wanted if "Invalid job id" in out.stderr else set()
    live = {parts[0] for parts in (ln.split() for ln in out.stdout.splitlines()) if len(parts) == 2
            and parts[1] in LIVE}
    return wanted - live


# ------------------------------------------------------------------ batch jobs
class SlurmError(VllmNotebookError):
    """sbatch, squeue or scancel refused, with Slurm's own words."""


@dataclass
class JobState:
    """One job as ``squeue`` shows it; ``state`` is ``ENDED`` once squeue no longer lists it."""

    job_id: str
    state: str = "ENDED"
    reason: str = ""
    nodes: str = ""
    time_left_s: int | None = None
    time_limit_s: int | None = None
    start: str = ""  # Slurm's estimate while PENDING (or the start time once running)

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def pending(self) -> bool:
        return self.state in ("PENDING", "REQUEUED", "CONFIGURING")


def duration_s(text: str) -> int | None:
    """Seconds of a Slurm duration: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``; None for ``UNLIMITED``."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INVALID", "NOT_SET", "N/A"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")] + [0] * (3 - len(text.split(":")))
        hours, minutes, seconds = parts[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        else:
            hours, minutes, seconds = parts[-3:]
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """``JobState`` of each job, from one ``squeue`` call (jobs squeue no longer lists are ``ENDED``).

    Raises ``SlurmError`` when squeue cannot answer (a job is never declared ended on a guess).
    """
    wanted = sorted({str(j) for j in job_ids if j})
    if not wanted:
        return {}
    if not shutil.which("squeue"):
        raise SlurmError("squeue is not here: the jobs can only be watched from a node of their cluster")
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(wanted), "-o", "%i|%T|%r|%N|%L|%l|%S"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"squeue did not answer: {exc}") from None
    states = {j: JobState(j) for j in wanted}
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return states
        raise SlurmError(f"squeue failed: {_first(out.stderr)}")
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 7 and parts[0] in states:
            jid, state, reason, nodes, left, limit, start = parts
            states[jid] = JobState(jid, state, "" if reason == "None" else reason, nodes,
                                   duration_s(left), duration_s(limit), "" if start == "N/A" else start)
    return states


def sbatch(script: str, options: list[str], *, cwd: str | None = None) -> str:
    """Submit ``script`` with sbatch ``options``; the job id. One line with Slurm's reason on refusal."""
    if not shutil.which("sbatch"):
        raise SlurmError("sbatch is not here: submit from a login node of the cluster (or load without --slurm)")
    try:
        out = subprocess.run(["sbatch", "--parsable", *options, script], capture_output=True, text=True,
                             timeout=60, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"sbatch did not answer: {exc}") from None
    job_id = out.stdout.strip().split(";")[0]
    if out.returncode != 0 or not job_id.isdigit():
        raise SlurmError(f"sbatch refused the job: {_first(out.stderr) or out.stdout.strip()}")
    return job_id


def scancel(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids if j]
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=30)


def _first(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "").removeprefix("sbatch: error: ").removeprefix("squeue: error: ")
