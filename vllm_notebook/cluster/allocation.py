"""What this kernel may use: the Slurm allocation (or this machine), read from the environment.

The parsers are pure functions of strings, tested table-driven; ``Allocation.from_env``
is the only place that reads ``SLURM_*`` variables. Slurm commands (``squeue``,
``scontrol``) are only called by the few functions that say so.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VllmNotebookError

#: Set in a replica's server started on a node of a multi-node allocation (``backends/step.py``): "J/K/TP", its
#: index among the K replicas of that node and their tensor-parallel size. Its allocation is then its node alone.
REPLICA_ENV = "VLLM_NOTEBOOK_REPLICA"


class AllocationError(VllmNotebookError):
    """A Slurm variable that cannot be understood."""


# ----------------------------------------------------------------- hostlists
_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(text: str, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """``gpu[001-003,007],cpu12`` -> gpu001 gpu002 gpu003 gpu007 cpu12 (zero padding kept).

    Several bracket groups in one name (``r[1-2]n[01-02]``) expand as a product.
    """
    text = text.strip()
    if not text:
        raise AllocationError(f"{var} is empty")
    hosts: list[str] = []
    for item in _split_top(text, var):
        hosts.extend(_expand_item(item, text, var))
    return hosts


def _split_top(text: str, var: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise AllocationError(f"cannot parse {var}={text!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise AllocationError(f"cannot parse {var}={text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise AllocationError(f"cannot parse {var}={text!r}: unbalanced '['")
    items.append(cur)
    if any(not it.strip() for it in items):
        raise AllocationError(f"cannot parse {var}={text!r}: empty host name")
    return [it.strip() for it in items]


def _expand_item(item: str, whole: str, var: str) -> list[str]:
    parts = _GROUP.split(item)  # text, group, text, group, ..., text
    choices: list[list[str]] = []
    for i, part in enumerate(parts):
        choices.append(_expand_range(part, whole, var) if i % 2 else [part])
    return ["".join(p) for p in itertools.product(*choices)]


def _expand_range(group: str, whole: str, var: str) -> list[str]:
    out = []
    for piece in group.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if not m:
            raise AllocationError(f"cannot parse {var}={whole!r}: bad range {piece!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise AllocationError(f"cannot parse {var}={whole!r}: range {piece!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


# ----------------------------------------------------------------- counts
def parse_per_node_counts(text: str, var: str = "SLURM_JOB_CPUS_PER_NODE") -> list[int]:
    """``72(x2),36`` -> [72, 72, 36]."""
    out = []
    for piece in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", piece)
        if not m:
            raise AllocationError(f"cannot parse {var}={text!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def parse_gpu_count(text: str, var: str) -> int:
    """A GPU count from ``4``, ``a100:4``, ``gpu:a100:4`` or a TRES list ``cpu=6,gres/gpu:a100=2``."""
    text = text.strip()
    if "=" in text:  # TRES
        total, found = 0, False
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip().startswith(("gres/gpu", "gpu")):
                if not value.strip().isdigit():
                    raise AllocationError(f"cannot parse {var}={text!r}")
                total += int(value)
                found = True
        return total if found else 0
    total = 0
    for item in re.split(r",(?![^()]*\))", text):  # commas inside (S:0-1) are not separators
        last = re.sub(r"\([^)]*\)", "", item).strip().split(":")[-1]
        m = re.fullmatch(r"(\d+)", last)
        if not m:
            raise AllocationError(f"cannot parse {var}={text!r}")
        total += int(m.group(1))
    return total


def parse_device_list(text: str) -> list[str]:
    """``0,1,3`` or ``GPU-8a1f...,GPU-77c2...`` -> the listed devices ("" and -1 mean none)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items in ([], ["-1"], ["NoDevFiles"]):
        return []
    return items


def parse_time_left(text: str) -> int | None:
    """squeue's %L: ``1-02:03:04``, ``02:03:04``, ``03:04``, ``UNLIMITED`` -> seconds (None: unlimited)."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "NOT_SET", "INVALID", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + s


def parse_node_addr(scontrol_output: str) -> str | None:
    m = re.search(r"\bNodeAddr=(\S+)", scontrol_output)
    return m.group(1) if m else None


# ----------------------------------------------------------------- the allocation
@dataclass
class Allocation:
    """Nodes, devices and limits this kernel may use."""

    source: str  # "slurm" or "local"
    nodes: list[str]
    gpus_per_node: int
    cpus_per_node: list[int] = field(default_factory=list)
    gpu_ids: list[str] = field(default_factory=list)  # this node's devices
    job_id: str | None = None
    node_name: str | None = None
    mem_mb: int | None = None
    in_step: bool = False
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, gpu_count: int | None = None) -> Allocation:
        """Read the allocation. Outside Slurm: this machine, with ``gpu_count`` GPUs (or
        those in CUDA_VISIBLE_DEVICES)."""
        env = dict(os.environ if env is None else env)
        if not env.get("SLURM_JOB_ID"):
            return cls._local(env, gpu_count)
        node_name = env.get("SLURMD_NODENAME")
        # Inside a step started with `srun --jobid`, SLURM_JOB_NODELIST is the step's nodes and
        # SLURM_NODELIST the job's; elsewhere both are the job's. The job's list is the longer one.
        lists = [expand_hostlist(env[v], v) for v in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)]
        nodes = max(lists, key=len) if lists else [node_name or socket.gethostname()]
        cpus: list[int] = []
        for var in ("SLURM_JOB_CPUS_PER_NODE", "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0"):
            if env.get(var):
                cpus = parse_per_node_counts(env[var], var)
                break
        if not cpus and env.get("SLURM_CPUS_ON_NODE", "").isdigit():
            cpus = [int(env["SLURM_CPUS_ON_NODE"])] * len(nodes)
        if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
            cpus = [int(env["SLURM_CPUS_PER_TASK"])] * len(nodes)
        gpu_ids = _gpu_ids(env)
        gpus = _gpus_per_node(env, gpu_ids, gpu_count)
        if env.get(REPLICA_ENV) and node_name in nodes:  # one replica's server: its node, its share of the GPUs
            cpus = cpus[nodes.index(node_name):][:1] if len(cpus) == len(nodes) else cpus[:1]
            nodes = [node_name]
            if env.get("CUDA_VISIBLE_DEVICES", "").strip():
                gpu_ids = parse_device_list(env["CUDA_VISIBLE_DEVICES"])
                gpus = len(gpu_ids)
        return cls(
            source="slurm", nodes=nodes, gpus_per_node=gpus,
            cpus_per_node=cpus, gpu_ids=gpu_ids, job_id=env["SLURM_JOB_ID"], node_name=node_name,
            mem_mb=_mem_mb(env, cpus), in_step=bool(env.get("SLURM_STEP_ID")), env=env,
        )

    @classmethod
    def _local(cls, env: Mapping[str, str], gpu_count: int | None) -> Allocation:
        ids = parse_device_list(env["CUDA_VISIBLE_DEVICES"]) if "CUDA_VISIBLE_DEVICES" in env else []
        if "CUDA_VISIBLE_DEVICES" in env:
            gpus = len(ids)
        elif gpu_count is not None:
            gpus = gpu_count
        else:  # without importing anything heavy: NVIDIA's device files
            gpus = sum(1 for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit())
        return cls(source="local", nodes=[socket.gethostname()], gpus_per_node=gpus,
                   cpus_per_node=[os.cpu_count() or 1], gpu_ids=ids, env=dict(env))

    # ------------------------------------------------------------ Slurm queries
    def time_left(self) -> int | None:
        """Seconds until the job ends (``squeue``), None when unlimited or unknown."""
        if not self.job_id or not shutil.which("squeue"):
            return None
        try:
            out = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%L"], capture_output=True,
                                 text=True, timeout=10, env=self._cmd_env()).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_time_left(out.strip().splitlines()[0]) if out.strip() else None

    def node_addr(self, node: str | None = None) -> str:
        """A node's address from ``scontrol show node`` (NodeAddr, not the hostname)."""
        node = node or self.node_name or self.nodes[0]
        if self.source == "slurm" and shutil.which("scontrol"):
            try:
                out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                                     timeout=10, env=self._cmd_env()).stdout
                addr = parse_node_addr(out)
                if addr:
                    return addr
            except (OSError, subprocess.SubprocessError):
                pass
        return socket.gethostbyname(socket.gethostname()) if node == socket.gethostname() else node

    def _cmd_env(self) -> dict[str, str]:
        return {**os.environ, **{k: v for k, v in self.env.items() if k == "SLURM_CONF"}}

    def rows(self) -> list[tuple[str, str]]:
        """The allocation as (field, value) rows for a table."""
        rows = [("source", self.source)]
        if self.job_id:
            rows.append(("job", self.job_id + (" (inside a job step)" if self.in_step else "")))
        rows += [("nodes", f"{self.num_nodes}: {', '.join(self.nodes)}"),
                 ("GPUs per node", str(self.gpus_per_node) + (f" ({','.join(self.gpu_ids)})" if self.gpu_ids else "")),
                 ("CPUs per node", ", ".join(map(str, self.cpus_per_node)) or "?")]
        if self.mem_mb:
            rows.append(("memory per node", f"{self.mem_mb / 1024:.0f} GiB"))
        if self.node_name:
            rows.append(("this node", self.node_name))
        return rows


def _gpu_ids(env: Mapping[str, str]) -> list[str]:
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        if env.get(var):
            return parse_device_list(env[var])
    return []


def _gpus_per_node(env: Mapping[str, str], gpu_ids: list[str], gpu_count: int | None) -> int:
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        value = env["SLURM_GPUS_ON_NODE"].strip()
        if not value.isdigit():
            raise AllocationError(f"cannot parse SLURM_GPUS_ON_NODE={value!r}")
        return int(value)
    if env.get("SLURM_GPUS_PER_NODE"):
        return parse_gpu_count(env["SLURM_GPUS_PER_NODE"], "SLURM_GPUS_PER_NODE")
    if gpu_ids:
        return len(gpu_ids)
    if env.get("SLURM_TRES_PER_TASK"):
        return parse_gpu_count(env["SLURM_TRES_PER_TASK"], "SLURM_TRES_PER_TASK")
    return gpu_count or 0


def _mem_mb(env: Mapping[str, str], cpus: list[int]) -> int | None:
    if env.get("SLURM_MEM_PER_NODE", "").isdigit():
        return int(env["SLURM_MEM_PER_NODE"])
    if env.get("SLURM_MEM_PER_CPU", "").isdigit() and cpus:
        return int(env["SLURM_MEM_PER_CPU"]) * cpus[0]
    return None
