"""One private folder per user for what engines would otherwise put in a shared ``/tmp``.

Torch, vLLM and Python put files in the temp folder under predictable names: torch inductor's cache and
precompiled headers (``/tmp/torchinductor_$USER``, whose code the engine compiles and runs), vLLM's ZeroMQ
sockets (``VLLM_RPC_BASE_PATH``) and its rendezvous files (``vllm_dist_*``). On a node shared with other users, a
folder someone else made first, or a socket the group can open, lets them read, forge or run code as you.

So every process of ours (a kernel at ``%load_ext``, a server, a Slurm job's ``serve``) points ``TMPDIR`` and
those caches into one folder per user, created 0700 and checked to be a real folder of the user's before torch
or vLLM is imported: ``$VLLM_NOTEBOOK_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/vllm-notebook``, else
``$TMPDIR/vllm-notebook-$UID`` (``/tmp`` when unset). Each engine gets a folder of its own inside it for its
sockets and rendezvous files, removed when it stops (or, after a crash, when the next one starts); engines
start with umask 077. A folder of the user's that is open to others is closed (chmod 700); one that is not the
user's, or a link, is refused in one line.

A leaf: it imports only ``errors``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from .errors import UnsafePathError

RUNTIME_ENV = "VLLM_NOTEBOOK_RUNTIME_DIR"
# Caches that torch and Triton keep in the temp folder (or beside it): in ours, unless the user chose one.
CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}
UMASK = 0o077  # what engines and servers create: for the user alone
_FIX = f"set {RUNTIME_ENV} to a folder of your own (e.g. export {RUNTIME_ENV}=$HOME/.cache/vllm-notebook/run)"


def _owner(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name!r}"
    except KeyError:
        return f"uid {uid}"


def checked(path: str | os.PathLike, *, create: bool = True, fix: str = _FIX) -> Path:
    """``path``, a folder only this user can use: made 0700 if missing, closed (chmod 700) if open to others;
    ``UnsafePathError`` if it is a link, not a folder, or another user's. Its parent must exist."""
    path = Path(path)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symbolic link, which another user may have made to catch your files: "
                              f"remove it (rm {path}), or {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a folder: remove it, or {fix}")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to {_owner(st.st_uid)}, not you: what your engine wrote there could "
                              f"be read or replaced by them; {fix}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _usable_parent(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and os.access(path, os.W_OK | os.X_OK)


def runtime_dir() -> Path:
    """The user's private runtime folder (see the module's docstring), created and checked."""
    chosen = os.environ.get(RUNTIME_ENV, "").strip()
    if chosen:
        path = Path(chosen).expanduser().absolute()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return checked(path, fix=f"point {RUNTIME_ENV} at a folder of your own")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and _usable_parent(Path(xdg)) and os.stat(xdg).st_uid == os.geteuid():
        return checked(Path(xdg) / "vllm-notebook")
    base = os.environ.get("VLLM_NOTEBOOK_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    if not _usable_parent(Path(base)):
        base = "/tmp"
    return checked(Path(base) / f"vllm-notebook-{os.geteuid()}")


def _check_chosen_cache(var: str, value: str) -> None:
    """A cache folder the user chose (``$TORCHINDUCTOR_CACHE_DIR``, ``$TRITON_CACHE_DIR``): theirs, closed."""
    path = Path(value).expanduser()
    if not path.exists():
        return  # torch makes it, with our umask in the engine
    try:
        st = os.lstat(path)
    except OSError:
        return
    fix = f"unset {var} (vllm-notebook then uses a private one) or point it at a folder of your own"
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        what = "is a link" if stat.S_ISLNK(st.st_mode) else f"belongs to {_owner(st.st_uid)}"
        raise UnsafePathError(f"${var} is {path}, which {what}: torch would run code compiled there; {fix}")
    if st.st_mode & 0o022:
        raise UnsafePathError(f"${var} is {path}, which others can write to (mode {stat.S_IMODE(st.st_mode):o}): "
                              f"torch would run code compiled there; chmod 700 {path}, or {fix}")


def environment(tmp: Path | None = None) -> dict[str, str]:
    """The variables that keep a process's temp files, sockets and compile caches private: ``TMPDIR`` and vLLM's
    socket folder in ``tmp`` (default: the runtime folder), torch's and Triton's caches in the runtime folder."""
    root = runtime_dir()
    tmp = tmp or root
    env = {RUNTIME_ENV: str(root), "TMPDIR": str(tmp), "VLLM_RPC_BASE_PATH": str(tmp)}
    for var, sub in CACHES.items():
        mine = str(root / sub)
        value = os.environ.get(var, "").strip()
        if value and value != mine:
            _check_chosen_cache(var, value)
            env[var] = value
        else:
            env[var] = str(checked(root / sub))
    return env


def protect_process() -> Path:
    """Make this process's temp folder and caches private (``%load_ext``, every CLI command); sweep what dead
    engines left. Torch, if imported already, has its precompiled-header folder moved too. The runtime folder."""
    env = environment()
    if "VLLM_NOTEBOOK_TMPDIR" not in os.environ:  # the temp folder the user had: where runtime_dir() looks again
        os.environ["VLLM_NOTEBOOK_TMPDIR"] = os.environ.get("TMPDIR", "")
    os.environ.update(env)
    tempfile.tempdir = None  # gettempdir() reads $TMPDIR again
    move_torch_headers()
    with contextlib.suppress(OSError):
        sweep(Path(env[RUNTIME_ENV]))
    return Path(env[RUNTIME_ENV])


def move_torch_headers() -> None:
    """Torch inductor fixes its precompiled-header folder at import, from the temp folder: if torch was imported
    before ours was set (or in an engine process, where the per-engine temp folder would not keep them), point
    it into the private inductor cache."""
    codecache = sys.modules.get("torch._inductor.codecache")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if codecache is not None and cache and os.environ.get(RUNTIME_ENV):
        codecache._HEADER_DIR = os.path.join(cache, "precompiled_headers")


# ------------------------------------------------------------------ one folder per engine
def engine_dir(kind: str, name: str) -> Path:
    """A fresh private folder for one engine's sockets and rendezvous files (``kind``: ``kernel`` or
    ``server``), named with the pid that owns it so a later sweep knows when it is stale."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:40]
    root = runtime_dir()
    path = root / f"{kind}-{os.getpid()}-{safe}-{os.urandom(3).hex()}"
    return checked(path)


@contextlib.contextmanager
def engine_environment(folder: Path):
    """Inside the block, this process starts engine processes with ``folder`` as their temp and socket folder
    and umask 077 (restored after)."""
    env = environment(folder)
    tempfile.gettempdir()  # this process's own temp folder fixed first: never the engine's (removed at unload)
    old = {k: os.environ.get(k) for k in env}
    old_umask = os.umask(UMASK)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.umask(old_umask)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def remove(folder: str | os.PathLike | None, since: float | None = None) -> None:
    """Remove an engine's folder (its sockets, rendezvous files) and the shared-memory segments its processes
    left in ``/dev/shm`` (created after ``since``, mapped by no process of ours)."""
    if folder:
        path = Path(folder)
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
    if since is not None:
        sweep_shm(since)


def sweep(root: Path) -> None:
    """Remove engine folders in ``root`` whose process is gone (a kernel or server that was killed)."""
    for entry in root.iterdir():
        kind, _, rest = entry.name.partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("kernel", "server") or not pid.isdigit():
            continue
        if not _alive_since(int(pid), entry.stat().st_mtime):
            remove(entry)


def _alive_since(pid: int, mtime: float) -> bool:
    """Process ``pid`` runs and started before ``mtime`` (so it is the one that made the folder)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
    except (OSError, ValueError, StopIteration, IndexError):
        return False
    return boot + start_ticks / os.sysconf("SC_CLK_TCK") <= mtime + 1


SHM = Path("/dev/shm")
SHM_PREFIXES = ("psm_", "sem.mp-")  # Python's shared memory and multiprocessing's semaphores (vLLM's queues)


def sweep_shm(since: float) -> list[str]:
    """Remove this user's shared-memory segments in ``/dev/shm`` made after ``since`` that no process of this
    user maps or holds open: what a killed engine left behind (it cannot unlink them itself). Their names."""
    me = os.geteuid()
    candidates = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM):
            if not entry.name.startswith(SHM_PREFIXES):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if st.st_uid == me and st.st_ctime >= since - 1:
                    candidates[st.st_ino] = (entry.path, entry.name)
    if not candidates:
        return []
    for inode in _in_use():
        candidates.pop(inode, None)
    for path, _ in candidates.values():
        with contextlib.suppress(OSError):
            os.unlink(path)
    return sorted(name for _, name in candidates.values())


def _in_use() -> set[int]:
    """Inodes of ``/dev/shm`` files mapped or open in any process this user can inspect. By inode, not name: a
    POSIX semaphore is mapped under the temporary name glibc made it with (``sem.XXXXXX (deleted)``)."""
    used: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        used.add(int(line.split()[4]))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                        used.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return used

