"""The cluster layer against real Slurm daemons (scripts/dev-cluster) and real Ray processes.

A two-node allocation (`salloc -N2 --gres=gpu:2`) on the dev cluster; a kernel runs
inside it on n1 (as JupyterHub's batch spawner runs one), started through srun.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nbformat
import psutil
import pytest
from kernel import Kernel, kernel_manager, ray_gone, ray_processes
from nbclient import NotebookClient
from test_replicas import assert_whole_after_a_cut

ROOT = Path(__file__).parent.parent
# scripts/dev-cluster's cluster of this checkout (its folder named by a hash of the checkout's path)
_CHECKOUT = str(Path(__file__).resolve().parent.parent).encode()
_DEV_CLUSTER = os.environ.get("VLLM_NOTEBOOK_DEV_CLUSTER") or f"/var/tmp/vnb-cluster-{hashlib.sha256(_CHECKOUT).hexdigest()[:8]}"
SLURM_CONF = os.environ.get("SLURM_CONF") or f"{_DEV_CLUSTER}/etc/slurm.conf"


def _nodes_ready(env: dict) -> bool | None:
    """Both dev nodes can take jobs (None: no Slurm answers at all)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    if out.returncode != 0:
        return None
    states = out.stdout.split()  # a trailing * (not responding), down, drained...: not ready
    return len(states) == 2 and all(s in ("idle", "mixed", "allocated") for s in states)


def _cluster_up() -> bool:
    """The dev cluster answers with both nodes up; started, or restarted when a node is gone, as CI needs it."""
    env = {**os.environ, "SLURM_CONF": SLURM_CONF}
    start = ["bash", str(ROOT / "scripts" / "dev-cluster"), "up"]
    if not shutil.which("sinfo"):
        return subprocess.run(start, capture_output=True).returncode == 0
    deadline = time.monotonic() + 60  # a node that stopped answering under load comes back by itself (ReturnToService)
    while (ready := _nodes_ready(env)) is False and time.monotonic() < deadline:
        time.sleep(2)
    if ready:
        return True
    if ready is False:  # said loudly: it shows in pytest's warnings summary even when the tests then pass
        warnings.warn(f"dev Slurm nodes not ready after 60 s; restarting the dev cluster\n{slurm_report()}")
    return subprocess.run(start, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def job():
    if not _cluster_up():
        if os.environ.get("CI"):
            pytest.fail("the dev Slurm cluster did not start (scripts/dev-cluster up)")
        pytest.skip("no Slurm here: run scripts/dev-cluster up (needs root and Debian's slurm packages)")
    os.environ["SLURM_CONF"] = SLURM_CONF
    left = subprocess.run(["squeue", "-h", "-o", "%i %j %T %R"], capture_output=True, text=True).stdout.strip()
    if left:  # a job an earlier test left would hold the nodes: named in the warnings summary, then cancelled
        warnings.warn(f"jobs left in the dev cluster before test_cluster: {left}")
        subprocess.run(["scancel", "--user", str(os.getuid())])
    # --immediate: a request not granted in time leaves the queue with salloc, not as a job that takes every node later
    try:
        out = subprocess.run(["salloc", "-N2", "--gres=gpu:2", "-t", "30", "--no-shell", "--immediate=150",
                              "-J", "vnb-test-allocation"], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "-n", "vnb-test-allocation"])
        pytest.fail(f"salloc -N2 --gres=gpu:2 not answered in 180 s\n{slurm_report()}")
    if "Granted job allocation" not in out.stderr:
        pytest.fail(f"salloc -N2 --gres=gpu:2: {out.stderr.strip()}\n{slurm_report()}")
    job_id = out.stderr.split("Granted job allocation")[1].split()[0]
    yield job_id
    subprocess.run(["scancel", job_id])


def slurm_report() -> str:
    """What a failed Slurm test needs to say: the nodes, the queue and the daemons' last log lines."""
    env = {**os.environ, "SLURM_CONF": SLURM_CONF}
    parts = []
    for cmd in (["sinfo", "-N", "-o", "%N %T %E %C %G"], ["squeue", "-o", "%i %j %T %R %M %D"]):
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
            parts.append(f"$ {' '.join(cmd)}\n{run.stdout}{run.stderr}")
        except subprocess.TimeoutExpired:
            parts.append(f"$ {' '.join(cmd)}: no answer in 30 s")
    for log in sorted((Path(SLURM_CONF).parent.parent / "log").glob("slurm*.log")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    load = os.getloadavg()[0]
    return f"load {load:.1f}\n" + "\n".join(parts)


def _in_step(job_id: str, node: str = "n1") -> list[str]:
    return ["srun", f"--jobid={job_id}", "--overlap", "-N1", "-n1", "-w", node, "--gres=gpu:2"]


def _on_node(job_id: str, node: str, cmd: list[str]) -> str:
    """``cmd``'s output, run on ``node`` inside the allocation (a job step)."""
    out = subprocess.run(_in_step(job_id, node) + cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{cmd} on {node}: {out.stderr}"
    return out.stdout.strip()


def test_each_node_has_a_tmp_of_its_own(job):
    """The dev cluster is as strict as a real one: a path in one node's /tmp is not on another node."""
    name = f"/tmp/vnb-probe-{os.getpid()}"
    _on_node(job, "n1", ["touch", name])
    assert _on_node(job, "n1", ["ls", name]) == name
    assert _on_node(job, "n2", ["sh", "-c", f"test -e {name} && echo seen || echo absent"]) == "absent"
    assert not os.path.exists(name)


@pytest.fixture(scope="module")
def slurm_kernel(job, tmp_path_factory):
    """A kernelspec whose kernel runs inside the allocation, on n1."""
    path = tmp_path_factory.mktemp("jupyter")
    spec = path / "kernels" / "slurm-n1"
    spec.mkdir(parents=True)
    argv = _in_step(job) + [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "n1", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(path)
    yield "slurm-n1"
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_allocation_reads_what_slurm_set(job):
    code = ("import json; from vllm_notebook.cluster.allocation import Allocation; a = Allocation.from_env(); "
            "print(json.dumps(dict(nodes=a.nodes, gpus=a.gpus_per_node, ids=a.gpu_ids, job=a.job_id, node=a.node_name, "
            "addr=a.node_addr(), addr2=a.node_addr('n2'), left=a.time_left(), step=a.in_step, cpus=a.cpus_per_node)))")
    out = subprocess.run(_in_step(job) + [sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["nodes"] == ["n1", "n2"] and info["gpus"] == 2 and info["ids"] == ["0", "1"]
    assert info["job"] == job and info["node"] == "n1" and info["step"] is True
    assert info["addr"] == "127.0.0.2" and info["addr2"] == "127.0.0.3"
    assert 0 < info["left"] <= 1800 and len(info["cpus"]) == 2


def test_kernel_in_allocation_plans_and_runs_ray(job, slurm_kernel, demo_path):
    k = Kernel(slurm_kernel)
    try:
        k.run("%load_ext vllm_notebook")
        out = k.run(f"p = %vllm_load {demo_path} --dry-run\nprint(p)\nprint(p.engine_args)")
        assert "'tensor_parallel_size': 2, 'pipeline_parallel_size': 2, 'distributed_executor_backend': 'ray'" in out
        assert "nodes" in out and "n1, n2" in out
        out = k.run(f"p = %vllm_load {demo_path} --server --dry-run\nprint(' '.join(p.server_command))")
        assert ("--tensor-parallel-size 2 --pipeline-parallel-size 2 --distributed-executor-backend ray "
                "--disable-uvicorn-access-log --middleware vllm_notebook.server.guard.RequireKey "
                "--disable-fastapi-docs --allowed-origins [] --host 127.0.0.1 --port FREE_PORT") in out, out
        _, error = k.collect(k.submit(f"%vllm_load {demo_path} --dry-run --pipeline-parallel-size 4"))
        assert error["ename"] == "PlanError" and len(error["traceback"]) == 1, error
        assert "more than the model's 2 layers" in error["evalue"] or "GPUs" in error["evalue"]

        t0 = time.monotonic()
        out = k.run("%vllm_cluster --up", timeout=240)
        assert "2 / 4" in out, out
        up_seconds = time.monotonic() - t0
        env = json.loads(k.run("import os, json; print(json.dumps({k: os.environ[k] for k in "
                               "('RAY_ADDRESS', 'RAY_AUTH_TOKEN_PATH', 'RAY_AUTH_MODE')}))").strip())
        assert env["RAY_AUTH_MODE"] == "token"
        assert _on_node(job, "n1", ["stat", "-c", "%a", env["RAY_AUTH_TOKEN_PATH"]]) == "600"
        # Issue 13, item 3: each node writes the token it got on stdin into a private folder of its own
        # (a worker's /tmp is not the head's: each dev-cluster node has a /tmp of its own, as on a real cluster).
        root = Path(env["RAY_AUTH_TOKEN_PATH"]).parent
        assert not root.exists(), "the head's /tmp is the head node's own"
        token = _on_node(job, "n1", ["cat", env["RAY_AUTH_TOKEN_PATH"]])
        for i, node in enumerate(("n1", "n2")):
            node_token = root / f"auth-n{i}" / "token"
            assert _on_node(job, node, ["cat", str(node_token)]) == token
            modes = _on_node(job, node, ["stat", "-c", "%a", str(node_token), str(node_token.parent), str(root)])
            # Ray makes its temp folder world-writable; it sits in our 0700 folder, which nobody else can enter
            assert modes.split() == ["600", "700", "700"], (node, modes)
            assert _on_node(job, node, ["test", "-d", str(root / f"n{i}")]) == ""
        assert token not in " ".join(" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
        # ... and the kernel itself reaches the cluster with plain ray.init(): address and token are in its env
        out = k.run("import ray\nray.init(logging_level='ERROR')\n"
                    "print('KERNEL', ray.cluster_resources().get('GPU'))\nray.shutdown()", timeout=120)
        assert "KERNEL 4.0" in out, out

        probe = ("import ray\ntry:\n    ray.init(address='{a}', logging_level='ERROR')\n"
                 "    r = ray.cluster_resources(); print('OK', r.get('GPU'), len([n for n in ray.nodes() if n['Alive']]))\n"
                 "except Exception as e:\n    print('REFUSED', type(e).__name__)\n").format(a=env["RAY_ADDRESS"])
        with_token = subprocess.run(_in_step(job) + [sys.executable, "-c", probe], capture_output=True, text=True,
                                    timeout=120, env={**os.environ, **env})
        assert "OK 4.0 2" in with_token.stdout, with_token.stdout + with_token.stderr[-2000:]
        no_token = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(_in_step(job) + [sys.executable, "-c", probe], capture_output=True, text=True,
                                 timeout=90, env=no_token)
        assert "REFUSED" in refused.stdout and "OK" not in refused.stdout

        out = k.run("%vllm_cluster --down", timeout=60)
        assert "stopped the Ray cluster" in out
        cleared = k.run("import os; print(*[k in os.environ for k in ('RAY_ADDRESS', 'RAY_AUTH_TOKEN_PATH')])")
        assert cleared.split() == ["False", "False"], "--down takes the cluster's settings out of the kernel"
        assert not (left := ray_gone(20)), left

        k.run("%vllm_cluster --up", timeout=240)
        assert ray_processes()
        k.run("%unload_ext vllm_notebook")
        assert not (left := ray_gone(20)), f"left behind after %unload_ext: {left}"

        k.run("%load_ext vllm_notebook\n%vllm_cluster --up", timeout=240)
        assert ray_processes()
    finally:
        k.shutdown()
    assert not (left := ray_gone()), f"left behind after kernel shutdown: {left}"
    print(f"Ray head + worker up in {up_seconds:.1f} s")


def _replica_steps(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-s", "-h", "-j", job, "-o", "%i %j %N"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "vnb-replica" in ln]


def test_replicas_over_the_allocations_nodes_run_as_job_steps(job, slurm_kernel, demo_path, shared_path):
    """Issue 33: ``--replicas 2`` in a kernel of a two-node allocation: a replica on each node, each a
    ``vllm serve`` in a job step (srun --overlap); a batch uses both and is one engine's greedy result in order;
    n2's step cancelled mid-batch: the batch ends whole and right, each prompt journaled once, the footer says
    what happened; %vllm_unload ends the other step."""
    # One sequence at a time on every engine: a greedy text is then the same whichever replica runs it and with
    # whichever others (in a batch, a near-tie of the random demo model can flip with the batch's shape).
    flags = "--enforce-eager --max-model-len 512 --max-num-seqs 1"
    journal = shared_path / "replicas.vllm-journal.jsonl"  # the kernel runs on n1: not this machine's /tmp
    k = Kernel(slurm_kernel, env={"VLLM_NOTEBOOK_JOURNAL": str(journal)})
    try:
        k.run(f"%load_ext vllm_notebook\n%vllm_load {demo_path} {flags} --name one -tp 1 -pp 1\n"  # on n1 alone
              "prompts = [f'Tell me about the number {i}.' for i in range(12)]\n"
              "ref = %generate -i prompts --name one --max-tokens 24 --temperature 0 --ignore-eos --no-journal\n"
              "longer = [f'Tell me about the colour {i}.' for i in range(24)]\n"
              "ref2 = %generate -i longer --name one --max-tokens 128 --temperature 0 --ignore-eos --no-journal\n"
              "%vllm_unload --name one", timeout=300)
        out = k.run(f"p = %vllm_load {demo_path} {flags} --replicas 2 --dry-run\nprint(p)")
        assert "2 over 2 nodes" in out, out
        # Ctrl-C while both steps load (they start together): both ended, one line, the kernel goes on
        kernel_pid = next(p.pid for p in psutil.process_iter(["cmdline"])
                          if "ipykernel_launcher" in " ".join(p.info["cmdline"] or [])
                          and k.km.connection_file in " ".join(p.info["cmdline"] or []) and "srun" not in
                          (p.info["cmdline"] or [""])[0])
        msg = k.submit(f"%vllm_load {demo_path} {flags} --replicas 2")
        deadline = time.monotonic() + 120
        while len(_replica_steps(job)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_replica_steps(job)) == 2
        os.kill(kernel_pid, signal.SIGINT)
        out, error = k.collect(msg, timeout=120)
        assert error is not None and "load interrupted; the 0 replica(s) started were stopped" in error["evalue"], \
            (error, out[-800:])
        assert not _replica_steps(job) and k.run("print(6 * 7)").strip() == "42"
        out = k.run(f"eng = %vllm_load {demo_path} {flags} --replicas 2\n"
                    "print(eng.backend.place(), [p['where'] for p in eng.backend.parts()])", timeout=600)
        assert "2 replicas (job steps" in out and "['n1', 'n2']" in out, out
        steps = _replica_steps(job)
        assert sorted(ln.split()[-1] for ln in steps) == ["n1", "n2"], steps
        out = k.run("g = %generate -i prompts --max-tokens 24 --temperature 0 --ignore-eos --no-journal\n"
                    "print(g.texts == ref.texts, min(p['served'] for p in eng.backend.parts()))", timeout=300)
        same, least = out.strip().splitlines()[-1].split()
        assert same == "True" and int(least) > 0, out[-1500:]
        status = k.run("%vllm_status")
        assert "n1" in status and "n2" in status and "serving" in status, status

        n2 = next(ln.split()[0] for ln in steps if ln.split()[-1] == "n2")
        msg = k.submit("g2 = %generate -i longer --max-tokens 128 --temperature 0 --ignore-eos\n"
                                              "print(g2.texts == ref2.texts, g2.provenance['run'])\nprint(g2.footer())")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # n2's step cancelled once 3 results are journaled
            results = journal.read_text().count('"kind":"result"') if journal.exists() else 0
            if results >= 3:
                subprocess.run(["scancel", n2])
                break
            time.sleep(0.05)
        out, error = k.collect(msg, timeout=400)
        assert error is None, error
        assert_whole_after_a_cut(k, out, journal, 24)
        out = k.run("%vllm_unload", timeout=120)
        assert "unloaded engine 'default'" in out, out
        deadline = time.monotonic() + 60
        while _replica_steps(job) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _replica_steps(job), _replica_steps(job)
    finally:
        k.shutdown()


def test_multi_node_notebook_runs_in_the_allocation(slurm_kernel, demo_path, shared_path):
    nb = nbformat.read(ROOT / "notebooks" / "multi_node.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, km=kernel_manager(slurm_kernel),
                   resources={"metadata": {"path": str(shared_path)}}).execute()
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "n1, n2" in text and "ray" in text and "2 / 4" in text and "stopped the Ray cluster" in text
    assert "('n1', " in text and "('n2', " in text and "unloaded engine 'default'" in text  # the replicas' cells
    assert "Traceback" not in text
    assert not (left := ray_gone(20)), left


def _alloc(job: str, nodes: list[str]):
    from vllm_notebook.cluster.allocation import Allocation

    return Allocation(source="slurm", nodes=nodes, gpus_per_node=2, cpus_per_node=[1] * len(nodes), job_id=job,
                      node_name="n1", env={"SLURM_CONF": SLURM_CONF})


def test_attached_cluster_is_never_stopped(job, monkeypatch):
    from vllm_notebook.cluster import ray as ray_cluster

    owned = ray_cluster.start(_alloc(job, ["n1", "n2"]), timeout=120)
    try:
        for key, value in owned.env().items():
            monkeypatch.setenv(key, value)
        attached = ray_cluster.up(_alloc(job, ["n1", "n2"]))  # $RAY_ADDRESS is set: attach
        assert not attached.owned and attached.address == owned.address
        assert "not stopped" in ray_cluster.down()
        st = owned.status()
        assert st["reachable"] and st["nodes"] == 2 and st["gpus"] == 4 and st["gpus_used"] == 0
    finally:
        owned.stop()
    assert not (left := ray_gone(20)), left


@pytest.mark.slow
def test_a_cluster_brought_up_by_hand_stays_until_down_one_a_load_started_stops_with_it(monkeypatch):
    """No Slurm (one machine): Ray started by ``%vllm_cluster --up`` outlives the last engine on it, its GPUs
    back with Ray, until ``--down``; one that a load started for itself stops when that engine unloads.
    The CPU build cannot run vLLM's Ray executor, so the engine here is only what unload hands the hook."""

    from vllm_notebook import loader
    from vllm_notebook.cluster import ray as ray_cluster
    from vllm_notebook.cluster.allocation import Allocation

    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    alloc = Allocation.from_env({k: v for k, v in os.environ.items() if not k.startswith("SLURM")}, gpu_count=0)
    try:
        by_hand = ray_cluster.up(alloc, keep=True)
        assert ray_cluster.up(alloc) is by_hand and by_hand.kept  # a load reuses it and keeps it kept
        loader._stop_ray_when_unused(by_hand)
        assert ray_cluster.current() is by_hand and by_hand.status()["reachable"]
        assert "stopped the Ray cluster" in ray_cluster.down()
        assert not (left := ray_gone(20)), left

        for_a_load = ray_cluster.up(alloc)
        assert not for_a_load.kept
        loader._stop_ray_when_unused(for_a_load)
        assert ray_cluster.current() is None and "RAY_ADDRESS" not in os.environ
    finally:
        ray_cluster.down()
    assert not (left := ray_gone(20)), left


def test_a_node_that_cannot_join_is_named_with_its_log(job):
    from vllm_notebook.cluster import ray as ray_cluster

    with pytest.raises(ray_cluster.RayClusterError, match="nosuchnode") as info:
        ray_cluster.start(_alloc(job, ["n1", "nosuchnode"]), timeout=60)
    assert "srun" in str(info.value) and "\n" not in str(info.value)
    assert not (left := ray_gone(20)), left


# ------------------------------------------------------------------ the CLI inside the allocation
CLI = [sys.executable, "-m", "vllm_notebook.cli"]


def test_doctor_inside_the_allocation(job):
    out = subprocess.run(_in_step(job) + [*CLI, "doctor", "--no-hub"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert f"job {job} (inside a job step)" in text and "nodes 2: n1, n2" in text, text
    assert "GPUs per node 2" in text and "Slurm version 22.05" in text and "this node n1" in text, text
    assert "not inside a Slurm job" not in text


def _wait_for(path_or_proc, marker: str, timeout: float = 90) -> str:
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = Path(path_or_proc).read_text() if Path(path_or_proc).exists() else ""
        if marker in text:
            return text
        time.sleep(0.3)
    raise AssertionError(f"{marker!r} not seen in {timeout} s: {text}\n{slurm_report()}")


def _check_jupyter(text: str) -> None:
    import urllib.error
    import urllib.request

    ssh = [ln for ln in text.splitlines() if "ssh -N -L" in ln][0]
    port, addr, _ = ssh.split("-L ")[1].split()[0].split(":")
    shown = [ln for ln in text.splitlines() if "then open:" in ln][0].split()[-1]
    url_file = Path([ln for ln in text.splitlines() if "the URL with its token is in" in ln][0].split()[-1])
    url = url_file.read_text().strip()
    token = url.split("token=")[1]
    # issue 13, item 2: the job's output file is made with the user's umask; the token stays out of it
    assert token not in text and shown == f"http://localhost:{port}/lab"
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600 and stat.S_IMODE(url_file.parent.stat().st_mode) == 0o700
    assert addr == "127.0.0.2" and url.startswith(f"http://localhost:{port}/lab?token=")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 90
    while True:
        try:
            with opener.open(f"http://{addr}:{port}/api/status?token={token}", timeout=5) as r:
                assert r.status == 200
                break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with pytest.raises(urllib.error.HTTPError) as denied:
        opener.open(f"http://{addr}:{port}/api/status", timeout=5)
    assert denied.value.code == 403


def test_jupyter_on_the_compute_node(job, shared_path):
    log = shared_path / "jupyter.out"
    with open(log, "w") as f:
        proc = subprocess.Popen(_in_step(job) + [*CLI, "jupyter", "--", f"--ServerApp.root_dir={shared_path}"],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        _check_jupyter(_wait_for(log, "then open:"))
    finally:
        proc.terminate()
        proc.wait(30)
