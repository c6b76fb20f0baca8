"""Start and stop ``vllm serve`` processes that outlive the kernel.

A server runs vLLM's OpenAI-compatible API server in a session of its own (so
neither Ctrl-C nor a kernel restart reaches it; the end of the Slurm job does),
bound to 127.0.0.1 on a free port unless the user asks for another address, with
a random API key that it asks for on every path (``server/guard.py``). The key
lives in a 0600 file and reaches the server through its environment, never its
command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from .. import logs, private, procs
from ..errors import EngineStartError, ServerError, UsageError
from . import http, record
from .record import MARKER, ServerRecord, new_key_file, normalize, read_key

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GUARD = "vllm_notebook.server.guard.RequireKey"
SLEEP_FLAGS = ("--enable-sleep-mode",)


def stop(rec: ServerRecord, timeout: float = 30.0) -> None:
    """Stop a server we started: SIGTERM its session, then SIGKILL what is left after ``timeout`` s; forget it.

    It returns as soon as the server's processes have exited (0.6 s measured here for the demo model); the 32 s
    a stop took came from counting its exited, not yet reaped processes as alive (``procs.group_alive``)."""
    if not rec.here:
        raise ServerError(f"server {rec.id} runs on {rec.node}; stop it from there")
    if rec.alive():  # the server leads its session, so its group is its pid
        procs.terminate_group(rec.pid, grace=timeout)
    record.forget(rec)  # and whatever carries its marker outside that group


def command(model: str, argv: list[str], host: str, port: int | str) -> list[str]:
    """The ``vllm serve`` command line (as ``python -m``, which works for every vLLM distribution)."""
    head = [] if "--model" in argv else ["--model", model]
    extra = [] if "--disable-uvicorn-access-log" in argv else ["--disable-uvicorn-access-log"]
    extra += ["--middleware", GUARD]  # the API key on every path, not only /v1
    extra += [] if "--disable-fastapi-docs" in argv else ["--disable-fastapi-docs"]  # no API browser for others
    if not any(t.split("=", 1)[0] == "--allowed-origins" for t in argv):
        extra += ["--allowed-origins", "[]"]  # CORS closed: no web page may read answers (vLLM 0.26 allowed "*")
    return [sys.executable, "-m", SERVER_MODULE, *head, *argv, *extra, "--host", host, "--port", str(port)]


def start(model: str, argv: list[str], *, target: str | None = None, match: list[str] | None = None, key: list | None = None, host: str = "127.0.0.1",
          port: int | None = None, env: dict[str, str] | None = None, key_file: str | None = None,
          plan: dict | None = None, progress: Callable[[str, float], None] | None = None,
          share_cores: bool = False) -> ServerRecord:
    """Start a server for ``model`` with ``argv`` (``vllm serve`` flags) and wait until it answers.

    ``target`` is what the server loads (a cached snapshot folder of the Hub id ``model``);
    ``match`` is what a later ``find`` compares flags with (the user's flags, before the plan's).
    ``share_cores``: a CPU engine's server session yields the cores to others (``procs.share_cores``).
    """
    port = _port(host, port)
    rec_id = f"{socket.gethostname()}-{port}-{secrets.token_hex(3)}"
    own_key = key_file is None
    rec = ServerRecord(id=rec_id, model=model, argv=normalize(argv) if match is None else match, key=list(key or []), host=host, port=port,
                       node=socket.gethostname(), job_id=os.environ.get("SLURM_JOB_ID"),
                       log=str(logs.new_log_path(f"server-{port}")), started=time.time(), plan=dict(plan or {}),
                       key_file=new_key_file(rec_id) if own_key else str(Path(key_file).expanduser()))
    rec.tmp = str(private.engine_dir("server", rec_id))  # its sockets and rendezvous files; removed by forget()
    child_env = {**os.environ, **(env or {}), **private.environment(Path(rec.tmp)), MARKER: rec_id,
                 "VLLM_API_KEY": read_key(rec.key_file),
                 "VLLM_LOGGING_COLOR": "0", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    if any(t.split("=", 1)[0] in SLEEP_FLAGS for t in argv):
        # Sleep and wake are vLLM's dev endpoints; the guard above keeps them (and the rest) keyed.
        child_env["VLLM_SERVER_DEV_MODE"] = "1"
    if any(t.split("=", 1)[0] == "--enable-lora" for t in argv):
        # %vllm_lora add/remove use /v1/load_lora_adapter, which vLLM serves only when this is set.
        child_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    cmd = command(target or model, argv, host, port)
    with open(rec.log, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd(), umask=private.UMASK)
    rec.pid = proc.pid
    if share_cores:
        procs.share_cores(proc.pid)
    try:
        record.update(rec)  # nothing runs unregistered: if this fails (or Ctrl-C comes), the server goes
    except BaseException:
        procs.terminate_group(proc.pid, grace=5)
        _reap(proc)
        raise
    try:
        wait_ready(rec, proc, progress)
        rec.ready = time.time()  # for kernels elsewhere (a batch job's server): it is ours, and it answers
        record.update(rec)
    except BaseException:
        stop(rec, timeout=10)
        _reap(proc)
        raise
    return rec


def _reap(proc: subprocess.Popen) -> None:
    """Collect the exit status of a server we stopped, so no zombie of it stays in the process table."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_ready(rec: ServerRecord, proc: subprocess.Popen | None = None,
               progress: Callable[[str, float], None] | None = None, timeout: float | None = None) -> None:
    """Wait until the server answers ``/health``; a one-line root cause if it exits first.

    The key is sent only once the port is held by the server's own process (found by its marker), so
    a process of someone else's that took the port first never receives it.
    """
    t0 = time.monotonic()
    phase = "starting"
    key = rec.api_key()
    while not (_ours_listening(rec) and http.healthy(rec.url, timeout=1.0, api_key=key)):
        exited = proc.poll() is not None if proc is not None else not rec.alive()
        if exited:
            lines = logs.root_cause(rec.log)
            why = "; ".join(lines) or f"the server exited (code {proc.returncode if proc else '?'})"
            raise EngineStartError(f"server failed to start: {why}  (full log: {rec.log})")
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise EngineStartError(f"server at {rec.url} did not answer within {timeout:.0f} s  (log: {rec.log})")
        if progress:
            phase = logs.phase_of("\n".join(logs.tail(rec.log, 30)), phase)
            progress(phase, time.monotonic() - t0)
        time.sleep(0.25)


def _port(host: str, port: int | None) -> int:
    """The port to listen on: a free one, or ``port`` if it can be had; one line when the address is wrong."""
    try:
        return procs.free_port(host, start=port, tries=1) if port else procs.free_port(host)
    except OSError as exc:
        if port and not isinstance(exc, socket.gaierror):
            raise UsageError(f"--port {port} on {host} is in use: pick another, or leave --port out") from None
        raise UsageError(f"--host {host}: cannot listen there ({exc.strerror or exc}); use an address of "
                         "this node, or leave --host out for 127.0.0.1") from None


def _ours_listening(rec: ServerRecord) -> bool:
    """The record's port is listened on by one of its server's processes (always true for another node)."""
    if not rec.here:
        return True
    holders = {c.pid for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr
               and c.laddr.port == rec.port}
    if holders and not holders & set(rec.members()):
        who = next((f"pid {p}" for p in holders if p), "another user's")
        raise EngineStartError(f"port {rec.port} is held by another process ({who}), not the server "
                               f"we started: its key was not sent; start again (a free port is picked)  "
                               f"(log: {rec.log})")
    return bool(holders)

