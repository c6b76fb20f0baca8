"""Engine processes live in their own process group, guarded by a watchdog.

Jupyter interrupts a kernel by sending SIGINT to its whole process group (and a
terminal sends Ctrl-C to its foreground group); vLLM's engine processes exit on
SIGINT, so pressing Stop would kill the engine. Every process that
multiprocessing starts while an engine starts therefore gets a process group of
its own, whatever the start method: *spawn* goes through
``multiprocessing.util.spawnv_passfds``, and so does the *forkserver* process
(vLLM uses one only in ``vllm serve``), whose children share its group; *fork* — which vLLM picks on a GPU node when CUDA is not yet
initialised in the kernel — through ``popen_fork.Popen._launch``, where parent
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
import signal
import subprocess
import sys
import threading

_lock = threading.Lock()
_keep: list[subprocess.Popen] = []  # never garbage-collected, so subprocess never reaps them
_watchdog: subprocess.Popen | None = None


def _guard(pgid: int, add: bool = True) -> None:
    global _watchdog
    with _lock:
        if _watchdog is None or _watchdog.poll() is not None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-m", "vllm_notebook._watchdog"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
            )
        try:
            _watchdog.stdin.write(f"{'+' if add else '-'}{pgid}\n")
            _watchdog.stdin.flush()
        except OSError:  # pragma: no cover - watchdog died; the next call restarts it
            pass


def new_group() -> dict:
    """Popen keyword arguments that start the child in a process group of its own."""
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _adopt(pid: int) -> None:
    """Record ``pid`` as the leader of a group we started, and have the watchdog guard it."""
    _groups.append(pid)
    _guard(pid)


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


def started_groups() -> list[int]:
    return list(_groups)


def terminate_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM a process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    import time

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.05)


def stop_group(pgid: int, timeout: float = 10.0) -> None:
    """Terminate a process group we started (after vLLM's own shutdown, for stragglers)."""
    terminate_group(pgid, timeout)
    _guard(pgid, add=False)
