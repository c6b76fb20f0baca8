"""Engine processes lead their own process group whatever multiprocessing's start method (no vLLM needed).

vLLM starts EngineCore with *fork* on a GPU node whose kernel has not touched CUDA, and with *spawn*
otherwise (always on the CPU build); a forked EngineCore once stayed in the kernel's group and died
of Jupyter's SIGINT. The child script below plays the kernel: it starts an "engine" process (which
starts a "worker" of its own) inside ``own_process_group``, then sends SIGINT to its own group as
Jupyter's interrupt does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

KERNEL = textwrap.dedent("""
    import json, multiprocessing as mp, os, signal, sys, time
    from vllm_notebook import procs

    def worker():
        time.sleep(60)

    def engine(q, method):
        w = mp.get_context(method).Process(target=worker, daemon=True)
        w.start()
        q.put((os.getpid(), os.getpgrp(), w.pid))
        time.sleep(60)

    if __name__ == "__main__":
        method = sys.argv[1]
        ctx = mp.get_context(method)
        q = ctx.Queue()
        t = time.perf_counter()
        with procs.own_process_group():
            p = ctx.Process(target=engine, args=(q, method))
            p.start()
        pid, pgid, worker_pid = q.get(timeout=60)
        start_s = time.perf_counter() - t
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the kernel survives its interrupt, as ipykernel does
        os.killpg(os.getpgrp(), signal.SIGINT)         # Jupyter's interrupt: the kernel's whole group
        time.sleep(0.5)
        print(json.dumps({"kernel_pgid": os.getpgrp(), "pid": pid, "pgid": pgid, "worker": worker_pid,
                          "worker_pgid": os.getpgid(worker_pid), "alive": p.is_alive(),
                          "groups": procs.started_groups(), "start_s": start_s}), flush=True)
        if sys.argv[2] == "stop":
            procs.stop_group(pgid, timeout=5)
            print(json.dumps({"after_stop": p.is_alive() if p.exitcode is None else False}), flush=True)
        else:
            time.sleep(60)   # wait to be SIGKILLed: the watchdog must clean up
""")


def _kernel(tmp_path, method: str, mode: str) -> subprocess.Popen:
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL)
    # A group of its own, as a kernel has: the SIGINT it sends itself reaches nobody else.
    return subprocess.Popen([sys.executable, str(script), method, mode], stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()}, process_group=0)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_engine_survives_the_kernels_interrupt_and_stops_with_its_group(tmp_path, method):
    k = _kernel(tmp_path, method, "stop")
    facts = json.loads(k.stdout.readline())
    assert facts["alive"], f"{method}: the engine died of the kernel's SIGINT"
    assert facts["pgid"] != facts["kernel_pgid"]
    if method == "forkserver":  # the forkserver (started in the block) leads the group of all it forks
        assert facts["groups"] == [facts["pgid"]] != [facts["pid"]]
    else:
        assert facts["pgid"] == facts["pid"], "the engine leads its group"
        assert facts["groups"] == [facts["pid"]], "exactly the engine is recorded"
    assert facts["worker_pgid"] == facts["pgid"], "the engine's own workers share its group"
    assert json.loads(k.stdout.readline()) == {"after_stop": False}
    assert k.wait(timeout=30) == 0
    assert not psutil.pid_exists(facts["worker"]) or psutil.Process(facts["worker"]).status() == "zombie"


def test_forked_engine_is_reaped_by_the_watchdog_when_the_kernel_is_killed(tmp_path):
    k = _kernel(tmp_path, "fork", "wait")
    facts = json.loads(k.stdout.readline())
    assert facts["alive"]
    k.kill()
    k.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(p) for p in (facts["pid"], facts["worker"])):
        time.sleep(0.1)
    assert not any(_running(p) for p in (facts["pid"], facts["worker"]))


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_block_is_left_as_found():
    import multiprocessing.popen_fork as mp_fork
    import multiprocessing.util as mp_util

    from vllm_notebook import procs

    before = (mp_util.spawnv_passfds, mp_fork.Popen._launch)
    with procs.own_process_group():
        with procs.own_process_group():
            pass
        assert mp_util.spawnv_passfds is not before[0]
    assert (mp_util.spawnv_passfds, mp_fork.Popen._launch) == before


SERVER = textwrap.dedent("""
    import os, subprocess, sys, time
    # The "api server" leads its session, as server.process.start makes it. Its "engine" is titled as vLLM titles
    # EngineCore (setproctitle); the marker comes first in its environment, where a title overwrites it.
    engine = subprocess.Popen([sys.executable, "-c", "import setproctitle, time; "
                               "setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(60)"],
                              env={"VLLM_NOTEBOOK_SERVER": sys.argv[1], **os.environ})
    print(engine.pid, flush=True)
    time.sleep(60)
""")


def test_a_retitled_engine_left_by_a_dead_server_is_found_and_killed(tmp_path, monkeypatch):
    import socket

    from vllm_notebook import procs
    from vllm_notebook.server import record as registry

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))
    rec = registry.ServerRecord(id="test-retitled", model="m", argv=[], node=socket.gethostname(),
                                key_file="/nonexistent")
    leader = subprocess.Popen([sys.executable, "-c", SERVER, rec.id], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, registry.MARKER: rec.id}, start_new_session=True)
    engine = None
    try:
        rec.pid, engine = leader.pid, int(leader.stdout.readline())
        deadline = time.monotonic() + 20
        while not psutil.Process(engine).name().startswith("VLLM::") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.has_marker(engine, registry.MARKER, rec.id)  # the title took it
        assert sorted(rec.members()) == sorted([leader.pid, engine])
        leader.kill()  # the server dies; its engine is left, in the session the server led
        leader.wait()
        assert rec.members() == [engine]
        registry.forget(rec)
        psutil.Process(engine).wait(timeout=5)  # gone (psutil.TimeoutExpired if not)
    finally:
        leader.kill()
        if engine is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(engine).kill()
