"""Slurm allocation parsing and parallel plans: pure functions, table-driven."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_notebook.cluster.allocation import (
    Allocation,
    AllocationError,
    expand_hostlist,
    parse_device_list,
    parse_gpu_count,
    parse_node_addr,
    parse_per_node_counts,
    parse_time_left,
)
from vllm_notebook.cluster.plan import PlanError, make_plan


@pytest.mark.parametrize("text,hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[001-003,007],cpu12", ["gpu001", "gpu002", "gpu003", "gpu007", "cpu12"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a[1,3],b[2-3]-ib", ["a1", "a3", "b2-ib", "b3-ib"]),
    ("n[5]", ["n5"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text,match", [
    ("gpu[001-003", "unbalanced"), ("gpu001]", "unbalanced"), ("n[a-b]", "bad range"),
    ("n[3-1]", "backwards"), ("n1,,n2", "empty host"), ("", "empty"), ("n[[1]]", "nested"),
])
def test_expand_hostlist_malformed_quotes_the_variable(text, match):
    with pytest.raises(AllocationError, match=match) as info:
        expand_hostlist(text, "SLURM_JOB_NODELIST")
    if text:
        assert f"SLURM_JOB_NODELIST={text!r}" in str(info.value)


@pytest.mark.parametrize("text,counts", [
    ("72(x2),36", [72, 72, 36]), ("8", [8]), ("4,4", [4, 4]), ("16(x3)", [16, 16, 16]),
])
def test_per_node_counts(text, counts):
    assert parse_per_node_counts(text) == counts


@pytest.mark.parametrize("text", ["72(x)", "abc", "4,,4"])
def test_per_node_counts_malformed(text):
    with pytest.raises(AllocationError, match="SLURM_JOB_CPUS_PER_NODE"):
        parse_per_node_counts(text)


@pytest.mark.parametrize("text,n", [
    ("4", 4), ("a100:4", 4), ("gpu:a100:2", 2), ("gpu:2(S:0-1)", 2),
    ("cpu=6,gres/gpu:a100=2", 2), ("cpu=6,gres/gpu=3", 3), ("cpu=6,mem=4G", 0),
])
def test_gpu_counts(text, n):
    assert parse_gpu_count(text, "SLURM_GPUS_PER_NODE") == n


@pytest.mark.parametrize("text", ["a100:four", "gres/gpu=x"])
def test_gpu_counts_malformed(text):
    with pytest.raises(AllocationError, match="cannot parse"):
        parse_gpu_count(text, "SLURM_GPUS_PER_NODE")


@pytest.mark.parametrize("text,devices", [
    ("0,1,3", ["0", "1", "3"]), ("", []), ("-1", []), ("NoDevFiles", []),
    ("GPU-8a1f3c2e-aaaa,GPU-77c2d1b0-bbbb", ["GPU-8a1f3c2e-aaaa", "GPU-77c2d1b0-bbbb"]),
])
def test_device_lists(text, devices):
    assert parse_device_list(text) == devices


@pytest.mark.parametrize("text,seconds", [
    ("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184), ("UNLIMITED", None), ("INVALID", None),
])
def test_time_left(text, seconds):
    assert parse_time_left(text) == seconds


def test_node_addr():
    out = "NodeName=n1 Arch=x86_64 CoresPerSocket=1\n   NodeAddr=127.0.0.2 NodeHostName=box Version=22.05"
    assert parse_node_addr(out) == "127.0.0.2"
    assert parse_node_addr("NodeName=n1") is None


SLURM = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURMD_NODENAME": "gpu01"}


@pytest.mark.parametrize("extra,gpus,cpus", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4, []),
    ({"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_JOB_CPUS_PER_NODE": "72(x2)"}, 4, [72, 72]),
    ({"SLURM_JOB_GPUS": "0,1", "SLURM_CPUS_ON_NODE": "16"}, 2, [16, 16]),
    ({"SLURM_STEP_GPUS": "2,3", "SLURM_JOB_GPUS": "0,1,2,3"}, 2, []),
    ({"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb,GPU-ccc"}, 3, []),
    ({"SLURM_TRES_PER_TASK": "cpu=6,gres/gpu:a100=2", "SLURM_CPUS_PER_TASK": "6"}, 2, [6, 6]),
    ({}, 0, []),
])
def test_allocation_from_env(extra, gpus, cpus):
    alloc = Allocation.from_env({**SLURM, **extra})
    assert alloc.source == "slurm" and alloc.job_id == "42" and alloc.nodes == ["gpu01", "gpu02"]
    assert alloc.gpus_per_node == gpus and alloc.cpus_per_node == cpus and alloc.node_name == "gpu01"


def test_allocation_inside_an_srun_step_sees_the_whole_job():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NODELIST": "n[1-2]", "SLURM_STEP_ID": "0",
           "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0": "1(x2)", "SLURMD_NODENAME": "n1", "CUDA_VISIBLE_DEVICES": "0,1"}
    alloc = Allocation.from_env(env)
    assert alloc.nodes == ["n1", "n2"] and alloc.cpus_per_node == [1, 1] and alloc.gpus_per_node == 2


def test_allocation_memory_and_step():
    alloc = Allocation.from_env({**SLURM, "SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "8",
                                 "SLURM_STEP_ID": "0"})
    assert alloc.mem_mb == 8000 and alloc.in_step
    assert Allocation.from_env({**SLURM, "SLURM_MEM_PER_NODE": "64000"}).mem_mb == 64000


def test_allocation_bad_variable_is_quoted():
    with pytest.raises(AllocationError, match="SLURM_GPUS_ON_NODE='four'"):
        Allocation.from_env({**SLURM, "SLURM_GPUS_ON_NODE": "four"})


def test_local_allocation():
    assert Allocation.from_env({}, gpu_count=0).gpus_per_node == 0
    assert Allocation.from_env({}, gpu_count=8).gpus_per_node == 8
    alloc = Allocation.from_env({"CUDA_VISIBLE_DEVICES": "0,1"}, gpu_count=8)
    assert alloc.source == "local" and alloc.gpus_per_node == 2 and alloc.num_nodes == 1


def _alloc(nodes: int, gpus: int) -> Allocation:
    return Allocation(source="slurm", nodes=[f"n{i}" for i in range(nodes)], gpus_per_node=gpus)


def _args(**kw):
    base = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "distributed_executor_backend": None}
    return SimpleNamespace(**{**base, **kw})


MODEL = {"num_attention_heads": 32, "num_hidden_layers": 32}


@pytest.mark.parametrize("nodes,gpus,model,flags,tp,pp,executor", [
    (1, 0, MODEL, {}, 1, 1, None),               # CPU
    (1, 1, MODEL, {}, 1, 1, None),
    (1, 4, MODEL, {}, 4, 1, "mp"),
    (1, 8, {"num_attention_heads": 12, "num_hidden_layers": 4}, {}, 6, 1, "mp"),  # heads limit TP
    (2, 4, MODEL, {}, 4, 2, "ray"),
    (4, 8, MODEL, {}, 8, 4, "ray"),
    (2, 4, MODEL, {"tensor_parallel_size": 2}, 2, 2, "mp"),    # 2 x 2 fits on one node: no Ray
    (2, 4, MODEL, {"tensor_parallel_size": 4}, 4, 2, "ray"),
    (1, 4, MODEL, {"tensor_parallel_size": 2}, 2, 1, "mp"),
    (2, 4, MODEL, {"distributed_executor_backend": "mp", "pipeline_parallel_size": 1}, 4, 1, "mp"),
])
def test_plans(nodes, gpus, model, flags, tp, pp, executor):
    args = _args(**flags)
    plan = make_plan(_alloc(nodes, gpus), model, set(flags), args)
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.executor) == (tp, pp, executor)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (tp, pp)
    if executor == "ray":
        assert args.distributed_executor_backend == "ray" and plan.needs_ray


@pytest.mark.parametrize("nodes,gpus,model,flags,match", [
    (1, 4, MODEL, {"tensor_parallel_size": 8}, "8 GPUs"),
    (1, 4, {"num_attention_heads": 6}, {"tensor_parallel_size": 4}, "does not divide"),
    (2, 0, MODEL, {}, "no GPUs"),
    (4, 1, {"num_attention_heads": 8, "num_hidden_layers": 2}, {}, "more than the model's 2 layers"),
    (2, 4, MODEL, {"tensor_parallel_size": 4, "pipeline_parallel_size": 4}, "16 GPUs"),
    (1, 4, MODEL, {"tensor_parallel_size": 0}, ">= 1"),
])
def test_impossible_plans_are_one_line(nodes, gpus, model, flags, match):
    with pytest.raises(PlanError, match=match) as info:
        make_plan(_alloc(nodes, gpus), model, set(flags), _args(**flags))
    assert "\n" not in str(info.value)
