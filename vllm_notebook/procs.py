"""Engine processes live in their own process group, guarded by a watchdog.

Jupyter interrupts a kernel by sending SIGINT to its whole process group (and a
terminal sends Ctrl-C to its foreground group); vLLM's engine processes exit on
SIGINT, so pressing Stop would kill the engine. Processes that multiprocessing
spawns while an engine starts therefore get a process group of their own. Not a
session of their own: a new session is a new scheduler autogroup on Linux, and
measured here that halved the engine's throughput. Because the kernel's group
no longer covers them, a watchdog process (in its own session, so no signal
for the kernel reaches it) kills them if the kernel dies without unloading,
even by SIGKILL.
"""

from __future__ import annotations

import contextlib
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


def _spawn_in_own_group(path, args, passfds, _original=mp_util.spawnv_passfds):
    if any("resource_tracker" in str(a) for a in args):  # shared by the whole kernel: leave it be
        return _original(path, args, passfds)
    proc = subprocess.Popen(list(args), executable=path, pass_fds=tuple(sorted(map(int, passfds))),
                            close_fds=True, **new_group())
    _keep.append(proc)
    _guard(proc.pid)
    return proc.pid


@contextlib.contextmanager
def own_process_group():
    """Processes that multiprocessing spawns inside this block start in their own process group."""
    original = mp_util.spawnv_passfds
    mp_util.spawnv_passfds = _spawn_in_own_group
    try:
        yield
    finally:
        mp_util.spawnv_passfds = original


def started_groups() -> list[int]:
    return [p.pid for p in _keep]


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
