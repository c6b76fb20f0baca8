"""The one preparation step under every load, in the kernel or as a server.

From parsed engine arguments and a resolved model folder, ``prepare`` reads the
Slurm allocation, plans tensor/pipeline parallelism, decides the environment the
engine processes need (the Hugging Face Hub offline for a cached model, a
modest CPU KV cache) and computes the configuration key that lets a re-run of
the same load reuse its engine. ``LoadPlan`` is what ``--dry-run`` shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster.allocation import Allocation
from .cluster.plan import Estimate, Plan, auto_replicas, make_plan
from .engine import gpus as nvml
from .errors import UsageError
from .models import resolve
from .tables import html_pairs, text_pairs

HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class Prepared:
    """Everything a back-end needs to start an engine, decided once."""

    name: str
    model: str  # as the user wrote it (a Hub id or a folder)
    path: str  # the folder it resolved to
    args: Any  # vLLM's engine arguments (AsyncEngineArgs, or ``vllm serve``'s namespace as EngineArgs)
    explicit: set[str]  # the arguments the user set
    allocation: Allocation
    plan: Plan
    hub_id: str | None  # the Hub id when the model comes from the Hugging Face cache
    env: dict[str, str] = field(default_factory=dict)  # for the engine processes
    key: tuple = ()
    cpu_build: bool = False  # vLLM's CPU build: its engine keeps every core busy (``procs.share_cores``)
    flags: list[str] = field(default_factory=list)  # the user's engine flags as ``vllm serve`` takes them

    def dry_run(self, server_command: list[str] | None = None) -> LoadPlan:
        shown = {k: getattr(self.args, k) for k in sorted(self.explicit - {"model"}) if hasattr(self.args, k)}
        shown.update({k: getattr(self.args, k) for k in ("tensor_parallel_size", "pipeline_parallel_size",
                                                            "distributed_executor_backend")
                      if getattr(self.args, k, None) not in (None, 1)})
        return LoadPlan(name=self.name, model=self.model, path=self.path, engine_args=shown, plan=self.plan,
                        allocation=self.allocation, server_command=server_command)


def prepare(name: str, args: Any, path: str, explicit: set[str], *, gpu_count: int, cpu_build: bool,
            replicas: int | str = 1) -> Prepared:
    """Allocation, plan, environment and configuration key for loading ``args`` (model at ``path``), as one engine
    or as ``replicas`` engines of the same configuration (``"auto"``: as many as fit, ``auto_replicas``)."""
    alloc = Allocation.from_env(gpu_count=gpu_count)
    config = resolve.read_config(path)
    check_max_model_len(args, config)
    estimate = None
    if replicas == "auto":
        estimate = _auto(config, args, path, explicit, alloc.gpus_per_node if not cpu_build else 0)
        if alloc.num_nodes > 1:  # as many on each node of the allocation
            estimate.replicas *= alloc.num_nodes
            estimate.why += f"; on each of {alloc.num_nodes} nodes"
        replicas = estimate.replicas
        if estimate.tensor_parallel_size > 1 and "tensor_parallel_size" not in explicit:
            args.tensor_parallel_size = estimate.tensor_parallel_size
            explicit = {*explicit, "tensor_parallel_size"}
    plan = make_plan(alloc, config, explicit, args, replicas=replicas)
    plan.estimate = estimate
    model = str(args.model)
    hub_id = model if resolve.from_cache(model, path) else None
    env = dict(HUB_OFFLINE) if hub_id else {}
    if cpu_build and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "4"  # vLLM's CPU build would take half the node's RAM
    return Prepared(cpu_build=cpu_build, name=name, model=model, path=path, args=args, explicit=set(explicit),
                    allocation=alloc,
                    plan=plan, hub_id=hub_id, env=env,
                    key=engine_key(args) + ((("replicas", plan.replicas),) if plan.replicas > 1 else ()))


def _auto(config: dict, args: Any, path: str, explicit: set[str], gpus: int) -> Estimate:
    """``--replicas auto`` on this node: its GPUs (as NVML sees them) or its NUMA nodes."""
    cards = nvml.cards() or []
    numa = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    return auto_replicas(config, weights=nvml.weight_bytes(path), gpus=gpus,
                         card_bytes=cards[0]["memory_mib"] * 2**20 if cards else None,
                         utilization=float(getattr(args, "gpu_memory_utilization", None) or 0.9),
                         max_model_len=getattr(args, "max_model_len", None),
                         tp=int(args.tensor_parallel_size) if "tensor_parallel_size" in explicit else None,
                         cpu_nodes=numa)


def check_max_model_len(args: Any, config: dict) -> None:
    """Refuse a ``--max-model-len`` over the model's own limit before anything starts (or stops: a running engine
    it would replace stays), in the user's units, with the flag to use. Models that stretch their context
    (``rope_scaling``) are left to vLLM, which knows their arithmetic."""
    wanted = getattr(args, "max_model_len", None)
    allowed = config.get("max_position_embeddings")
    if (not isinstance(wanted, int) or not isinstance(allowed, int) or config.get("rope_scaling")
            or os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true")):
        return
    if wanted > allowed:
        raise UsageError(f"--max-model-len {wanted:,} is more than this model allows ({allowed:,} tokens, its "
                         f"max_position_embeddings): use --max-model-len {allowed}")


def engine_key(args: Any) -> tuple:
    """What identifies an engine's configuration: every field that is set to something."""
    key = []
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value in (None, "") or (default is not dataclasses.MISSING and repr(value) == repr(default)):
            continue
        key.append((f.name, repr(value)))
    return tuple(key)


@contextlib.contextmanager
def scoped_env(env: dict[str, str]):
    """``env`` set for whatever starts inside (engine processes inherit it), then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """``EngineArgs`` keyword arguments as ``vllm serve`` flags."""
    out: list[str] = []
    for k, v in engine_args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif isinstance(v, dict):
            out += [flag, json.dumps(v)]
        elif isinstance(v, list | tuple):
            out += [flag, *map(str, v)]
        elif v is not None:
            out += [flag, str(v)]
    return out


@dataclass
class LoadPlan:
    """What ``load`` would start (the result of ``--dry-run``): the allocation and the plan."""

    name: str
    model: str
    path: str
    engine_args: dict[str, Any]
    plan: Any = None
    allocation: Any = None
    server_command: list[str] | None = None  # --server: the ``vllm serve`` command that would run

    def rows(self) -> list[tuple[str, str]]:
        args = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in self.engine_args.items())
        rows = [("engine", self.name), ("model", f"{self.model} ({self.path})"), ("flags", args or "(defaults)")]
        rows += self.allocation.rows() if self.allocation is not None else []
        rows += self.plan.rows() if self.plan is not None else []
        if self.server_command:
            rows.append(("server command", shlex.join(self.server_command)))
        return rows

    def __str__(self) -> str:
        return f"would start engine '{self.name}' (dry run: nothing started)\n" + "\n".join(
            text_pairs(self.rows(), indent="  "))

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        return (f"<p>would start engine <b>{html.escape(self.name)}</b> (dry run: nothing started)</p>"
                + html_pairs(self.rows()))
