"""Process control, in one place: own process groups, the watchdog, stopping groups, markers, free ports.

Engine processes live in their own process group, guarded by a watchdog.

Jupyter interrupts a kernel by sending SIGINT to its whole process group (and a
terminal sends Ctrl-C to its foreground group); vLLM's engine processes exit on
SIGINT, so pressing Stop would kill the engine. Every process that
multiprocessing starts while an engine starts therefore gets a process group of
its own, whatever the start method: *spawn* goes through
``multiprocessing.util.spawnv_passfds``, and so does the *forkserver* process
(vLLM uses one only in ``vllm serve``), whose children share its group; *fork*
— which vLLM picks on a GPU node when CUDA is not yet initialised in the kernel —
through ``popen_fork.Popen._launch``, where parent
and child both call ``setpgid`` (the shell's job-control idiom, so no signal
can fall between fork and the new group). The processes those children start
in turn (EngineCore's workers) stay in their parent's group. Not a session of
their own: a new session is a new scheduler autogroup on Linux, and
measured here that halved the engine's throughput. Because the kernel's group
no longer covers them, a watchdog process (in its own session, so no signal
for the kernel reaches it) kills them if the kernel dies without unloading,
even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import multiprocessing.popen_fork as mp_fork
import multiprocessing.util as mp_util
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
from pathlib import Path

_lock = threading.Lock()
_keep: list[subprocess.Popen] = []  # never garbage-collected, so subprocess never reaps them
_watchdog: subprocess.Popen | None = None


def guard(pgid: int, add: bool = True) -> None:
    """Have the watchdog kill process group ``pgid`` if this process dies first (``add=False``: stop guarding)."""
    _tell_watchdog(f"{'+' if add else '-'}{pgid}")


def remove_at_exit(folder, since: float = 0.0, add: bool = True) -> None:
    """Have the watchdog remove an engine's private ``folder`` (and the ``/dev/shm`` segments its processes
    made after ``since``) if this process dies first (``add=False``: it was removed already)."""
    _tell_watchdog(f"{'+' if add else '-'}D{since:.3f} {folder}")


def _tell_watchdog(line: str) -> None:
    global _watchdog
    with _lock:
        if _watchdog is None or _watchdog.poll() is not None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-m", "vllm_notebook._watchdog"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
            )
        try:
            _watchdog.stdin.write(line + "\n")
            _watchdog.stdin.flush()
        except OSError:  # pragma: no cover - watchdog died; the next call restarts it
            pass


def new_group() -> dict:
    """Popen keyword arguments that start the child in a process group of its own."""
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _adopt(pid: int) -> None:
    """Record ``pid`` as the leader of a group we started, and have the watchdog guard it."""
    _groups.append(pid)
    guard(pid)


def _spawn_in_own_group(path, args, passfds, _original=mp_util.spawnv_passfds):
    if any("resource_tracker" in str(a) for a in args):  # shared by the whole kernel: leave it be
        return _original(path, args, passfds)
    proc = subprocess.Popen(list(args), executable=path, pass_fds=tuple(sorted(map(int, passfds))),
                            close_fds=True, **new_group())
    _keep.append(proc)
    _adopt(proc.pid)
    return proc.pid


def _fork_in_own_group(self, process_obj, _original=mp_fork.Popen._launch):
    _original(self, process_obj)  # returns in the parent only; the child exits inside it
    with contextlib.suppress(OSError):  # the child may have set it already, or exited
        os.setpgid(self.pid, self.pid)
    _adopt(self.pid)


def _in_forked_child() -> None:
    """Runs in every child of ``os.fork``: inside the block, lead a new group and leave the block."""
    global _active, _watchdog
    if not _active:
        return
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # The child's own children (EngineCore's workers) stay in its group: undo the block here.
    _active = 0
    mp_util.spawnv_passfds = _ORIGINAL_SPAWN
    mp_fork.Popen._launch = _ORIGINAL_LAUNCH
    _watchdog = None
    _keep.clear()
    _groups.clear()


_ORIGINAL_SPAWN = mp_util.spawnv_passfds
_ORIGINAL_LAUNCH = mp_fork.Popen._launch
_active = 0  # how many own_process_group blocks are open
_groups: list[int] = []
os.register_at_fork(after_in_child=_in_forked_child)


@contextlib.contextmanager
def own_process_group():
    """Processes that multiprocessing starts inside this block (any start method) lead their own group."""
    global _active
    with _lock:
        _active += 1
        mp_util.spawnv_passfds = _spawn_in_own_group
        mp_fork.Popen._launch = _fork_in_own_group
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if not _active:
                mp_util.spawnv_passfds = _ORIGINAL_SPAWN
                mp_fork.Popen._launch = _ORIGINAL_LAUNCH


@contextlib.contextmanager
def main_script_hidden():
    """Processes that multiprocessing *spawns* inside this block do not run the user's script again.

    A spawned child re-imports the parent's ``__main__`` from its file, so in a plain script without
    ``if __name__ == "__main__":`` the child ran ``vllm_notebook.load()`` again and failed ("An attempt has been
    made to start a new process before the current process has finished its bootstrapping phase"). vLLM's
    processes need nothing from the script, so its file is hidden while they start (as in a kernel, whose
    ``__main__`` has none). A script run with ``python -m`` (a named module) is left alone.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = main is not None and path is not None and getattr(main, "__spec__", None) is None
    if hide:
        del main.__file__
    try:
        yield
    finally:
        if hide:
            main.__file__ = path


def started_groups() -> list[int]:
    return list(_groups)


def group_alive(pgid: int) -> bool:
    """A process of group ``pgid`` still runs (zombies, exited but not yet reaped, do not count: they hold
    nothing, and waiting for them to go cost an unload its whole grace period)."""
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def terminate_groups(pgids, grace: float = 10.0) -> None:
    """SIGTERM process groups, wait up to ``grace`` seconds for all of them, then SIGKILL what is left."""
    pgids = list(pgids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pgid in [g for g in pgids if group_alive(g)]:
            with contextlib.suppress(OSError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(group_alive(g) for g in pgids):
            time.sleep(0.05)


def terminate_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM a process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    terminate_groups([pgid], grace)


def stop_group(pgid: int, timeout: float = 10.0) -> None:
    """Terminate a process group we started (after vLLM's own shutdown, for stragglers)."""
    terminate_group(pgid, timeout)
    guard(pgid, add=False)


# ---------------------------------------------------------------- markers: find our processes again
def has_marker(pid: int, key: str, value: str) -> bool:
    """``pid`` is alive and has ``key=value`` in its environment (so it is ours, not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{key}={value}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def marked(key: str, value: str) -> list[int]:
    """Every process of this node with ``key=value`` in its environment (a server and its engine processes)."""
    return [p.pid for p in psutil.process_iter() if has_marker(p.pid, key, value)]


def alive(pid: int) -> bool:
    """``pid`` is a running process (not a zombie waiting for its parent)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def renamed_in_session(sid: int, prefix: str = "VLLM::") -> list[int]:
    """Processes of session ``sid`` whose title vLLM set (``VLLM::EngineCore``, ``VLLM::Worker_TP0``).

    setproctitle reuses the memory that ``/proc/PID/environ`` shows, so a marker there can be lost (seen: a
    variable first in the environment was gone after a short title; one last in it survived in EngineCore). A
    session's id stays with its processes after its leader dies, and Linux gives no new process that number
    while the session lives, so a dead leader's session holds only its own processes; a live leader must be
    checked by the caller (its pid may be a new process's, leading a session of its own).
    """
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if (p.info["name"] or "").startswith(prefix) and os.getsid(p.pid) == sid:
                found.append(p.pid)
        except OSError:
            continue
    return found


# ---------------------------------------------------------------- ports
def free_port(host: str = "127.0.0.1", *, start: int | None = None, span: int = 1,
              scan: tuple[int, int] | None = None, step: int = 1, tries: int = 200) -> int:
    """A port on ``host`` with ``span`` free ports from it.

    By default any port the kernel picks; ``start``: the first free one of ``tries`` from ``start`` up (easy
    to type in an ``ssh -L`` line; ``tries=1``: exactly ``start``); ``scan=(low, high)``: a random one in that range, at multiples of ``step`` (a block
    for a service that needs several ports, e.g. Ray's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if start is None and scan is None:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    if start is not None:
        candidates = list(range(start, start + tries))
    else:
        candidates = random.SystemRandom().sample(range(scan[0], scan[1], step), k=min(50, (scan[1] - scan[0]) // step))
    for base in candidates:
        try:
            for port in range(base, base + span):
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return base
    where = f"from {start} ({tries} tried)" if start is not None else f"in {scan[0]}-{scan[1]}"
    raise OSError(f"no {span} free port(s) on {host} {where}")


# ------------------------------------------------------------------ sharing the cores with the notebook server
#: The autogroup nice a session takes while a CPU engine of it runs (``share_cores``); 0 turns that off.
CPU_NICE_ENV = "VLLM_NOTEBOOK_CPU_NICE"
_sharing = 0
_nice_before: int | None = None  # the session's nice before we raised it
_nice_set: int | None = None  # what we raised it to (None: we did not)


def _autogroup_nice(pid: int | str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().rsplit("nice", 1)[1])
    except (OSError, ValueError, IndexError):  # not Linux, or a kernel without autogroups
        return None


def _cpu_nice() -> int:
    try:
        return int(os.environ.get(CPU_NICE_ENV, "10"))
    except ValueError:
        return 10


def share_cores(pid: int | str = "self") -> int | None:
    """Lower the scheduler weight of ``pid``'s session (a Linux autogroup: a kernel and the engines it starts, or a
    server started in its own session) to nice ``$VLLM_NOTEBOOK_CPU_NICE`` (10 unless set), while a CPU engine runs
    in a Jupyter kernel (a script has no notebook server to make room for, and is left alone).

    vLLM's CPU engine keeps every core busy while it generates, and Linux then holds back processes of other
    sessions for seconds, such as the Jupyter server that relays streamed text and the Stop button (measured on
    2 cores: updates in bursts 2.7 s apart, Stop acting after the run had ended). At nice 10 the engine still gets
    every core no one else wants, so its throughput is unchanged (``docs/performance.md``), and the server gets
    the moment it needs. Only raises the nice (lowering it needs privileges). Returns the nice it set, or None
    where it set none (already as low, turned off, no autogroups)."""
    nice = _cpu_nice()
    before = _autogroup_nice(pid)
    if before is None or nice <= 0 or before >= nice:
        return None
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        return None
    return nice


def share_cores_while(started: bool) -> None:
    """Count this process's CPU engines: the first one lowers the session's weight (``share_cores``); when the last
    one stops, the weight it had comes back, unless someone has set another since (theirs stands)."""
    global _sharing, _nice_before, _nice_set
    with _lock:
        if started:
            _sharing += 1
            if _sharing == 1:
                _nice_before = _autogroup_nice("self")
                _nice_set = share_cores()
        elif _sharing > 0:
            _sharing -= 1
            if _sharing == 0 and _nice_set is not None and _nice_before is not None \
                    and _autogroup_nice("self") == _nice_set:
                with contextlib.suppress(OSError):  # lowering it back to where it was is allowed
                    Path("/proc/self/autogroup").write_text(str(_nice_before))
            if _sharing == 0:
                _nice_set = None
