"""Questions for Slurm's commands (``squeue``), asked once for many jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

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
