"""``%vllm_load MODEL --server``: plan like the in-process engine, then start (or find) a ``vllm serve``."""

from __future__ import annotations

import os
import time

from . import logs
from .errors import VllmNotebookError


def load_server(args, path: str, explicit: set[str], user_flags: list[str], ours, progress: bool):
    """Start a server for ``args`` (parsed by ``vllm serve``'s parser) or attach to a matching one."""
    from . import client, models, servers
    from .allocation import Allocation
    from .display import LiveLine
    from .loader import LoadPlan, _attach_record, _key
    from .plan import make_plan

    _vllm = logs.import_vllm()
    model = str(args.model)
    alloc = Allocation.from_env(gpu_count=_vllm.device_count())
    plan = make_plan(alloc, models.read_config(path), explicit, args)
    flags = list(user_flags) + plan_flags(plan, explicit)
    target = model
    if models.from_cache(model, path):  # the cached snapshot, served under its Hub id, offline
        target = path
        if "served_model_name" not in explicit:
            flags += ["--served-model-name", model]
    host = ours.host or "127.0.0.1"
    key = [list(pair) for pair in _key(args)]
    if ours.dry_run:
        shown = {k: getattr(args, k) for k in sorted(explicit - {"model"}) if hasattr(args, k)}
        lp = LoadPlan(name=ours.name, model=model, path=path, engine_args=shown, plan=plan, allocation=alloc)
        lp.server_command = servers.command(target, flags, host, ours.port or "FREE_PORT")
        return lp
    rec = servers.find(model, key=key)
    if rec is not None:  # the same configuration, spelled differently
        return _attach_record(rec, ours.name, progress)
    old = _engine_named(ours.name)
    if old is not None:  # free its devices before the new server claims them
        old.unload()
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if target != model else {}
    if _vllm.is_cpu_build() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "4"  # not half the node's RAM
    line = LiveLine(enabled=progress)
    t0 = time.monotonic()
    cluster = None
    if plan.needs_ray:
        from . import ray_cluster

        line.update(f"vllm-notebook: starting the Ray cluster on {alloc.num_nodes} nodes …")
        cluster = ray_cluster.up(alloc, ours.ray_address)
        env.update(cluster.env())

    def report(phase: str, elapsed: float) -> None:
        line.update(f"vllm-notebook: server {phase} … {elapsed:.0f} s  ({model})", key=phase)

    try:
        rec = servers.start(model, flags, target=target, match=servers.normalize(user_flags), key=key, host=host,
                            port=ours.port, env=env, key_file=ours.api_key_file, plan=plan.as_dict(),
                            progress=report)
    except KeyboardInterrupt:
        raise VllmNotebookError("load interrupted; the half-started server was stopped") from None
    except VllmNotebookError:
        line.done(f"vllm-notebook: failed after {time.monotonic() - t0:.0f} s")
        raise
    if cluster is not None and cluster.owned:  # the cluster now lives as long as the server
        from . import ray_cluster

        rec.ray_groups = ray_cluster.release()
        servers.update(rec)
    eng = client.connect(ours.name, rec.url, rec.api_key(), record=rec)
    line.done(f"vllm-notebook: server ready in {time.monotonic() - t0:.1f} s at {rec.url} — {eng.model} · "
              f"max_model_len {eng.facts.get('max_model_len')} · TP {plan.tensor_parallel_size} / "
              f"PP {plan.pipeline_parallel_size} · survives kernel restarts; %vllm_unload stops it")
    return eng


def plan_flags(plan, explicit: set[str]) -> list[str]:
    """The parallel flags the plan chose (the user's own flags are already on the command line)."""
    out: list[str] = []
    if "tensor_parallel_size" not in explicit and plan.tensor_parallel_size != 1:
        out += ["--tensor-parallel-size", str(plan.tensor_parallel_size)]
    if "pipeline_parallel_size" not in explicit and plan.pipeline_parallel_size != 1:
        out += ["--pipeline-parallel-size", str(plan.pipeline_parallel_size)]
    if "distributed_executor_backend" not in explicit and plan.executor in ("ray", "mp"):
        out += ["--distributed-executor-backend", plan.executor]
    return out


def _engine_named(name: str):
    from .engine import engines

    return engines().get(name)
