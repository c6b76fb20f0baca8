"""A Ray cluster across the allocated nodes, for multi-node vLLM.

``up(alloc)`` attaches to ``$RAY_ADDRESS`` (or an address the user gives) and never
stops a cluster it only attached to. Otherwise it starts a head on this node and one
worker per other node through ``srun --overlap``, each bound to its node's address,
with explicit ports outside Ray's default worker range, a short node-local temp dir
and token authentication always on: the token lives in a file only the user can read,
so nobody else on a shared node can submit work to the cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import procs
from ..errors import VllmNotebookError
from ..logs import tail

PORT_SPAN = 20  # fixed ports per node
JOINED = ("This command will now block forever", "Ray runtime started")


class RayClusterError(VllmNotebookError):
    """The Ray cluster could not be started, reached or stopped."""


@dataclass
class NodeProc:
    node: str
    address: str
    proc: subprocess.Popen
    log: Path


@dataclass
class RayCluster:
    address: str
    owned: bool  # started by us (we stop it) or attached to (we never stop it)
    token_path: str | None = None
    root: Path | None = None
    nodes: list[NodeProc] = field(default_factory=list)
    kept: bool = False  # brought up by %vllm_cluster --up: it stays, without engines, until --down

    def env(self) -> dict[str, str]:
        """What a Ray client (vLLM in this kernel) needs to reach the cluster."""
        env = {"RAY_ADDRESS": self.address}
        if self.token_path:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        return env

    def status(self, timeout: float = 30) -> dict:
        """Nodes and GPUs that Ray sees (``ray status``); never initialises Ray in this process."""
        try:
            out = subprocess.run([_ray_exe(), "status", f"--address={self.address}"], capture_output=True,
                                 text=True, timeout=timeout, env={**os.environ, **self.env()})
        except subprocess.TimeoutExpired:
            return {"reachable": False, "nodes": 0, "gpus": 0.0, "error": "ray status timed out"}
        return parse_status(out.stdout + out.stderr)

    def stop(self) -> None:
        """Stop what we started: every node's Ray (through its runner or srun). Never an attached cluster."""
        if not self.owned:
            return
        for n in self.nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for n in self.nodes:
            try:
                n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(5)
            procs.guard(n.proc.pid, add=False)
        self.nodes = []
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def rows(self) -> list[tuple[str, str]]:
        st = self.status()
        rows = [("Ray address", self.address), ("Ray cluster", "started by this kernel" if self.owned else "attached")]
        rows.append(("Ray nodes / GPUs", f"{st['nodes']} / {st['gpus']:g} ({st['gpus_used']:g} in use)"
                     if st["reachable"] else f"unreachable ({st.get('error', '')})"))
        if self.token_path:
            rows.append(("Ray auth", "token (file readable only by you)"))
        rows += [(f"  {n.node}", f"{n.address}, pid {n.proc.pid}, {'running' if n.proc.poll() is None else 'exited'}, log {n.log}")
                 for n in self.nodes]
        return rows


def parse_status(text: str) -> dict:
    """Active nodes, total GPUs and the GPUs in use (by an engine's workers) from ``ray status`` output."""
    if "Active:" not in text:
        first = next((ln for ln in text.splitlines() if "Error" in ln or "rror" in ln), text.strip()[:200])
        return {"reachable": False, "nodes": 0, "gpus": 0.0, "gpus_used": 0.0, "error": first}
    active = text.split("Active:", 1)[1].split("Pending:", 1)[0]
    nodes = sum(int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+node_", active, re.M))
    gpu = re.search(r"([\d.]+)/([\d.]+) GPU", text.split("Total Usage:", 1)[-1])
    return {"reachable": True, "nodes": nodes, "gpus": float(gpu.group(2)) if gpu else 0.0,
            "gpus_used": float(gpu.group(1)) if gpu else 0.0}


def _ray_exe() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _free_base(host: str) -> int:
    """A base port with PORT_SPAN free ports above it, outside Ray's worker range (10002-19999)."""
    try:
        return procs.free_port(host, scan=(20000, 28000), span=8, step=PORT_SPAN)
    except OSError as exc:
        raise RayClusterError(f"no free ports for Ray on {host}: {exc}") from None


def _node_flags(i: int, base: int, head: str | None, ip: str, gpus: int, cpus: int, tmp: Path) -> list[str]:
    b = base + PORT_SPAN * i
    workers = 28000 + 200 * i  # each node's worker-port range, apart from the fixed ports
    flags = [f"--node-ip-address={ip}", f"--num-gpus={gpus}", f"--num-cpus={cpus}", f"--temp-dir={tmp}",
             f"--node-manager-port={b + 1}", f"--object-manager-port={b + 2}", f"--runtime-env-agent-port={b + 3}",
             f"--dashboard-agent-grpc-port={b + 4}", f"--dashboard-agent-listen-port={b + 5}",
             f"--metrics-export-port={b + 6}", f"--min-worker-port={workers}", f"--max-worker-port={workers + 199}",
             "--disable-usage-stats", "--block"]
    if head is None:
        flags = ["--head", f"--port={b}", f"--ray-client-server-port={b + 7}", "--include-dashboard=false"] + flags
    else:
        flags = [f"--address={head}"] + flags
    return flags


def start(alloc, *, timeout: float = 180) -> RayCluster:
    """Start a head here and a worker on every other node of the allocation; wait for all of them."""

    if alloc.num_nodes > 1 and not shutil.which("srun"):
        raise RayClusterError("could not find srun: is this a Slurm cluster?")
    root = Path(tempfile.mkdtemp(prefix=f"vnb-ray-{alloc.job_id or os.getpid()}-", dir="/tmp"))
    os.chmod(root, 0o700)
    token = secrets.token_hex(32)
    token_path = root / "token"  # for this kernel's Ray clients; every node gets its own copy on stdin
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    cluster = RayCluster(address="", owned=True, token_path=str(token_path), root=root)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"},
           **{k: v for k, v in alloc.env.items() if k == "SLURM_CONF"}, "RAY_USAGE_STATS_ENABLED": "0"}
    here = alloc.node_name or alloc.nodes[0]
    order = [here] + [n for n in alloc.nodes if n != here]
    head_ip = alloc.node_addr(here)
    base = _free_base(head_ip)
    cluster.address = f"{head_ip}:{base}"
    try:
        for i, node in enumerate(order):
            ip = head_ip if i == 0 else alloc.node_addr(node)
            cpus = alloc.cpus_per_node[alloc.nodes.index(node)] if alloc.cpus_per_node else (os.cpu_count() or 1)
            # The token reaches each node on stdin and is written there into a private folder that
            # _raynode makes: a node's /tmp is its own on most clusters, so the head's path means nothing.
            ray_cmd = [sys.executable, "-m", "vllm_notebook._raynode", "--token-dir", str(root / f"auth-n{i}"),
                       "env", f"VLLM_HOST_IP={ip}", _ray_exe(),
                       "start", *_node_flags(i, base, None if i == 0 else cluster.address, ip,
                                             alloc.gpus_per_node, cpus, root / f"n{i}")]
            if i > 0:
                step = ["srun", "--overlap", f"--jobid={alloc.job_id}", "--nodes=1", "--ntasks=1", "-w", node]
                if alloc.gpus_per_node:
                    step.append(f"--gres=gpu:{alloc.gpus_per_node}")
                ray_cmd = step + ray_cmd
            log = root / f"{node}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(ray_cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.PIPE, text=True, **procs.new_group())
            with contextlib.suppress(BrokenPipeError):  # it exited at once: its log says why, below
                proc.stdin.write(token + "\n")
                proc.stdin.close()
            procs.guard(proc.pid)
            cluster.nodes.append(NodeProc(node, ip, proc, log))
            if i == 0:  # workers need the head's GCS
                _wait_joined(cluster, [cluster.nodes[0]], timeout)
        _wait_joined(cluster, cluster.nodes[1:], timeout)
        _wait_resources(cluster, alloc.num_nodes, alloc.total_gpus, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_joined(cluster: RayCluster, nodes: list[NodeProc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    while waiting:
        for n in list(waiting):
            text = n.log.read_text(errors="replace") if n.log.exists() else ""
            if any(marker in text for marker in JOINED):
                waiting.remove(n)
            elif n.proc.poll() is not None:
                raise RayClusterError(f"Ray on node {n.node} exited (code {n.proc.returncode}): {_tail(n.log)}")
        if waiting and time.monotonic() > deadline:
            n = waiting[0]
            raise RayClusterError(f"node {n.node} did not join the Ray cluster within {timeout:.0f} s: {_tail(n.log)}")
        if waiting:
            time.sleep(0.2)


def _wait_resources(cluster: RayCluster, nodes: int, gpus: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = cluster.status()
        if st["reachable"] and st["nodes"] >= nodes and st["gpus"] >= gpus:
            return
        if time.monotonic() > deadline:
            raise RayClusterError(f"the Ray cluster has {st['nodes']} of {nodes} nodes and {st['gpus']:g} of {gpus} "
                                  f"GPUs after {timeout:.0f} s")
        time.sleep(0.5)


def _tail(path: Path, n: int = 3) -> str:

    lines = [ln.strip() for ln in tail(path, 40) if ln.strip()]
    return " | ".join(lines[-n:]) or f"(empty log {path})"


# ------------------------------------------------------------------ the kernel's cluster
_current: RayCluster | None = None


def current() -> RayCluster | None:
    return _current


def up(alloc, address: str | None = None, timeout: float = 180, keep: bool = False) -> RayCluster:
    """The cluster this kernel uses: attach (address or $RAY_ADDRESS), reuse ours, or start one.

    ``keep``: the user asked for it (``%vllm_cluster --up``), so it stays up when the last engine on it
    unloads, until ``down``; one that a load started for itself stops with that engine.
    """
    global _current
    address = address or os.environ.get("RAY_ADDRESS")
    if _current is not None and (address is None or _current.address == address):
        if not _current.owned or all(n.proc.poll() is None for n in _current.nodes):
            _current.kept = _current.kept or keep
            return _current
        _current.stop()
        _current = None
    if address:
        cluster = RayCluster(address=address, owned=False, token_path=os.environ.get("RAY_AUTH_TOKEN_PATH"))
        st = cluster.status()
        if not st["reachable"]:
            raise RayClusterError(f"cannot reach the Ray cluster at {address}: {st.get('error')}")
    else:
        cluster = start(alloc, timeout=timeout)
    cluster.kept = keep
    os.environ.update(cluster.env())
    _refresh_ray_in_this_process()
    _current = cluster
    return cluster


def _refresh_ray_in_this_process() -> None:
    """Make an already imported Ray (vLLM imports it) see the token settings just put in the environment.

    Ray reads ``RAY_AUTH_MODE`` and the token once, into caches; without a refresh the kernel's own
    ``ray.init()`` is refused by the cluster it just started. This is what Ray's own tests do
    (``ray._private.authentication_test_utils.reset_auth_token_state``). Nothing happens if Ray is not
    imported: it then reads the environment when it is.
    """
    if "ray._raylet" not in sys.modules:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # another Ray release: its own way, or no cache
        pass


def release() -> list[int]:
    """Hand the cluster we started to a server that outlives this kernel; return its process groups.

    The cluster is no longer stopped with the kernel (nor by ``down``); whoever
    holds the groups stops it (``servers.stop``).
    """
    global _current
    cluster, _current = _current, None
    if cluster is None or not cluster.owned:
        return []
    for n in cluster.nodes:
        procs.guard(n.proc.pid, add=False)
    return [n.proc.pid for n in cluster.nodes]


def down() -> str:
    """Stop the cluster we started (forget one we attached to)."""
    global _current
    cluster, _current = _current, None
    if cluster is None:
        return "no Ray cluster in use"
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        if os.environ.get(key) == cluster.env().get(key):
            os.environ.pop(key, None)
    _refresh_ray_in_this_process()
    if not cluster.owned:
        return f"detached from the Ray cluster at {cluster.address} (not stopped: we did not start it)"
    cluster.stop()
    return f"stopped the Ray cluster at {cluster.address}"
