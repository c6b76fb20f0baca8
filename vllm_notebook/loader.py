"""``load()``: from a model name and engine flags to a running ``Engine``."""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any

from . import engine as _engine
from . import logs
from .errors import UsageError, VllmNotebookError

OWN_FLAGS = ("model_tag", "name", "dry_run", "help", "ray_address")


@dataclass
class LoadPlan:
    """What ``load`` would start (the result of ``--dry-run``): the allocation and the plan."""

    name: str
    model: str
    path: str
    engine_args: dict[str, Any]
    plan: Any = None
    allocation: Any = None

    def rows(self) -> list[tuple[str, str]]:
        args = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in self.engine_args.items())
        rows = [("engine", self.name), ("model", f"{self.model} ({self.path})"), ("flags", args or "(defaults)")]
        rows += self.allocation.rows() if self.allocation is not None else []
        rows += self.plan.rows() if self.plan is not None else []
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return f"would start engine '{self.name}' (dry run: nothing started)\n" + "\n".join(
            f"  {k:<{width}}  {v}" for k, v in self.rows())

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        import html

        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in self.rows())
        return f"<p>would start engine <b>{html.escape(self.name)}</b> (dry run: nothing started)</p><table>{body}</table>"


def load(model: str | None = None, *, name: str = "default", dry_run: bool = False,
         progress: bool = True, ray_address: str | None = None, **engine_args: Any):
    """Start (or reuse) an engine called ``name``; keyword arguments are ``EngineArgs`` fields.

    Loading the same model with the same arguments again returns the running
    engine at once; different ones unload the old engine first.
    """
    _vllm = logs.import_vllm()
    if not model:
        raise UsageError("load() needs a model: a Hugging Face id or a model folder")
    unknown = set(engine_args) - _vllm.engine_arg_fields()
    if unknown:
        bad = sorted(unknown)[0]
        near = difflib.get_close_matches(bad, _vllm.engine_arg_fields(), n=1)
        raise UsageError(f"unknown engine argument {bad!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    from . import models

    path = models.resolve(str(model), engine_args.get("revision"), engine_args.get("download_dir"))
    args = _vllm.engine_args(model=model, **engine_args)
    return _load(args, path, set(engine_args), name, dry_run, progress, ray_address)


def load_from_argv(argv: list[str], default_model: str = "", progress: bool = True):
    """``%vllm_load``'s parser: vLLM's own engine flags plus ``--name`` and ``--dry-run``."""
    _vllm = logs.import_vllm()

    parser = _vllm.engine_arg_parser("%vllm_load")
    parser.add_argument("model_tag", nargs="?", help="model folder or Hugging Face id")
    ours = parser.add_argument_group("vllm-notebook")
    ours.add_argument("--name", default="default", help="engine name (several can coexist)")
    ours.add_argument("--dry-run", action="store_true", help="show what would start; start nothing")
    ours.add_argument("--ray-address", help="use this Ray cluster (multi-node) instead of starting one")
    ours.add_argument("-h", "--help", action="store_true", help="show this help")
    try:
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        raise UsageError(_explain(str(exc), argv, parser)) from None
    except SystemExit:
        raise UsageError("invalid %vllm_load arguments; see %vllm_load --help") from None
    if ns.help:
        print(parser.format_help())
        return None
    explicit = {k for k, v in vars(ns).items() if v != parser.get_default(k)} - set(OWN_FLAGS)
    model = ns.model_tag or (ns.model if "model" in explicit else None) or default_model
    if not model:
        raise UsageError("no model given: %vllm_load MODEL, or set %config VllmMagics.default_model "
                         "(or $VLLM_NOTEBOOK_MODEL)")
    ns.model = model
    explicit.add("model")
    name, dry_run, ray_address = ns.name, ns.dry_run, ns.ray_address
    for key in OWN_FLAGS:
        delattr(ns, key)
    from . import models

    # Resolve before EngineArgs exists: constructing it already looks the model up.
    path = models.resolve(str(model), getattr(ns, "revision", None), getattr(ns, "download_dir", None))
    try:
        args = _vllm.engine_args_from_namespace(ns)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    return _load(args, path, explicit, name, dry_run, progress, ray_address)


def _explain(message: str, argv: list[str], parser) -> str:
    hint = "see %vllm_load --help for every flag"
    if "unrecognized arguments" in message:
        flags = [s.split("=")[0] for s in argv if s.startswith("--")]
        known = [o for a in parser._actions for o in a.option_strings]
        for flag in flags:
            if flag not in known:
                near = difflib.get_close_matches(flag, known, n=1)
                if near:
                    return f"%vllm_load: unknown flag {flag} (did you mean {near[0]}?); {hint}"
                return f"%vllm_load: unknown flag {flag}; {hint}"
    return f"%vllm_load: {message}; {hint}"


def _key(args) -> tuple:
    """What identifies an engine's configuration: every field that is set to something."""
    import dataclasses

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


def _load(args, path: str, explicit: set[str], name: str, dry_run: bool, progress: bool,
          ray_address: str | None = None):
    from . import models
    from .allocation import Allocation
    from .display import LiveLine
    from .plan import make_plan

    _vllm = logs.import_vllm()
    line = LiveLine(enabled=progress and not dry_run)
    t0 = time.monotonic()
    if "disable_log_stats" not in explicit:
        args.disable_log_stats = True
    alloc = Allocation.from_env(gpu_count=_vllm.device_count())
    plan = make_plan(alloc, models.read_config(path), explicit, args)
    if dry_run:
        shown = {k: getattr(args, k) for k in sorted(explicit - {"model"})}
        shown.update({k: getattr(args, k) for k in ("tensor_parallel_size", "pipeline_parallel_size",
                                                       "distributed_executor_backend") if getattr(args, k) not in (None, 1)})
        return LoadPlan(name=name, model=str(args.model), path=path, engine_args=shown, plan=plan, allocation=alloc)
    key = _key(args)
    old = _engine.engines().get(name)
    if old is not None:
        if old.key == key and old.alive:
            line.done(f"vllm-notebook: engine '{name}' is already running {old.model} (reused)")
            return old
        line.update(f"vllm-notebook: unloading the previous '{name}' engine ({old.model}) …")
        old.unload()
    if _vllm.is_cpu_build() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # vLLM's CPU build would reserve half the RAM for KV cache; a notebook shares the node.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
    cluster = None
    if plan.needs_ray:
        from . import ray_cluster

        line.update(f"vllm-notebook: starting the Ray cluster on {alloc.num_nodes} nodes …")
        cluster = ray_cluster.up(alloc, ray_address)
    eng = _engine.Engine(name, args, key, logs.new_log_path(name), plan=plan.as_dict())
    eng.ray_cluster = cluster

    def report(phase: str, elapsed: float) -> None:
        line.update(f"vllm-notebook: {phase} … {elapsed:.0f} s  ({args.model})", key=phase)

    try:
        eng._start(report)
    except VllmNotebookError:
        line.done(f"vllm-notebook: failed after {time.monotonic() - t0:.0f} s")
        raise
    eng.plan["executor"] = eng.facts.get("executor", eng.plan.get("executor"))
    _engine._register(eng)
    line.done(f"vllm-notebook: ready in {time.monotonic() - t0:.1f} s — {summary(eng)}")
    return eng


def summary(eng) -> str:
    f = eng.facts
    return (f"{f['model']} · {f['dtype']} · max_model_len {f['max_model_len']} · "
            f"TP {f['tensor_parallel_size']} / PP {f['pipeline_parallel_size']} · {f['device']} · "
            f"KV cache {f['kv_cache_tokens']:,} tokens")
