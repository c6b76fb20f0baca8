"""vLLM servers that outlive the kernel: start ``vllm serve``, find it again, stop it.

A server runs vLLM's OpenAI-compatible API server in a session of its own (so
neither Ctrl-C nor a kernel restart reaches it; the end of the Slurm job does),
bound to 127.0.0.1 on a free port unless the user asks for another address,
with a random API key. The key lives in a file only the user can read and
reaches the server through its environment, never its command line; the
registry records where each server is, never the key.

The registry is one JSON file per user (``$VLLM_NOTEBOOK_CACHE/servers/``, a
0700 folder), updated under a file lock. Reading it drops servers whose process
is gone or whose Slurm job has ended. Nothing here imports vLLM or IPython.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import logs
from .errors import EngineStartError, VllmNotebookError
from .tables import Table

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MARKER = "VLLM_NOTEBOOK_SERVER"  # in every server process's environment: the record id
GUARD = "vllm_notebook.server_guard.RequireKey"
SLEEP_FLAGS = ("--enable-sleep-mode",)


@dataclass
class ServerRecord:
    """One server we started, as the registry keeps it (no key in here)."""

    id: str
    model: str
    argv: list[str]  # the user's flags, normalised (see ``normalize``)
    key: list = field(default_factory=list)  # the canonical engine configuration, when known
    host: str = "127.0.0.1"
    port: int = 0
    pid: int = 0
    node: str = ""
    job_id: str | None = None
    log: str = ""
    key_file: str = ""
    started: float = 0.0
    plan: dict = field(default_factory=dict)
    ray_groups: list[int] = field(default_factory=list)  # a Ray cluster started for this server
    asleep: int = 0  # the sleep level (sleep mode), 0 when awake

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{_bracket(host)}:{self.port}"

    @property
    def here(self) -> bool:
        return self.node == socket.gethostname()

    def api_key(self) -> str:
        return read_key(self.key_file)

    def state(self) -> str:
        """``running`` (process alive here), ``gone``, ``job ended``, or ``elsewhere`` (another node)."""
        if self.job_id and _job_ended(self.job_id):
            return "job ended"
        if not self.here:
            return "elsewhere"
        return "running" if _is_server(self.pid, self.id) else "gone"

    def uptime(self) -> str:
        s = int(time.time() - self.started)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ------------------------------------------------------------------ the registry file
def home() -> Path:
    from .demo import cache_root

    path = cache_root() / "servers"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def _locked():
    import fcntl

    with open(home() / "registry.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield home() / "registry.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> list[ServerRecord]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    fields = set(ServerRecord.__dataclass_fields__)
    return [ServerRecord(**{k: v for k, v in r.items() if k in fields}) for r in raw if isinstance(r, dict)]


def _write(path: Path, records: list[ServerRecord]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in records], indent=1))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def records(prune: bool = True) -> list[ServerRecord]:
    """Registered servers; with ``prune``, those that are gone are dropped (and their leftovers stopped)."""
    with _locked() as path:
        recs = _read(path)
        if not prune:
            return recs
        keep, dead = [], []
        for r in recs:
            (dead if r.state() in ("gone", "job ended") else keep).append(r)
        if dead:
            _write(path, keep)
    for r in dead:
        _cleanup(r)
    return keep


def update(rec: ServerRecord) -> None:
    """Record ``rec`` (replacing the entry with its id)."""
    with _locked() as path:
        recs = [r for r in _read(path) if r.id != rec.id]
        _write(path, recs + [rec])


def _remove(rec_id: str) -> None:
    with _locked() as path:
        recs = _read(path)
        if any(r.id == rec_id for r in recs):
            _write(path, [r for r in recs if r.id != rec_id])


def lookup(what: str) -> ServerRecord:
    """A registered server by id, port, URL or model name."""
    recs = records()
    hits = [r for r in recs if what in (r.id, str(r.port), r.url, r.model)]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(f"{r.id} ({r.model})" for r in recs) or "none"
    raise VllmNotebookError(f"{'several' if hits else 'no'} registered servers match {what!r}; registered: {known}")


def find(model: str, argv: list[str] | None = None, key: list | None = None) -> ServerRecord | None:
    """A running server on this node for ``model`` with the same flags (or the same configuration)."""
    for r in records():
        if r.model != model or not r.here or r.state() != "running":
            continue
        if (argv is not None and r.argv == argv) or (key is not None and r.key and r.key == key):
            return r
    return None


# ------------------------------------------------------------------ flags
def normalize(argv: list[str]) -> list[str]:
    """Flags in one spelling: ``--a=b`` split, ``_`` in names as ``-``, flag groups sorted."""
    tokens: list[str] = []
    for t in argv:
        if t.startswith("--") and "=" in t:
            name, value = t.split("=", 1)
            tokens += [name.replace("_", "-"), value]
        else:
            tokens.append(t.replace("_", "-") if t.startswith("--") else t)
    groups: list[list[str]] = []
    for t in tokens:
        if t.startswith("-") and not _is_number(t) or not groups:
            groups.append([t])
        else:
            groups[-1].append(t)
    return [t for g in sorted(groups) for t in g]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ keys
def new_key_file(rec_id: str) -> str:
    path = home() / f"{rec_id}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return str(path)


def read_key(path: str | os.PathLike) -> str:
    path = Path(path).expanduser()
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise VllmNotebookError(f"cannot read the API key file {str(path)!r}: {exc.strerror}") from None
    if not key:
        raise VllmNotebookError(f"the API key file {str(path)!r} is empty")
    if path.stat().st_mode & 0o077:
        import warnings

        warnings.warn(f"{path} can be read by other users: chmod 600 {path}", stacklevel=2)
    return key


# ------------------------------------------------------------------ processes
def _is_server(pid: int, rec_id: str) -> bool:
    """``pid`` is alive and is the server of record ``rec_id`` (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER}={rec_id}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _job_ended(job_id: str) -> bool:
    if job_id == os.environ.get("SLURM_JOB_ID"):
        return False
    import shutil

    if not shutil.which("squeue"):
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = out.stdout.strip()
    if out.returncode != 0:  # "Invalid job id specified": long gone
        return "Invalid job id" in out.stderr
    return state not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED")


def _members(rec: ServerRecord) -> list[int]:
    """Every process that carries the record's marker (the server and its engine processes)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        if _is_server(p.info["pid"], rec.id):
            found.append(p.info["pid"])
    return found


def _cleanup(rec: ServerRecord) -> None:
    """After a server is gone: kill what it left (engine processes, a Ray cluster), delete its key."""
    if rec.here:
        for pid in _members(rec):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pgid in rec.ray_groups:
            from .procs import terminate_group

            terminate_group(pgid, grace=10)
    with contextlib.suppress(OSError):
        if Path(rec.key_file).parent == home():
            Path(rec.key_file).unlink()


def stop(rec: ServerRecord, timeout: float = 30.0) -> None:
    """Stop a server we started: SIGTERM its session, then SIGKILL what is left; forget it."""
    if not rec.here:
        raise VllmNotebookError(f"server {rec.id} runs on {rec.node}; stop it from there")
    if _is_server(rec.pid, rec.id):
        with contextlib.suppress(OSError):
            os.killpg(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _members(rec):
            time.sleep(0.1)
    _cleanup(rec)
    _remove(rec.id)


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(model: str, argv: list[str], host: str, port: int | str) -> list[str]:
    """The ``vllm serve`` command line (as ``python -m``, which works for every vLLM distribution)."""
    head = [] if "--model" in argv else ["--model", model]
    extra = [] if "--disable-uvicorn-access-log" in argv else ["--disable-uvicorn-access-log"]
    extra += ["--middleware", GUARD]  # the API key on every path, not only /v1
    return [sys.executable, "-m", SERVER_MODULE, *head, *argv, *extra, "--host", host, "--port", str(port)]


def start(model: str, argv: list[str], *, target: str | None = None, match: list[str] | None = None, key: list | None = None, host: str = "127.0.0.1",
          port: int | None = None, env: dict[str, str] | None = None, key_file: str | None = None,
          plan: dict | None = None, progress: Callable[[str, float], None] | None = None) -> ServerRecord:
    """Start a server for ``model`` with ``argv`` (``vllm serve`` flags) and wait until it answers.

    ``target`` is what the server loads (a cached snapshot folder of the Hub id ``model``);
    ``match`` is what a later ``find`` compares flags with (the user's flags, before the plan's).
    """
    port = port or free_port(host)
    rec_id = f"{socket.gethostname()}-{port}-{secrets.token_hex(3)}"
    own_key = key_file is None
    rec = ServerRecord(id=rec_id, model=model, argv=normalize(argv) if match is None else match, key=list(key or []), host=host, port=port,
                       node=socket.gethostname(), job_id=os.environ.get("SLURM_JOB_ID"),
                       log=str(logs.new_log_path(f"server-{port}")), started=time.time(), plan=dict(plan or {}),
                       key_file=new_key_file(rec_id) if own_key else str(Path(key_file).expanduser()))
    child_env = {**os.environ, **(env or {}), MARKER: rec_id, "VLLM_API_KEY": read_key(rec.key_file),
                 "VLLM_LOGGING_COLOR": "0", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    if any(t.split("=", 1)[0] in SLEEP_FLAGS for t in argv):
        # Sleep and wake are vLLM's dev endpoints; the guard above keeps them (and the rest) keyed.
        child_env["VLLM_SERVER_DEV_MODE"] = "1"
    cmd = command(target or model, argv, host, port)
    with open(rec.log, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.getcwd())
    rec.pid = proc.pid
    update(rec)
    try:
        wait_ready(rec, proc, progress)
    except BaseException:
        stop(rec, timeout=10)
        raise
    return rec


def wait_ready(rec: ServerRecord, proc: subprocess.Popen | None = None,
               progress: Callable[[str, float], None] | None = None, timeout: float | None = None) -> None:
    """Wait until the server answers ``/health``; a one-line root cause if it exits first."""
    from .client import healthy

    t0 = time.monotonic()
    phase = "starting"
    key = rec.api_key()
    while not healthy(rec.url, timeout=1.0, api_key=key):
        exited = proc.poll() is not None if proc is not None else not _is_server(rec.pid, rec.id)
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


# ------------------------------------------------------------------ listing
@dataclass(repr=False)  # a dataclass __repr__ would win over Table's _repr_pretty_ in IPython
class ServerList(Table):
    """``%vllm_servers``: registered servers, with which engine of this kernel uses each."""

    records: list[ServerRecord]
    attached: dict[str, str]  # record id -> engine name in this kernel

    COLUMNS = ("id", "model", "URL", "uptime", "job", "node", "state", "engine here", "log")

    def rows(self) -> list[tuple]:
        return [(r.id, r.model, r.url, r.uptime(), r.job_id or "-", r.node, r.state(),
                 self.attached.get(r.id, "-"), r.log) for r in self.records]

    def empty(self) -> str:
        return "no servers registered — start one with %vllm_load MODEL --server"


def listing() -> ServerList:
    from .engine import engines

    attached = {e.record.id: name for name, e in engines().items() if getattr(e, "record", None) is not None}
    return ServerList(records(), attached)
