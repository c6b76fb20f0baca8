"""Choosing parallel sizes from the devices at hand (the cluster layer extends this)."""

from __future__ import annotations

from .errors import UsageError

PARALLEL_FLAGS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                  "distributed_executor_backend")


def largest_valid_tp(gpus: int, num_heads: int | None) -> int:
    """The largest tensor-parallel size <= ``gpus`` that divides the attention heads."""
    if gpus <= 1:
        return 1
    if not num_heads:
        return gpus
    return max(tp for tp in range(1, gpus + 1) if num_heads % tp == 0)


def local_plan(gpus: int, model_config: dict, explicit: set[str], args) -> dict:
    """Parallel sizes for this node. User flags win; otherwise use every visible GPU."""
    heads = model_config.get("num_attention_heads")
    plan = {"devices": f"{gpus} GPU(s)" if gpus else "CPU", "nodes": 1}
    if not explicit.intersection(PARALLEL_FLAGS) and gpus > 1:
        args.tensor_parallel_size = largest_valid_tp(gpus, heads)
    tp = int(args.tensor_parallel_size or 1)
    if gpus and tp > gpus:
        raise UsageError(f"--tensor-parallel-size {tp} needs {tp} GPUs but {gpus} are visible")
    if heads and tp > 1 and heads % tp:
        raise UsageError(f"--tensor-parallel-size {tp} does not divide the model's {heads} attention heads")
    plan.update(tensor_parallel_size=tp, pipeline_parallel_size=int(args.pipeline_parallel_size or 1),
                executor=args.distributed_executor_backend or ("mp" if tp > 1 else "uni"))
    return plan
