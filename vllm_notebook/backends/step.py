"""``Step``: one replica's ``vllm serve`` on a node of this kernel's Slurm allocation, started as a job step.

``%vllm_load MODEL --replicas N`` in a multi-node allocation (a kernel in an ``salloc -N2`` or a JupyterHub job)
runs each replica on one node: ``srun --overlap --jobid=JOB -N1 -n1 -w NODE`` starts ``vllm-notebook serve`` there
(with ``VLLM_NOTEBOOK_REPLICA=J/K/TP``: it takes its share of that node as an in-kernel replica would, its GPUs
or cores, ``cli._as_replica``), the server registers itself with a key file only this user can read, and this
back-end connects to it over HTTP as to any server we started. The step is in a session of its own (Ctrl-C in
the kernel does not reach it) and is guarded by the kernel's watchdog: if the kernel dies, srun is terminated,
and Slurm ends the step. ``stop`` sends srun SIGTERM, which it passes to the server, which stops its engine.

It is not a back-end: a ``ServerBackend`` given ``launcher=Step(...)`` starts it, asks it whether the server's
process lives, and has it stop the server; the rest (requests, errors, adapters) is the server back-end's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import logs, private, procs
from ..cluster.allocation import REPLICA_ENV
from ..errors import EngineStartError, VllmNotebookError
from ..server import record

#: How long a replica's server may take to answer (a cold model load on a busy node).
START_TIMEOUT_S = 1800


class Step:
    """A replica's server in a job step on ``node`` (see the module's text)."""

    outlives_kernel = False  # the kernel's watchdog ends the step with the kernel
    holds_devices_here = True  # a step may be on this node, holding its GPUs: a replacement waits for it to go

    def __init__(self, target: str, flags: list[str], *, node: str, share: str, job_id: str,
                 cpus: int | None, env: dict[str, str] | None = None):
        self.node, self.share, self.job_id, self.cpus = node, share, job_id, cpus
        self.target, self.flags, self.env = target, list(flags), dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.key_file = ""
        self.log = ""
        self.record: record.ServerRecord | None = None
        self._abandoned = threading.Event()

    def command(self) -> list[str]:
        """The ``srun`` line (no secret in it: the key is in a file, the server reads it)."""
        cpus = [f"--cpus-per-task={self.cpus}"] if self.cpus else []
        return ["srun", "--overlap", f"--jobid={self.job_id}", "-N1", "-n1", "-w", self.node, *cpus,
                "--export=ALL", f"--job-name=vnb-replica-{self.node}", sys.executable, "-m", "vllm_notebook.cli",
                "serve", self.target, *self.flags, "--api-key-file", self.key_file]

    def start(self, progress=None) -> record.ServerRecord:
        """Start the step; its server's record once that server answers (the step is ended if it fails)."""
        t0 = time.monotonic()
        tag = f"step-{self.job_id}-{self.node}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.key_file = record.new_key_file(tag)  # 0600, in the registry's 0700 folder
        self.log = str(logs.new_log_path(f"replica-{self.node}"))
        env = {**os.environ, **self.env, REPLICA_ENV: self.share, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            log.write(f"$ {' '.join(self.command())}\n")
            log.flush()
            self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, umask=private.UMASK)
        procs.guard(self.proc.pid)
        try:
            self.record = self._wait_for_server(t0, progress)
        except KeyboardInterrupt:
            self.stop(grace=10)
            raise VllmNotebookError(f"load interrupted; the half-started replica on {self.node} was stopped") \
                from None
        except BaseException:
            self.stop(grace=10)
            raise
        return self.record

    def abandon(self) -> None:
        """Give up a start waiting on another thread (``ServerBackend.abandon_start``)."""
        self._abandoned.set()

    def _wait_for_server(self, t0: float, progress) -> record.ServerRecord:
        """The server's record once it is ready (it wrote it with our key file); one line if the step ends first."""
        phase = "starting"
        while True:
            rec = next((r for r in record.records(prune=False) if r.key_file == self.key_file), None)
            if rec is not None and rec.ready:
                return rec
            if self._abandoned.is_set():
                raise KeyboardInterrupt
            if self.proc.poll() is not None:
                raise EngineStartError(f"the replica's server on {self.node} ended before it served: "
                                       f"{self._why()}  (log: {self.log})")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                raise EngineStartError(f"the replica's server on {self.node} did not answer in "
                                       f"{START_TIMEOUT_S // 60} min (log: {self.log})")
            if rec is not None and rec.log:
                phase = logs.phase_of("\n".join(logs.tail(rec.log, 30)), phase)
            if progress is not None:
                progress(f"on {self.node}: {phase}", time.monotonic() - t0)
            self._abandoned.wait(0.5)

    def _why(self) -> str:
        marker = "vllm-notebook: error: "
        said = [ln.split(marker, 1)[1].strip() for ln in logs.tail(self.log, 200) if marker in ln]
        if said:
            return said[-1]
        return "; ".join(logs.root_cause(self.log)) or (logs.tail(self.log, 1) or ["no output"])[-1]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def place(self) -> str:
        return f"{self.node} (job step)"

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM srun (it passes it to the server, which stops its engine); SIGKILL after ``grace`` s."""
        if self.proc is not None:
            if self.proc.poll() is None:
                procs.terminate_group(self.proc.pid, grace=grace)
            procs.guard(self.proc.pid, add=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.record is not None:
            with contextlib.suppress(VllmNotebookError, OSError):
                record.forget(self.record)  # gone with its step, if the server could not say so itself
        with contextlib.suppress(OSError):
            Path(self.key_file).unlink()
