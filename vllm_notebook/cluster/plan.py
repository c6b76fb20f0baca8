"""Choosing tensor/pipeline parallel sizes and the executor from the allocation.

Defaults: tensor parallel = GPUs per node, reduced to the largest size that divides
the model's attention heads; pipeline parallel = number of nodes; one node uses
vLLM's ``mp`` executor, several use ``ray``. Flags the user gave win. An impossible
plan is a one-line error before anything starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
    replicas: int = 1  # independent engines of the same model and flags (``--replicas``), one engine handle
    estimate: Any = None  # ``--replicas auto``'s arithmetic (``Estimate``)

    @property
    def devices(self) -> str:
        return f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s)" if self.gpus_per_node else "CPU"

    @property
    def needs_ray(self) -> bool:
        return self.executor == "ray"

    def rows(self) -> list[tuple[str, str]]:
        rows = [("devices", self.devices), ("tensor parallel", str(self.tensor_parallel_size)),
                ("pipeline parallel", str(self.pipeline_parallel_size)),
                ("executor", self.executor or "single process")]
        if self.replicas > 1:
            over = f" over {self.nodes} nodes (a job step each, srun --overlap)" if self.nodes > 1 else ""
            rows.insert(1, ("replicas", f"{self.replicas}{over}"))
        if self.estimate is not None:
            rows.append(self.estimate.row())
        return rows

    def as_dict(self) -> dict:
        out = {"devices": self.devices, **asdict(self)}
        out.pop("estimate", None)
        return out


def make_plan(alloc, model_config: dict, explicit: set[str], args, replicas: int = 1) -> Plan:
    """Fill the parallel fields of ``args`` (EngineArgs) from the allocation; return the plan. With ``replicas``
    the engines share this node's GPUs (or cores): each gets the tensor-parallel size given, else one GPU."""
    gpus, nodes = alloc.gpus_per_node, alloc.num_nodes
    heads = model_config.get("num_attention_heads")
    layers = model_config.get("num_hidden_layers")
    if replicas < 1:
        raise PlanError("--replicas must be at least 1")
    if replicas > 1 and nodes > 1:
        return _replicas_over_nodes(alloc, model_config, explicit, args, replicas)
    if nodes > 1 and gpus == 0:
        raise PlanError(f"the allocation has {nodes} nodes but no GPUs on them: multi-node needs GPUs "
                        "(ask Slurm for them, e.g. --gpus-per-node=4)")
    if "tensor_parallel_size" in explicit:
        tp = int(args.tensor_parallel_size)
    else:
        tp = 1 if replicas > 1 else largest_valid_tp(gpus, heads)
    pp = int(args.pipeline_parallel_size) if "pipeline_parallel_size" in explicit else (nodes if gpus else 1)
    if replicas > 1 and gpus and tp * pp > 1 and replicas * tp * pp > gpus:
        raise PlanError(f"{replicas} replicas x {tp * pp} GPUs each = {replicas * tp * pp} GPUs, but this node has "
                        f"{gpus}: use fewer replicas or a smaller --tensor-parallel-size")
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
                executor=executor, replicas=replicas)


def _replicas_over_nodes(alloc, model_config: dict, explicit: set[str], args, replicas: int) -> Plan:
    """``--replicas N`` over a multi-node allocation: each replica on one node (its own tensor-parallel group of
    that node's GPUs, no pipeline across nodes), the replicas spread evenly over the nodes (``replica_nodes``)."""
    gpus, nodes, heads = alloc.gpus_per_node, alloc.num_nodes, model_config.get("num_attention_heads")
    pp = int(args.pipeline_parallel_size) if "pipeline_parallel_size" in explicit else 1
    if pp != 1:
        raise PlanError("a replica runs on one node: --pipeline-parallel-size over nodes is for one engine "
                        "(drop --replicas, or drop --pipeline-parallel-size)")
    tp = int(args.tensor_parallel_size) if "tensor_parallel_size" in explicit else 1
    if tp < 1:
        raise PlanError("--tensor-parallel-size must be >= 1")
    if heads and heads % tp:
        raise PlanError(f"--tensor-parallel-size {tp} does not divide the model's {heads} attention heads "
                        f"(try {largest_valid_tp(tp, heads)})")
    per_node = -(-replicas // nodes)
    if gpus and tp > gpus:
        raise PlanError(f"--tensor-parallel-size {tp} needs {tp} GPUs on one node, and a node here has {gpus}")
    if gpus and tp > 1 and per_node * tp > gpus:
        raise PlanError(f"{replicas} replicas over {nodes} nodes: {per_node} a node x {tp} GPUs each = "
                        f"{per_node * tp} GPUs, but a node has {gpus}: use fewer replicas or a smaller "
                        "--tensor-parallel-size")
    executor = args.distributed_executor_backend if "distributed_executor_backend" in explicit else (
        "mp" if tp > 1 else None)
    args.tensor_parallel_size, args.pipeline_parallel_size = tp, 1
    if executor == "mp" and "distributed_executor_backend" not in explicit:
        args.distributed_executor_backend = executor
    return Plan(nodes=nodes, gpus_per_node=gpus, tensor_parallel_size=tp, pipeline_parallel_size=1,
                executor=executor, replicas=replicas)


def replica_nodes(replicas: int, nodes: list[str], here: str | None) -> list[tuple[str, int, int]]:
    """Where each of ``replicas`` goes over an allocation's ``nodes``: (node, its index on that node, how many
    that node runs), this node (``here``) first, the others in the allocation's order, as evenly as they go."""
    order = ([here] if here in nodes else []) + [n for n in nodes if n != here]
    counts = [replicas // len(order) + (1 if i < replicas % len(order) else 0) for i in range(len(order))]
    return [(node, j, count) for node, count in zip(order, counts) for j in range(count)]


#: What an engine takes on a GPU beyond weights and KV cache (activations, CUDA graphs, the CUDA context), bytes.
ENGINE_OVERHEAD = 2 * 2**30
#: Below this share of a card's memory (weights and overhead), ``--replicas auto`` puts two replicas on each
#: card: measured with raw vLLM 0.26 on an H100, two engines of a 0.79 B model (2 % of the card each) made
#: 2.08x one engine's tokens/s, the one engine's scheduler being the limit.
SMALL_MODEL_SHARE = 0.1


@dataclass
class Estimate:
    """``--replicas auto``'s arithmetic, shown by ``--dry-run``."""

    weights: int | None  # bytes of the weights (their files)
    kv_one_sequence: int | None  # bytes of KV cache for one sequence of max_model_len tokens
    usable_per_gpu: int | None  # bytes of one GPU that vLLM may take (memory x --gpu-memory-utilization)
    tensor_parallel_size: int
    replicas: int
    why: str

    def row(self) -> tuple[str, str]:
        gb = lambda b: f"{b / 1e9:.2f} GB" if b is not None else "unknown"  # noqa: E731
        return ("replicas auto", f"weights {gb(self.weights)} + one sequence's KV cache {gb(self.kv_one_sequence)} "
                                 f"+ {ENGINE_OVERHEAD / 2**30:.0f} GiB per engine, {gb(self.usable_per_gpu)} usable "
                                 f"per GPU: TP {self.tensor_parallel_size}, {self.replicas} replicas ({self.why})")


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int | None:
    """K and V of every layer for one token, from the model's config (None when it does not say)."""
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    if not layers or not heads:
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes if head_dim else None


def auto_replicas(config: dict, *, weights: int | None, gpus: int, card_bytes: int | None, utilization: float,
                  max_model_len: int | None, tp: int | None, cpu_nodes: int = 1) -> Estimate:
    """``--replicas auto``: the smallest tensor-parallel size whose GPUs hold the weights, one sequence of
    ``max_model_len`` tokens of KV cache and an engine's overhead, replicated over this node's other GPUs (two
    a card for a small model, see ``SMALL_MODEL_SHARE``). On the CPU build (no GPUs), one replica per NUMA node.
    ``tp`` given: kept."""
    if not gpus:
        return Estimate(weights, None, None, 1, max(1, cpu_nodes), "the CPU build: one replica per NUMA node")
    heads = config.get("num_attention_heads")
    length = max_model_len or config.get("max_position_embeddings") or 0
    per_token = kv_bytes_per_token(config)
    kv = per_token * length if per_token and length else None
    usable = int(card_bytes * utilization) if card_bytes else None
    if tp is None:
        tp = 1
        if usable and weights:
            fits = [t for t in range(1, gpus + 1) if not heads or heads % t == 0]
            need = lambda t: (weights + (kv or 0)) / t + ENGINE_OVERHEAD  # noqa: E731
            ok = [t for t in fits if need(t) <= usable]
            if not ok:
                raise PlanError(f"the model needs about {need(fits[-1]) / 1e9:.0f} GB a GPU even at tensor "
                                f"parallel {fits[-1]}, and a GPU here has {usable / 1e9:.0f} GB usable: it does not "
                                "fit this node (a smaller --max-model-len needs less KV cache)")
            tp = ok[0]
    replicas = max(1, gpus // tp)
    why = f"{gpus} GPU(s) / TP {tp}"
    if tp == 1 and usable and weights and (weights + ENGINE_OVERHEAD) <= SMALL_MODEL_SHARE * usable:
        replicas, why = 2 * gpus, "a small model: two a card, measured faster than one"
    return Estimate(weights, kv, usable, tp, replicas, why)


@dataclass
class Replica:
    """Where one replica runs: the environment its processes start with, and a few words for the user."""

    env: dict[str, str]
    place: str
    memory_share: float | None = None  # its ``--gpu-memory-utilization`` when replicas share a GPU


def replica_layout(plan: Plan, *, cores: list[int], gpu_ids: list[str], memory: float | None) -> list[Replica]:
    """Each replica's share of this node: GPU groups of ``tensor x pipeline`` GPUs (``CUDA_VISIBLE_DEVICES``); more
    replicas than GPUs share them, one after another on each card, with ``memory`` (vLLM's
    ``--gpu-memory-utilization``, 0.9 if not given) divided between them; on the CPU build, its own cores
    (``VLLM_CPU_OMP_THREADS_BIND``, one list per tensor-parallel rank)."""
    n, width = plan.replicas, plan.tensor_parallel_size * plan.pipeline_parallel_size
    if not gpu_ids:
        if n * width > len(cores):
            raise PlanError(f"{n} replicas x {width} worker(s) need {n * width} cores, and this process may use "
                            f"{len(cores)}: use fewer replicas")
        per = len(cores) // n
        out = []
        for k in range(n):
            mine = cores[k * per:(k + 1) * per]
            ranks = [mine[r * (per // width):(r + 1) * (per // width)] for r in range(width)]
            bind = "|".join(",".join(map(str, rank)) for rank in ranks)
            out.append(Replica({"VLLM_CPU_OMP_THREADS_BIND": bind},
                               f"cores {_ids(mine)}"))
        return out
    if width > 1 or n <= len(gpu_ids):
        return [Replica({"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids[k * width:(k + 1) * width])},
                        f"GPU {','.join(gpu_ids[k * width:(k + 1) * width])}") for k in range(n)]
    per_card = -(-n // len(gpu_ids))
    share = round((memory or 0.9) / per_card, 3)
    return [Replica({"CUDA_VISIBLE_DEVICES": gpu_ids[k % len(gpu_ids)]},
                    f"GPU {gpu_ids[k % len(gpu_ids)]} ({share:.0%} of it)", share) for k in range(n)]


def _ids(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)) else \
        ",".join(map(str, ids))


def replica_share(value: str, *, cores: list[int], gpu_ids: list[str], memory: float | None) -> Replica:
    """The share of this node of the replica a job step was started for (``REPLICA_ENV``: "J/K/TP"): the same
    layout the K replicas of an in-kernel ``--replicas K`` would have here, its J-th part."""
    try:
        j, k, tp = (int(x) for x in value.split("/"))
    except ValueError:
        raise PlanError(f"VLLM_NOTEBOOK_REPLICA={value!r} is not J/K/TP") from None
    plan = Plan(nodes=1, gpus_per_node=len(gpu_ids), tensor_parallel_size=tp, pipeline_parallel_size=1,
                executor=None, replicas=k)
    return replica_layout(plan, cores=cores, gpu_ids=gpu_ids, memory=memory)[j]
