"""The per-user registry of vLLM servers that outlive the kernel, and their API keys.

The registry is one JSON file per user (``<cache>/servers/registry.json``, a 0700
folder), changed under a file lock; it records where each server is, never its key.
Reading it drops servers whose process is gone or whose Slurm job has ended (Slurm
is asked once per listing, outside the lock), and kills what they left behind.
Starting and stopping servers is ``server/process.py``. Nothing here imports vLLM
or IPython.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import paths, private, procs
from ..cluster import slurm
from ..cluster.allocation import REPLICA_ENV
from ..engine import registry as engine_registry
from ..errors import ServerError
from ..tables import Table

MARKER = "VLLM_NOTEBOOK_SERVER"  # in every server process's environment: the record id


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
    ready: float = 0.0  # when it answered, with its own process holding the port (0: not yet)
    tmp: str = ""  # its private temp folder (sockets, rendezvous files): removed with it

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{_bracket(host)}:{self.port}"

    @property
    def here(self) -> bool:
        return self.node == socket.gethostname()

    def api_key(self) -> str:
        return read_key(self.key_file)

    def alive(self) -> bool:
        """The server process runs here (checked by its marker, so a recycled pid does not count)."""
        return self.here and procs.has_marker(self.pid, MARKER, self.id)

    def members(self) -> list[int]:
        """The server's processes here: those with the record's marker, and the engine processes vLLM retitled
        (their environment no longer shows the marker), found by the session the server leads."""
        found = procs.marked(MARKER, self.id)
        if self.pid > 0 and (self.pid in found or not procs.alive(self.pid)):  # a live pid without it: not ours
            found += [pid for pid in procs.renamed_in_session(self.pid) if pid not in found]
        return found

    def state(self, ended_jobs: set[str] | None = None) -> str:
        """``running`` (process alive here), ``gone``, ``job ended``, or ``elsewhere`` (another node)."""
        if ended_jobs is None:
            ended_jobs = slurm.ended_jobs([self.job_id]) if self.job_id else set()
        if self.job_id and self.job_id in ended_jobs:
            return "job ended"
        if not self.here:
            return "elsewhere"
        return "running" if self.alive() else "gone"

    def uptime(self) -> str:
        s = int(time.time() - self.started)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ------------------------------------------------------------------ the registry file
def home() -> Path:
    return paths.servers_dir()


@contextlib.contextmanager
def _locked():
    import fcntl

    path = home() / "registry.json"
    with open(home() / "registry.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on a network filesystem without locks
            raise ServerError(f"cannot lock the server registry in {home()} ({exc.strerror}): point "
                              "VLLM_NOTEBOOK_CACHE at a local filesystem, e.g. export "
                              "VLLM_NOTEBOOK_CACHE=$TMPDIR/vllm-notebook") from None
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> list[ServerRecord]:
    """The records in ``path``; none if it does not exist. An unreadable registry is an error, never
    "no servers": writing over it would forget servers that still hold GPUs."""
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise ValueError("not a list of server records")
        fields = set(ServerRecord.__dataclass_fields__)
        return [ServerRecord(**{k: v for k, v in r.items() if k in fields}) for r in raw]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]
        raise ServerError(f"the server registry {path} cannot be read ({reason}); move it aside "
                          f"(mv {path} {path}.bad) and check %vllm_servers again") from None


def _write(path: Path, records: list[ServerRecord]) -> None:
    """Replace the registry atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps([asdict(r) for r in records], indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def records(prune: bool = True) -> list[ServerRecord]:
    """Registered servers; with ``prune``, those that are gone are dropped (and their leftovers stopped)."""
    with _locked() as path:
        recs = _read(path)
    if not prune:
        return recs
    ended = slurm.ended_jobs(r.job_id for r in recs if r.job_id)  # one squeue, outside the lock
    dead = {r.id for r in recs if r.state(ended) in ("gone", "job ended")}
    if dead:
        with _locked() as path:  # read again: another kernel may have written meanwhile
            _write(path, [r for r in _read(path) if r.id not in dead])
        for r in recs:
            if r.id in dead:
                forget(r)
    return [r for r in recs if r.id not in dead]


def update(rec: ServerRecord) -> None:
    """Record ``rec`` (replacing the entry with its id)."""
    with _locked() as path:
        recs = [r for r in _read(path) if r.id != rec.id]
        _write(path, recs + [rec])


def forget(rec: ServerRecord) -> None:
    """Drop ``rec``: kill what its server left here (engine processes, a Ray cluster), delete its key."""
    with _locked() as path:
        recs = _read(path)
        if any(r.id == rec.id for r in recs):
            _write(path, [r for r in recs if r.id != rec.id])
    if rec.here:
        for pid in rec.members():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pgid in rec.ray_groups:
            procs.terminate_group(pgid, grace=10)
        private.remove(rec.tmp, since=rec.started)  # its sockets, rendezvous files and /dev/shm segments
    with contextlib.suppress(OSError):
        if Path(rec.key_file).parent == home():
            Path(rec.key_file).unlink()


def lookup(what: str) -> ServerRecord:
    """A registered server by id, port, URL or model name."""
    recs = records()
    hits = [r for r in recs if what in (r.id, str(r.port), r.url, r.model)]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(f"{r.id} ({r.model})" for r in recs) or "none"
    raise ServerError(f"{'several' if hits else 'no'} registered servers match {what!r}; registered: {known}")


def find(model: str, argv: list[str] | None = None, key: list | None = None) -> ServerRecord | None:
    """A running server on this node for ``model`` with the same flags (or the same configuration).

    Inside a Slurm job, only a server of the same job counts: another job's server ends with that job.
    """
    if os.environ.get(REPLICA_ENV):  # a replica's server (``backends/step.py``) is its own, never a sibling's
        return None
    job = os.environ.get("SLURM_JOB_ID") or None
    for r in records():
        if r.model != model or not r.here or not r.alive() or (job is not None and r.job_id != job):
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
    """The one-line key in ``path``: a small regular file (not a FIFO or a device, which could block or never end)."""
    path = Path(path).expanduser()
    where = repr(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ServerError(f"the API key file {where} is not a regular file")
            raw = f.read(4097)
    except OSError as exc:
        raise ServerError(f"cannot read the API key file {where}: {exc.strerror}") from None
    lines = [ln.strip() for ln in raw.decode(errors="replace").splitlines() if ln.strip()]
    if len(raw) > 4096 or len(lines) > 1:
        raise ServerError(f"the API key file {where} must hold the key alone, on one line")
    if not lines:
        raise ServerError(f"the API key file {where} is empty")
    if st.st_mode & 0o077:
        import warnings

        warnings.warn(f"{path} can be read by other users: chmod 600 {path}", stacklevel=2)
    return lines[0]


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
    recs, engines = records(), engine_registry.engines()
    attached = {r.id: name for r in recs for name, e in engines.items() if e.backend.uses_server(r.id)}
    return ServerList(recs, attached)
