"""``%vllm_load MODEL --server``: a prepared load started as a ``vllm serve`` process, or connected to again.

The engine it returns is not registered yet: ``loader.install`` decides what it replaces."""

from __future__ import annotations

import time
from typing import NamedTuple

from .backends.server import connect
from .cluster import ray as ray_cluster
from .engine.core import Engine
from .errors import VllmNotebookError
from .prepare import Prepared
from .server import process, record
from .progress import LiveLine


class Listen(NamedTuple):
    """Where the server listens and which key it takes (``--host``, ``--port``, ``--api-key-file``)."""

    host: str | None = None
    port: int | None = None
    api_key_file: str | None = None


def server_flags(prep: Prepared, user_flags: list[str]) -> tuple[str, list[str]]:
    """What the server loads and its flags: the user's, the plan's, and (for a cached Hub model) its name."""
    flags = list(user_flags) + plan_flags(prep.plan, prep.explicit)
    target = prep.model
    if prep.hub_id is not None:  # the cached snapshot, served under its Hub id, offline
        target = prep.path
        if "served_model_name" not in prep.explicit:
            flags += ["--served-model-name", prep.model]
    return target, flags


def command_for(prep: Prepared, user_flags: list[str], listen: Listen) -> list[str]:
    """The command line ``start`` would run (``--dry-run`` shows it)."""
    target, flags = server_flags(prep, user_flags)
    return process.command(target, flags, listen.host or "127.0.0.1", listen.port or "FREE_PORT")


def alike(prep: Prepared) -> record.ServerRecord | None:
    """The running server of this configuration, if any (the loader attaches to it)."""
    return record.find(prep.model, key=[list(pair) for pair in prep.key])


def start_new(prep: Prepared, user_flags: list[str], listen: Listen, ray_address: str | None,
              line: LiveLine) -> Engine:
    """Start the server ``prep`` describes and connect to it (no search for a running one: ``alike``)."""
    key = [list(pair) for pair in prep.key]
    target, flags = server_flags(prep, user_flags)
    env = dict(prep.env)
    t0 = time.monotonic()
    cluster = None
    if prep.plan.needs_ray:
        line.update(f"vllm-notebook: starting the Ray cluster on {prep.allocation.num_nodes} nodes …")
        cluster = ray_cluster.up(prep.allocation, ray_address)
        env.update(cluster.env())

    def report(phase: str, elapsed: float) -> None:
        line.update(f"vllm-notebook: server {phase} … {elapsed:.0f} s  ({prep.model})", key=phase)

    try:
        rec = process.start(prep.model, flags, target=target, match=record.normalize(user_flags), key=key,
                            host=listen.host or "127.0.0.1", port=listen.port, env=env,
                            key_file=listen.api_key_file, plan=prep.plan.as_dict(), progress=report,
                            share_cores=prep.cpu_build)
    except KeyboardInterrupt:
        raise VllmNotebookError("load interrupted; the half-started server was stopped") from None
    except VllmNotebookError:
        line.done(f"vllm-notebook: failed after {time.monotonic() - t0:.0f} s")
        raise
    if cluster is not None and cluster.owned:  # the cluster now lives as long as the server
        rec.ray_groups = ray_cluster.release()
        record.update(rec)
    eng = connect(prep.name, rec.url, rec.api_key(), record=rec)
    line.done(f"vllm-notebook: server ready in {time.monotonic() - t0:.1f} s at {rec.url} — {eng.model} · "
              f"max_model_len {eng.facts.get('max_model_len')} · TP {prep.plan.tensor_parallel_size} / "
              f"PP {prep.plan.pipeline_parallel_size} · survives kernel restarts; %vllm_unload stops it")
    return eng


def connect_record(rec: record.ServerRecord, name: str, line: LiveLine) -> Engine:
    """Connect to a server we started earlier (from this kernel or a previous one)."""
    t0 = time.monotonic()
    try:  # a server started by an earlier kernel may still be loading
        process.wait_ready(rec, progress=lambda phase, s: line.update(f"vllm-notebook: server still {phase} … {s:.0f} s"))
    except KeyboardInterrupt:
        raise VllmNotebookError(f"stopped waiting; the server at {rec.url} goes on starting "
                                "(%vllm_servers shows it, --stop ID stops it)") from None
    eng = connect(name, rec.url, rec.api_key(), record=rec)
    line.done(f"vllm-notebook: attached to the running server at {rec.url} in {time.monotonic() - t0:.2f} s "
              f"(up {rec.uptime()}{', job ' + rec.job_id if rec.job_id else ''}) — {eng.model}")
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
