"""Choosing tensor/pipeline parallel sizes and the executor from the allocation.

Defaults: tensor parallel = GPUs per node, reduced to the largest size that divides
the model's attention heads; pipeline parallel = number of nodes; one node uses
vLLM's ``mp`` executor, several use ``ray``. Flags the user gave win. An impossible
plan is a one-line error before anything starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UsageError


class PlanError(UsageError):
    """The requested parallel layout does not fit the allocation or the model."""


def largest_valid_tp(gpus: int, num_heads: int | None) -> int:
    """The largest tensor-parallel size <= ``gpus`` that divides the attention heads."""
    if gpus <= 1:
        return 1
    if not num_heads:
        return gpus
    return max(tp for tp in range(1, gpus + 1) if num_heads % tp == 0)


@dataclass
class Plan:
    nodes: int
    gpus_per_node: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    executor: str | None  # None: vLLM's default for one process

    @property
    def devices(self) -> str:
        return f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s)" if self.gpus_per_node else "CPU"

    @property
    def needs_ray(self) -> bool:
        return self.executor == "ray"

    def rows(self) -> list[tuple[str, str]]:
        return [("devices", self.devices), ("tensor parallel", str(self.tensor_parallel_size)),
                ("pipeline parallel", str(self.pipeline_parallel_size)),
                ("executor", self.executor or "single process")]

    def as_dict(self) -> dict:
        return {"devices": self.devices, **asdict(self)}


def make_plan(alloc, model_config: dict, explicit: set[str], args) -> Plan:
    """Fill the parallel fields of ``args`` (EngineArgs) from the allocation; return the plan."""
    gpus, nodes = alloc.gpus_per_node, alloc.num_nodes
    heads = model_config.get("num_attention_heads")
    layers = model_config.get("num_hidden_layers")
    if nodes > 1 and gpus == 0:
        raise PlanError(f"the allocation has {nodes} nodes but no GPUs on them: multi-node needs GPUs "
                        "(ask Slurm for them, e.g. --gpus-per-node=4)")
    tp = int(args.tensor_parallel_size) if "tensor_parallel_size" in explicit else largest_valid_tp(gpus, heads)
    pp = int(args.pipeline_parallel_size) if "pipeline_parallel_size" in explicit else (nodes if gpus else 1)
    if "distributed_executor_backend" in explicit:
        executor = args.distributed_executor_backend
    elif nodes > 1 and tp * pp > gpus:
        executor = "ray"
    else:
        executor = "mp" if tp * pp > 1 else None
    if tp < 1 or pp < 1:
        raise PlanError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
    if heads and heads % tp:
        raise PlanError(f"--tensor-parallel-size {tp} does not divide the model's {heads} attention heads "
                        f"(try {largest_valid_tp(tp, heads)})")
    if gpus and tp * pp > gpus * nodes:
        raise PlanError(f"tensor x pipeline parallel = {tp} x {pp} = {tp * pp} GPUs, but the allocation has "
                        f"{gpus * nodes} ({nodes} node(s) x {gpus})")
    if gpus and nodes == 1 and tp > gpus:
        raise PlanError(f"--tensor-parallel-size {tp} needs {tp} GPUs but this node has {gpus}")
    if layers and pp > layers:
        raise PlanError(f"pipeline parallel size {pp} is more than the model's {layers} layers: "
                        "use fewer nodes or pass --pipeline-parallel-size")
    args.tensor_parallel_size, args.pipeline_parallel_size = tp, pp
    if executor in ("ray", "mp") and "distributed_executor_backend" not in explicit:
        args.distributed_executor_backend = executor
    return Plan(nodes=nodes, gpus_per_node=gpus, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                executor=executor)
