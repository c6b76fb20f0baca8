"""Getting Jupyter onto a compute node: kernelspecs, ``jupyter``, sbatch scripts, ``ssh -L`` lines."""

from __future__ import annotations

import getpass
import os
import secrets
import shlex
import socket
import sys
from pathlib import Path

from .. import paths, procs
from ..errors import VllmNotebookError
from .allocation import Allocation

# What a kernel on a cluster needs from the environment it was installed from.
CARRIED = ("PATH", "LD_LIBRARY_PATH", "CUDA_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT",
           "VLLM_NOTEBOOK_CACHE", "VLLM_NOTEBOOK_MODEL", "SLURM_CONF", "VLLM_CPU_KVCACHE_SPACE")
# A kernel others run (--sys-prefix, --prefix) gets only site-wide settings: never the installer's PATH,
# libraries or cache folders, which would run the installer's programs or write into their folders.
SHARED = ("CUDA_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "SLURM_CONF")
SECRET = ("HF_TOKEN", "VLLM_API_KEY", "JUPYTER_TOKEN")
# Kernels talk to Jupyter's server over Unix sockets beside their 0600 connection file, in Jupyter's 0700 runtime
# folder: on TCP (Jupyter's default) any user of the node can subscribe to a kernel's output (iopub needs no key).
KERNEL_TRANSPORT = "ipc"
SERVER_CONFIG = {"KernelManager": {"transport": KERNEL_TRANSPORT}}


def kernel_env(extra: dict[str, str] | None = None, offline: bool = False, shared: bool = False) -> dict[str, str]:
    if shared:
        env = {k: os.environ[k] for k in SHARED if os.environ.get(k)}
        env["PATH"] = f"{sys.prefix}/bin:${{PATH}}"  # this environment first, then the user's own PATH
    else:
        env = {k: os.environ[k] for k in CARRIED if os.environ.get(k)}
        env.update({k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "VLLM_")) and k not in SECRET})
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    for k in SECRET:
        if k in env:
            raise VllmNotebookError(f"{k} is a secret: a kernelspec is a plain file, keep it out (use a 0600 file)")
    return env


def install_kernel(name: str = "vllm-notebook", display_name: str | None = None, *, user: bool = True,
                   prefix: str | None = None, env: dict[str, str] | None = None, offline: bool = False,
                   shared: bool = False) -> str:
    """A Jupyter kernelspec running this Python, with the environment a cluster kernel needs."""
    from ipykernel.kernelspec import install

    venv = os.path.basename(sys.prefix.rstrip("/"))
    display = display_name or f"Python {sys.version_info.major}.{sys.version_info.minor} (vllm-notebook, {venv})"
    return install(user=user and prefix is None, prefix=prefix, kernel_name=name, display_name=display,
                   env=kernel_env(env, offline, shared=shared))


def configure_ipc_kernels(prefix: str | None = None) -> Path:
    """Have Jupyter's servers that read this config start kernels on IPC (``KERNEL_TRANSPORT``): the user's
    ``~/.jupyter``, or ``PREFIX/etc/jupyter`` for an environment's. Other settings in the file are kept."""
    import json

    from jupyter_core.paths import jupyter_config_dir

    folder = Path(prefix) / "etc" / "jupyter" if prefix else Path(jupyter_config_dir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jupyter_server_config.json"
    try:
        config = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as exc:
        raise VllmNotebookError(f"{path} is not valid JSON ({exc}); mend it, or add "
                                f'"KernelManager": {{"transport": "{KERNEL_TRANSPORT}"}} to it yourself') from None
    config.setdefault("KernelManager", {})["transport"] = KERNEL_TRANSPORT
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


# ------------------------------------------------------------------ jupyter on a compute node
def connection_lines(addr: str, port: int, node: str, path: str = "/lab", token: str | None = None) -> list[str]:
    """What to type on a laptop to reach ``addr:port`` on a compute node through the login node."""
    login = os.environ.get("SLURM_SUBMIT_HOST") or os.environ.get("SLURM_CLUSTER_NAME") or "LOGIN-NODE"
    user = getpass.getuser()
    query = f"?token={token}" if token else ""
    return [f"on your laptop:  ssh -N -L {port}:{addr}:{port} {user}@{login}",
            f"then open:       http://localhost:{port}{path}{query}",
            f"(running on {node}; it stops when the job ends, or with Ctrl-C / scancel)"]


def jupyter(port: int | None = None, lab_args: list[str] | None = None, dry_run: bool = False) -> int:
    """Start JupyterLab on this compute node, bound to its address, and print how to reach it.

    The URL with its token goes to a 0600 file in a 0700 folder, never to the job's output file (which
    Slurm creates with the user's umask, often readable by the group); the output names that file.
    Only on a terminal is the full URL printed too.
    """
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        raise VllmNotebookError("JupyterLab is not installed in this environment: pip install jupyterlab")
    if port is not None and not 1 <= port <= 65535:
        raise VllmNotebookError(f"--port must be between 1 and 65535, not {port}")
    alloc = Allocation.from_env()
    if alloc.source != "slurm":
        print("note: not inside a Slurm job; starting JupyterLab on this machine "
              "(on a cluster: salloc ... first, or sbatch a script from `vllm-notebook sbatch-template`)")
        addr, node = "127.0.0.1", socket.gethostname()
    else:
        node = alloc.node_name or socket.gethostname()
        addr = alloc.node_addr(node)
    try:
        port = port or procs.free_port(addr, start=8888)
    except OSError as exc:
        raise VllmNotebookError(str(exc)) from None
    token = secrets.token_hex(24)
    job = f", job {alloc.job_id}" if alloc.job_id else ""
    print(f"JupyterLab on {node} at {addr}:{port}{job}")
    shown = token if sys.stdout.isatty() else None
    lines = connection_lines(addr, port, node, token=shown) if alloc.source == "slurm" else \
        [f"open:  http://localhost:{port}/lab" + (f"?token={shown}" if shown else "")]
    url_file = _private_url_file(alloc.job_id, f"http://localhost:{port}/lab?token={token}")
    for line in lines:
        print(line)
    print(f"the URL with its token is in {url_file} (only you can read it): cat {url_file}")
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={addr}", f"--port={port}",
           "--ServerApp.port_retries=0", f"--KernelManager.transport={KERNEL_TRANSPORT}",
           *(["--allow-root"] if os.geteuid() == 0 else []), *(lab_args or [])]
    if dry_run:
        print("would run:", shlex.join(cmd))
        return 0
    env = {**os.environ, "JUPYTER_TOKEN": token}  # not on the command line, where `ps` shows it
    os.execve(sys.executable, cmd, env)
    return 0  # pragma: no cover


def _private_url_file(job_id: str | None, url: str) -> Path:
    path = paths.private_dir(paths.cache_root() / "jupyter") / f"{job_id or os.getpid()}.url"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    return path


# ------------------------------------------------------------------ sbatch
def sbatch_template(*, nodes: int = 1, gpus_per_node: int = 1, time_limit: str = "2:00:00", account: str | None = None,
                    partition: str | None = None, cpus_per_task: int | None = None, mem: str | None = None,
                    server: list[str] | None = None, job_name: str = "vllm-notebook") -> str:
    """An sbatch script that runs JupyterLab (or, with ``server``, a vLLM server) on the allocated nodes."""
    for name, value in (("--time", time_limit), ("--account", account), ("--partition", partition),
                        ("--mem", mem), ("--job-name", job_name), ("--server", " ".join(server or []))):
        if value and any(ch in str(value) for ch in "\n\r\0"):
            raise VllmNotebookError(f"{name} must be one line: a line break would add commands to the script")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={time_limit}", "#SBATCH --output=%x-%j.out"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{gpus_per_node}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    what = "a vLLM server" if server else "JupyterLab"
    lines += ["", f"# Written by `vllm-notebook sbatch-template`: runs {what} on the first allocated node.",
              "# Submit with `sbatch THIS_FILE`, then read %x-<jobid>.out (e.g. vllm-notebook-1234.out)",
              "# for the ssh command and URL to use from your laptop. Stop with `scancel <jobid>`.",
              "set -euo pipefail", f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH"]
    for key in ("HF_HOME", "HF_HUB_CACHE", "VLLM_NOTEBOOK_CACHE"):
        if os.environ.get(key):
            lines.append(f"export {key}={shlex.quote(os.environ[key])}")
    lines += ["export HF_HUB_OFFLINE=1   # compute nodes have no internet: models come from the cache",
              "umask 077   # the job's files (sockets, caches, logs) for you alone",
              'export TMPDIR="${SLURM_TMPDIR:-/tmp}"   # node-local; vllm-notebook keeps a private folder in it']
    exe = shlex.quote(os.path.join(os.path.dirname(sys.executable), "vllm-notebook"))
    if server:
        lines.append(f"exec {exe} serve {shlex.join(server)}")
    else:
        lines.append(f"exec {exe} jupyter")
    return "\n".join(lines) + "\n"
