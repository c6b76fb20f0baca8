"""Loading: from a ``%vllm_load`` line or a call to a running engine, through one typed request.

``LoadRequest`` is what one load asks for, however it was asked: the magic's parser builds it
(``LoadRequest.from_argv``), and so do ``load()``, ``attach()`` and ``submit()``, directly. ``start`` is the one
function that turns a request into an engine: the model is resolved, vLLM's own parser (or its ``EngineArgs``,
for keywords) reads the settings, ``prepare`` plans and sets the environment, and a back-end starts: in this
kernel, as a server (``launch.py``), attached to a running one, or as a Slurm job. ``install`` is the one owner
of reuse-or-replace: the running engine of the same name and configuration is reused; a different one is
replaced, and a replacement that fails to start leaves the old engine serving. The reattach fast path finds a
running server from the line alone, without importing vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import copy
import difflib
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import launch, logs, prepare
from .backends import slurm as slurm_backend
from .backends.local import LocalBackend
from .backends.replicas import ReplicasBackend
from .backends.step import Step
from .backends.server import ServerBackend, connect
from .cluster import ray as ray_cluster
from .cluster.plan import replica_layout, replica_nodes
from .engine import lora, vllm_import
from .engine import registry as engine_registry
from .engine.core import Engine
from .errors import SecretOnLineError, UsageError, VllmNotebookError
from .models import resolve
from .prepare import LoadPlan, Prepared, engine_flags, scoped_env
from .progress import LiveLine
from .server import record as servers
from .backends import slurm_job

__all__ = ["LoadPlan", "LoadRequest", "attach", "install", "load", "load_from_argv", "start", "submit"]

BACKENDS = ("local", "server", "attach", "slurm")


@dataclass
class LoadRequest:
    """Everything one load asks for (see the module's text). Built by ``from_argv`` or directly."""

    model: str | None = None  # a Hugging Face id or a folder; None: from ``flags`` (``--model``) or the default
    name: str = "default"
    #: ``local`` (vLLM in this kernel), ``server`` (a ``vllm serve`` that outlives the kernel), ``attach`` (a
    #: running server at ``url``) or ``slurm`` (a server in a batch job with the sbatch options ``slurm``).
    backend: str = "local"
    flags: list[str] = field(default_factory=list)  # vLLM's engine flags as typed (vLLM's parser reads them)
    #: Or ``EngineArgs`` fields as keywords (``load()``, ``submit()``); None for a line, which vLLM's parser reads.
    engine_args: dict[str, Any] | None = None
    default_model: str = ""  # the model when none is named (``%config VllmMagics.default_model``)
    dry_run: bool = False
    progress: bool = True
    help: bool = False
    ray_address: str | None = None  # a Ray cluster to use instead of starting one (multi-node)
    host: str | None = None  # server: where it listens (default 127.0.0.1)
    port: int | None = None  # server: its port (default: a free one)
    api_key_file: str | None = None  # server, attach: the key, in a file only you can read
    url: str | None = None  # attach
    api_key: str | None = field(default=None, repr=False)  # attach from Python: never printed, stored or logged
    slurm: list[str] = field(default_factory=list)  # slurm: the sbatch options
    chain: int = 0  # slurm: successor jobs that keep the model up past the walltime
    wait: bool = True  # slurm: requests before the job is ready wait for it (else they fail at once)
    server_flag: bool = field(default=False, repr=False)  # ``--server`` typed: with --attach or --slurm, a mistake
    #: local: that many engines of the same model and flags, as one (``backends/replicas.py``); "auto": as many as
    #: fit this node (``cluster/plan.auto_replicas``)
    replicas: int | str = 1

    @classmethod
    def from_argv(cls, argv: list[str], default_model: str = "", progress: bool = True) -> LoadRequest:
        """``%vllm_load``'s line: our flags here; vLLM's own stay as typed in ``flags`` (its parser reads them)."""
        own = _own_parser()
        try:
            ours, rest = own.parse_known_args(_glue(argv, "--slurm"))  # its value starts with "-"
        except argparse.ArgumentError as exc:
            raise UsageError(f"%vllm_load: {exc}; see %vllm_load --help") from None
        backend = "attach" if ours.attach else "slurm" if ours.slurm is not None else \
            "server" if ours.server else "local"
        req = cls(name=ours.name, backend=backend, default_model=default_model, dry_run=ours.dry_run,
                  progress=progress, help=ours.help, ray_address=ours.ray_address, host=ours.host, port=ours.port,
                  api_key_file=ours.api_key_file, url=ours.attach, chain=ours.chain, wait=not ours.no_wait,
                  replicas=ours.replicas)
        if backend == "slurm" and not ours.help:
            try:
                req.slurm = shlex.split(ours.slurm)
            except ValueError as exc:
                raise UsageError(f"%vllm_load --slurm: {exc} in {ours.slurm!r}") from None
        req.server_flag = ours.server
        if rest and not rest[0].startswith("-"):  # the model first, as usually typed
            req.model, req.flags = rest[0], rest[1:]
        else:
            req.flags = list(rest)
        return req

    def check(self) -> None:
        """The mistakes a line (or a call) can make in our own flags, each in one line."""
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown back-end {self.backend!r}: one of {', '.join(BACKENDS)}")
        if self.help:
            return
        if self.backend == "attach":
            extra = [t for t in self.flags if t.startswith("-")] or engine_flags(self.engine_args or {})
            if extra or self.server_flag or self.dry_run:
                bad = extra[0] if extra else ("--server" if self.server_flag else "--dry-run")
                raise UsageError(f"%vllm_load --attach uses the server as it runs: drop {bad} "
                                 "(engine flags belong on the server's command line)")
            return
        if self.backend == "slurm":
            if self.server_flag or self.host or self.port or self.api_key_file:
                raise UsageError("%vllm_load --slurm runs the server in a batch job, bound to the job's node and "
                                 "keyed: drop --server, --host, --port and --api-key-file")
            if self.replicas == "auto" or (not isinstance(self.replicas, int) or self.replicas < 1):
                raise UsageError("%vllm_load --slurm --replicas takes a number of jobs (auto plans this node's "
                                 "GPUs, not a job's)")
            return
        if self.chain or not self.wait:
            raise UsageError("%vllm_load: --chain and --no-wait go with --slurm 'SBATCH OPTIONS'")
        if self.replicas != "auto" and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise UsageError(f"%vllm_load: --replicas takes a number of engines, 1 or more, or auto "
                             f"(not {self.replicas!r})")
        if self.replicas != 1 and self.backend != "local":
            raise UsageError(f"%vllm_load: --replicas runs engines in this kernel, or as Slurm jobs (--slurm); "
                             f"with --{self.backend} it is not supported yet")
        if self.backend == "local" and (self.host or self.port or self.api_key_file):
            raise UsageError("%vllm_load: --host, --port and --api-key-file go with --server (or --attach URL)")

    def words(self) -> list[str]:
        """The engine settings as a line for vLLM's parser: the model first, then the flags (keywords as flags)."""
        return ([self.model] if self.model else []) + list(self.flags) + engine_flags(self.engine_args or {})


# ------------------------------------------------------------------ the Python API
def load(model: str | None = None, *, name: str = "default", dry_run: bool = False,
         progress: bool = True, ray_address: str | None = None, server: bool = False,
         host: str | None = None, port: int | None = None, api_key_file: str | None = None, replicas: int = 1,
         **engine_args: Any):
    """Start (or reuse) an engine called ``name``; keyword arguments are ``EngineArgs`` fields, and
    ``lora_modules={"name": "/adapter/folder"}`` (with ``enable_lora=True``) loads LoRA adapters with it.
    ``replicas=N`` starts N engines of the same model and arguments as one (``%vllm_load --replicas``).

    Loading the same model with the same arguments again returns the running
    engine at once; different ones replace the old engine (which serves on if the new one fails). With
    ``server=True`` the engine is a ``vllm serve`` process that outlives the
    kernel, and a later identical ``load`` attaches to it in a fraction of a second.
    """
    if not model:
        raise UsageError("load() needs a model: a Hugging Face id or a model folder")
    if not server and (host or port or api_key_file):
        raise UsageError("host, port and api_key_file are for server=True")
    return start(LoadRequest(model=str(model), name=name, backend="server" if server else "local",
                             engine_args=engine_args, dry_run=dry_run, progress=progress, ray_address=ray_address,
                             host=host, port=port, api_key_file=api_key_file, replicas=replicas))


def attach(url: str, *, name: str = "default", api_key_file: str | None = None, api_key: str | None = None,
           model: str | None = None, progress: bool = True):
    """Use a running OpenAI-compatible vLLM server as engine ``name``; it is never stopped by us.

    The key comes from ``api_key``, ``api_key_file``, ``$VLLM_API_KEY``, or (for a
    server vllm-notebook started) its key file.
    """
    return start(LoadRequest(backend="attach", url=url, name=name, api_key_file=api_key_file, api_key=api_key,
                             model=model, progress=progress))


def submit(model: str, slurm: str = "", *, name: str = "default", chain: int = 0, wait: bool = True,
           dry_run: bool = False, progress: bool = True, **engine_args: Any):
    """Run ``model`` as a vLLM server in a Slurm batch job (``slurm``: sbatch options); the handle, at once.

    The handle shows the job's state as it goes (PENDING, RUNNING, READY, FAILED); requests wait until the
    server is ready (or, with ``wait=False``, fail at once). ``chain`` successor jobs keep the model up past
    the walltime. The same call in a restarted kernel finds the job instead of submitting another.
    """
    if not model:
        raise UsageError("submit() needs a model: a Hugging Face id or a model folder")
    try:
        options = shlex.split(slurm)
    except ValueError as exc:
        raise UsageError(f"submit(): {exc} in {slurm!r}") from None
    return start(LoadRequest(model=str(model), name=name, backend="slurm", slurm=options, chain=chain, wait=wait,
                             dry_run=dry_run, progress=progress, engine_args=engine_args))


def load_from_argv(argv: list[str], default_model: str = "", progress: bool = True):
    """``%vllm_load``'s parser: vLLM's own flags (of the engine, or of ``vllm serve``) plus ours."""
    return start(LoadRequest.from_argv(argv, default_model, progress))


# ------------------------------------------------------------------ request -> engine
#: The one progress line of the request being started: the import, the phases and "ready" share it, so a load
#: shows one line from the first moment, and its "ready in" counts from the start of the request (the cell).
_line: contextvars.ContextVar[LiveLine | None] = contextvars.ContextVar("vllm_notebook_load_line", default=None)


def _load_line(enabled: bool) -> LiveLine:
    """The current request's line (a new one outside a request)."""
    line = _line.get()
    return line if line is not None else LiveLine(enabled=enabled)


def start(req: LoadRequest):
    """The one function that turns a request into an engine (or, for ``dry_run``, the plan; for ``help``, None)."""
    req.check()
    token = _line.set(LiveLine(enabled=req.progress and not req.help))
    try:
        return _start(req)
    finally:
        _line.reset(token)


def _start(req: LoadRequest):
    if req.backend == "attach" and not req.help:
        return _attach(req)
    if req.backend == "slurm" and not req.help:
        return _submit(req)
    words = req.words()
    _refuse_secret_words(words)
    if req.backend == "server" and not req.dry_run and not req.help:
        model, flags = _split_model(words, req.default_model)
        rec = servers.find(model, servers.normalize(flags)) if model else None
        if rec is not None:  # the fast path: no vLLM import at all
            return _attach_record(rec, req.name, req.progress)
    if req.backend == "local" and req.engine_args is not None and not req.help:
        prep, loras = _prepared_from_keywords(req)
    else:
        parsed = _prepared_from_line(req, words)
        if parsed is None:  # --help
            return None
        prep, loras, user_flags = parsed
        if req.backend == "server":
            listen = launch.Listen(req.host, req.port, req.api_key_file)
            if req.dry_run:
                return prep.dry_run(launch.command_for(prep, user_flags, listen))
            return start_server(prep, user_flags, listen, req.ray_address, req.progress)
    return prep.dry_run() if req.dry_run else start_local(prep, req.progress, req.ray_address, loras)


def _prepared_from_keywords(req: LoadRequest) -> tuple[Prepared, list[tuple[str, str]]]:
    """``load(model, **engine_args)``: vLLM's ``EngineArgs`` from the keywords, typed (no command line)."""
    engine_args = dict(req.engine_args)
    _refuse_secrets(argparse.Namespace(**engine_args))
    modules = engine_args.pop("lora_modules", None) or {}
    loras = _check_loras(argparse.Namespace(
        lora_modules=[f"{k}={v}" for k, v in modules.items()] if isinstance(modules, dict) else modules,
        enable_lora=engine_args.get("enable_lora"), max_lora_rank=engine_args.get("max_lora_rank", 16)))
    path = resolve.resolve(str(req.model), engine_args.get("revision"), engine_args.get("download_dir"))  # first
    _vllm = vllm_import.vllm_api(_import_line(req.progress))
    unknown = set(engine_args) - _vllm.engine_arg_fields()
    if unknown:
        bad = sorted(unknown)[0]
        near = difflib.get_close_matches(bad, _vllm.engine_arg_fields(), n=1)
        raise UsageError(f"unknown engine argument {bad!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    args = _vllm.engine_args(model=req.model, **engine_args)
    prep = prepare.prepare(req.name, args, path, set(engine_args), gpu_count=_vllm.device_count(),
                           cpu_build=_vllm.is_cpu_build(), replicas=req.replicas)
    prep.flags = prepare.engine_flags(engine_args)
    return prep, loras


def _prepared_from_line(req: LoadRequest, words: list[str]):
    """vLLM's own parser (of the engine, or of ``vllm serve``) over ``words``; then the plan. Returns
    (Prepared, LoRA adapters, the user's flags without the model), or None after printing ``--help``."""
    early = None if req.help else _resolve_early(words)  # a missing model fails in a second, before vLLM loads
    _vllm = vllm_import.vllm_api(_import_line(req.progress and not req.help))
    server = req.backend == "server"
    if server:
        parser = _vllm.serve_arg_parser("%vllm_load --server")
    else:
        parser = _vllm.engine_arg_parser("%vllm_load")
        parser.add_argument("model_tag", nargs="?", help="model folder or Hugging Face id")
        parser.add_argument("--lora-modules", nargs="+", action=_vllm.lora_parser_action(), default=None,
                            help="LoRA adapters to load with the engine: NAME=PATH ... (needs --enable-lora)")
    if req.help:
        print(_own_parser().format_help() + "\n" + parser.format_help())
        return None
    try:
        ns = parser.parse_args(words)
    except argparse.ArgumentError as exc:
        raise UsageError(_explain(str(exc), words, parser, _own_parser())) from None
    except SystemExit:
        raise UsageError("invalid %vllm_load arguments; see %vllm_load --help") from None
    _refuse_secrets(ns)
    explicit = _given(parser, words, ns) - {"model_tag"}
    model = ns.model_tag or (ns.model if "model" in explicit else None) or req.default_model
    if not model:
        raise UsageError("no model given: %vllm_load MODEL, or set %config VllmMagics.default_model "
                         "(or $VLLM_NOTEBOOK_MODEL)")
    ns.model = model
    explicit.add("model")
    user_flags = _without(words, ns.model_tag)
    del ns.model_tag
    loras = _check_loras(ns) if not server else []
    # Resolve before EngineArgs exists: constructing it already looks the model up.
    where = (str(model), getattr(ns, "revision", None), getattr(ns, "download_dir", None))
    path = early[1] if early is not None and early[0] == where else resolve.resolve(*where)
    try:
        args = _vllm.engine_args_from_namespace(ns)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    prep = prepare.prepare(req.name, args, path, explicit, gpu_count=_vllm.device_count(),
                           cpu_build=_vllm.is_cpu_build(), replicas=req.replicas)
    prep.flags = list(user_flags)
    return prep, loras, user_flags


def _attach(req: LoadRequest) -> Engine:
    """``--attach URL``: a running server as engine ``req.name`` (never stopped by us)."""
    url = (req.url if "://" in req.url else f"http://{req.url}").rstrip("/")
    api_key = req.api_key
    if api_key is None and req.api_key_file:
        api_key = servers.read_key(req.api_key_file)
    if api_key is None:
        api_key = os.environ.get("VLLM_API_KEY")
    if api_key is None:
        known = [r for r in servers.records() if r.url == url]
        api_key = known[0].api_key() if known else None
    model = req.model or (req.flags[0] if req.flags else None)
    t0 = time.monotonic()
    eng = install(req.name, None, lambda line: connect(req.name, url, api_key, model=model), progress=False,
                  needs_devices=False)
    _load_line(req.progress).done(
        f"vllm-notebook: attached to {url} in {time.monotonic() - t0:.2f} s — {eng.model} "
        f"(max_model_len {eng.facts.get('max_model_len')}); %vllm_unload detaches, the server keeps running")
    return eng


def _attach_record(rec: servers.ServerRecord, name: str, progress: bool) -> Engine:
    """A server we started earlier (from this kernel or a previous one), as engine ``name``."""
    return install(name, ("server", rec.id), lambda line: launch.connect_record(rec, name, line),
                   progress=progress, needs_devices=False,
                   on_reuse=lambda old: f"vllm-notebook: engine '{name}' is already the server at {rec.url} (reused)")


def _submit(req: LoadRequest) -> Engine | None:
    """``--slurm 'OPTIONS'``: check the flags here, then submit (or find the job again)."""
    words = req.words()
    _refuse_secret_words(words)
    model, flags = _split_model(words, req.default_model)
    if not model:
        raise UsageError("no model given: %vllm_load MODEL --slurm 'SBATCH OPTIONS'")
    flags, options = servers.normalize(flags), req.slurm
    found = None if req.dry_run else slurm_job.find(model, flags, options)
    if found is None:
        parser = vllm_import.vllm_api().serve_arg_parser("%vllm_load --slurm")
        try:  # a typo fails now, not after the job waited in the queue
            ns = parser.parse_args([model, *flags])
        except argparse.ArgumentError as exc:
            raise UsageError(_explain(str(exc), [model, *flags], parser, _own_parser())) from None
        except SystemExit:
            raise UsageError("invalid %vllm_load arguments; see %vllm_load --help") from None
        _refuse_secrets(ns)
        path = resolve.resolve(str(model), getattr(ns, "revision", None), getattr(ns, "download_dir", None))
        prepare.check_max_model_len(ns, resolve.read_config(path))  # before the queue, and before an engine goes
    if req.dry_run:
        rec = slurm_job.JobRecord(id="DRY-RUN", name=req.name, model=model, flags=flags, options=options)
        print(f"would submit: sbatch {shlex.join(options)} {rec.script}"
              + (f" (and {req.chain} chained successors)" if req.chain else "")
              + (f", {req.replicas} times: {req.replicas} replicas" if req.replicas > 1 else "") + "\n")
        print(slurm_job.script_text(rec, job_name=f"vnb-{req.name}"))
        return None
    if req.replicas > 1:
        return _submit_replicas(req, model, flags, options)
    if found is not None:  # the same submission, live: follow it (no vLLM import to find it again)
        return install(req.name, ("slurm", found.id),
                       lambda line: slurm_backend.follow(req.name, found, wait=req.wait, progress=req.progress,
                                                         earlier=True),
                       progress=req.progress, needs_devices=False,
                       on_reuse=lambda old: f"vllm-notebook: engine '{req.name}' already follows job "
                                            f"{', '.join(found.jobs)} (reused): {old.state}")
    try:  # submitted first: a submission sbatch refuses leaves the engine of this name serving
        rec = slurm_job.submit(req.name, model, flags, options, req.chain)
    except VllmNotebookError as exc:
        old = engine_registry.engines().get(req.name)
        if old is None or not old.alive:
            raise
        raise type(exc)(f"{exc}; engine '{req.name}' ({old.model}) still serves") from None
    return install(req.name, None, lambda line: slurm_backend.follow(req.name, rec, wait=req.wait,
                                                                      progress=req.progress, earlier=False),
                   progress=req.progress, needs_devices=False)


def _submit_replicas(req: LoadRequest, model: str, flags: list[str], options: list[str]) -> Engine:
    """``--slurm 'OPTIONS' --replicas N``: N jobs (each with ``--chain`` successors if asked), one engine over them
    that uses each job as soon as its server is ready."""
    recs: list = []
    try:
        for k in range(req.replicas):
            recs.append(slurm_job.submit(f"{req.name}-{k + 1}", model, flags, options, req.chain))
    except VllmNotebookError as exc:
        for rec in recs:  # all or nothing: no job stays queued for an engine that was not made
            slurm_job.cancel(rec)
        old = engine_registry.engines().get(req.name)
        if old is None or not old.alive:
            raise
        raise type(exc)(f"{exc}; engine '{req.name}' ({old.model}) still serves") from None

    def make(line: LiveLine) -> Engine:
        members = []
        for rec in recs:
            member = slurm_backend.SlurmBackend(rec, wait=req.wait, progress=req.progress)
            member.progress = slurm_job.Progress("pending", rec.jobs[0], f"submitted job {', '.join(rec.jobs)}")
            members.append(member)
        backend = ReplicasBackend(members, [{}] * len(recs), ("slurm", *(rec.id for rec in recs)),
                                  places=[f"job {rec.jobs[0]}" for rec in recs])
        line.done(f"vllm-notebook: engine '{req.name}': {len(recs)} replicas submitted as jobs "
                  f"{', '.join(rec.jobs[0] for rec in recs)}; a batch starts on the first one ready")
        return Engine(req.name, backend).start()

    return install(req.name, None, make, progress=req.progress, needs_devices=False)


# ------------------------------------------------------------------ reuse or replace
def install(name: str, key: tuple | None, make: Callable[[LiveLine], Engine], *, progress: bool,
            needs_devices: bool, on_reuse: Callable[[Engine], str] | None = None) -> Engine:
    """The one owner of reuse-or-replace for the engine called ``name``.

    - The running engine of this name whose back-end runs configuration ``key`` is reused (``on_reuse`` says so).
    - Otherwise ``make(line)`` starts the new engine. When it ``needs_devices`` here and the old engine holds
      them, the old one goes first; if the new one then fails, the old one is started again from its origin
      (``restored``). Any other old engine (a job elsewhere, a connection) goes only once the new one serves:
      detached if it is the same server or job, else unloaded.
    """
    old = engine_registry.engines().get(name)
    line = _load_line(progress)
    if old is not None and key is not None and old.backend.same_as(key) and old.alive:
        if on_reuse is not None:
            line.done(on_reuse(old))
        return old
    first = old is not None and needs_devices and old.backend.holds_devices_here
    was_alive = old is not None and old.alive
    if first:
        line.update(f"vllm-notebook: unloading the previous '{name}' engine ({old.model}) …")
        old.unload()
    try:
        eng = make(line)
    except VllmNotebookError as exc:
        if not (first and was_alive):
            raise
        raise restored(old, exc, progress) from None
    engine_registry.register(eng)
    if old is not None and not first and not old.closed and old is not eng:
        with contextlib.suppress(VllmNotebookError):
            old.detach() if old.backend.same_as(eng.key) else old.unload()
    return eng


def start_server(prep: Prepared, user_flags: list[str], listen, ray_address: str | None, progress: bool) -> Engine:
    """Start (or find) the server ``prep`` describes (``install`` replaces the engine of its name)."""
    found = launch.alike(prep)
    if found is not None:  # the same configuration runs: attach (the old engine of this name goes as it does)
        return _attach_record(found, prep.name, progress)
    return install(prep.name, None, lambda line: launch.start_new(prep, user_flags, listen, ray_address, line),
                   progress=progress, needs_devices=True)


def restored(old: Engine, exc: VllmNotebookError, progress: bool) -> VllmNotebookError:
    """The engine a failed replacement had unloaded, started again from its origin: an in-kernel engine from what
    it was prepared from, a server we started from its line. The error to raise, saying which way it went."""
    line = _load_line(progress)
    origin = old.backend.origin
    if isinstance(origin, Prepared):
        return restart_previous(old, origin, exc, line)
    if origin is None:  # attached only (it still runs), or a Slurm job's
        return exc
    line.update(f"vllm-notebook: the new engine failed; starting the previous server ({old.model}) again …")
    try:
        load_from_argv([*origin, "--name", old.name], progress=False)
    except VllmNotebookError as second:
        line.done("vllm-notebook: the previous server could not be started again either")
        return type(exc)(f"{exc}; the previous server ({old.model}) could not be started again: {second}")
    line.done(f"vllm-notebook: the previous server ({old.model}) is serving again")
    return type(exc)(f"{exc}; the previous engine '{old.name}' ({old.model}) is serving again, as a new server")


def start_local(prep: Prepared, progress: bool = True, ray_address: str | None = None,
                loras: list[tuple[str, str]] = ()) -> Engine:
    """Start the prepared engine in this kernel (or reuse the running one with the same configuration);
    ``loras``: (name, path) of the LoRA adapters to load with it."""
    args = prep.args
    t0 = time.monotonic()
    if "disable_log_stats" not in prep.explicit:
        args.disable_log_stats = True
    if prep.hub_id is not None:  # the cached snapshot: no Hub lookups, so no network needed
        args.model = prep.path
        if "tokenizer" not in prep.explicit:
            args.tokenizer = prep.path
        args.revision = args.tokenizer_revision = None

    def reused(old: Engine) -> str:
        for name, path in loras:  # adapters added to the line since: loaded into the running engine
            if name not in old.adapters:
                old.add_lora(name, path)
        return f"vllm-notebook: engine '{prep.name}' is already running {old.model} (reused)"

    started: list[Engine] = []

    def make(line: LiveLine) -> Engine:
        started.append(_start_new(prep, args, line, t0, ray_address))
        return started[-1]

    eng = install(prep.name, prep.key, make, progress=progress, needs_devices=True, on_reuse=reused)
    if started:
        for name, path in loras:
            eng.add_lora(name, path)
        line = _load_line(progress)
        line.done(f"vllm-notebook: ready in {line.elapsed():.1f} s{_import_note(line)} — {summary(eng)}")
    return eng


def restart_previous(old: Engine, prep: Prepared, exc: VllmNotebookError, line: LiveLine) -> VllmNotebookError:
    """A replacement that failed to start: the engine it replaced, started again from its own settings ``prep``
    (its adapters too), so the kernel is left as it was. The error to raise, saying which way it went."""
    line.update(f"vllm-notebook: the new engine failed; starting the previous one ({old.model}) again …")
    try:
        again = _start_new(prep, prep.args, line, time.monotonic(), None)
        engine_registry.register(again)
        for adapter in list(old.adapters):
            if adapter.name != lora.BASE_NAME:
                again.add_lora(adapter.name, adapter.path)
    except VllmNotebookError as second:
        line.done("vllm-notebook: the previous engine could not be started again either")
        return type(exc)(f"{exc}; the previous engine ({old.model}) could not be started again: {second}")
    line.done(f"vllm-notebook: the previous engine is serving again — {summary(again)}")
    return type(exc)(f"{exc}; the previous engine '{old.name}' ({old.model}) is serving again")


def _start_new(prep: Prepared, args, line: LiveLine, t0: float, ray_address: str | None) -> Engine:
    """Start the engine ``prep`` describes and return it, not registered (one line and the error if it fails)."""
    cluster = None
    if prep.plan.needs_ray:
        line.update(f"vllm-notebook: starting the Ray cluster on {prep.allocation.num_nodes} nodes …")
        cluster = ray_cluster.up(prep.allocation, ray_address)
    if prep.plan.replicas > 1:
        backend = _replicas(prep, args)
    else:
        backend = LocalBackend(args, prep.key, logs.new_log_path(prep.name), plan=prep.plan.as_dict())
    backend.origin = prep  # what it was started from: a failed replacement starts it again (restart_previous)
    eng = Engine(prep.name, backend)

    def report(phase: str, elapsed: float) -> None:
        line.update(f"vllm-notebook: {phase} … {line.elapsed():.0f} s  ({prep.model})", key=phase)

    try:
        with scoped_env(prep.env):
            eng.start(report)
    except VllmNotebookError:
        line.done(f"vllm-notebook: failed after {line.elapsed():.0f} s")
        raise
    if cluster is not None:
        _ray_users[eng] = cluster
        eng.on_unload.append(lambda unloaded: _stop_ray_when_unused(cluster, unloaded))
    eng.plan["executor"] = eng.facts.get("executor", eng.plan.get("executor"))
    if prep.hub_id is not None:
        eng.backend.facts = {**eng.facts, "model": prep.hub_id, "path": prep.path}
    return eng


def _replicas(prep: Prepared, args) -> ReplicasBackend:
    """``--replicas N``: N in-kernel back-ends of the same arguments, each with its share of the node; over the
    nodes of a multi-node allocation, N servers in job steps (``_step_replicas``)."""
    if prep.plan.nodes > 1:
        return _step_replicas(prep)
    gpu_ids = visible_gpus() if not prep.cpu_build else []
    memory = getattr(args, "gpu_memory_utilization", None)
    layout = replica_layout(prep.plan, cores=sorted(os.sched_getaffinity(0)), gpu_ids=gpu_ids, memory=memory)
    members = []
    for k, replica in enumerate(layout):
        own = copy.deepcopy(args)
        if replica.memory_share is not None:  # replicas sharing a card share what one engine would take
            own.gpu_memory_utilization = replica.memory_share
        members.append(LocalBackend(own, prep.key, logs.new_log_path(f"{prep.name}-{k + 1}"),
                                    plan=prep.plan.as_dict()))
    return ReplicasBackend(members, [r.env for r in layout], prep.key, members[0].log_path,
                           plan=prep.plan.as_dict(), places=[r.place for r in layout])


def _step_replicas(prep: Prepared) -> ReplicasBackend:
    """``--replicas N`` in a multi-node allocation: each replica a ``vllm serve`` in a job step on its node
    (``backends/step.py``), spread over the nodes (``cluster/plan.replica_nodes``), this node first."""
    alloc = prep.allocation
    target, flags = launch.server_flags(prep, _without_loras(prep.flags))  # adapters: added once it serves
    for name, value in (("tensor_parallel_size", prep.plan.tensor_parallel_size), ("pipeline_parallel_size", 1)):
        flag = "--" + name.replace("_", "-")
        if name not in prep.explicit and flag not in flags:  # the plan's, said: the step's server plans no more
            flags += [flag, str(value)]
    cpus = dict(zip(alloc.nodes, alloc.cpus_per_node)) if len(alloc.cpus_per_node) == len(alloc.nodes) else {}
    tp = prep.plan.tensor_parallel_size
    members, places, together = [], [], {}
    for k, (node, j, count) in enumerate(replica_nodes(prep.plan.replicas, alloc.nodes, alloc.node_name)):
        shares_cards = alloc.gpus_per_node and count * tp > alloc.gpus_per_node  # then one after another
        together.setdefault(node if shares_cards else k, []).append(k)
        step = Step(target, flags, node=node, share=f"{j}/{count}/{tp}", job_id=str(alloc.job_id),
                    cpus=cpus.get(node), env=prep.env)
        members.append(ServerBackend("", None, model=prep.model, launcher=step))
        places.append(node if count == 1 else f"{node} #{j + 1}")
    return ReplicasBackend(members, [{}] * len(members), prep.key, "", plan=prep.plan.as_dict(), places=places,
                           how="job steps on the allocation's nodes", start_groups=list(together.values()))


def _without_loras(flags: list[str]) -> list[str]:
    """``flags`` less ``--lora-modules`` and its values (the loader adds adapters once the engine serves)."""
    out, skipping = [], False
    for word in flags:
        if word == "--lora-modules" or word.startswith("--lora-modules="):
            skipping = word == "--lora-modules"
            continue
        if skipping and not word.startswith("-"):
            continue
        skipping = False
        out.append(word)
    return out


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (or 0..N-1)."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is not None and spec.strip():
        return [t.strip() for t in spec.split(",") if t.strip()]
    return [str(i) for i in range(vllm_import.vllm_api(None).device_count())]


#: The engines of this kernel that run on a Ray cluster, and that cluster.
_ray_users: dict[Engine, object] = {}


def _stop_ray_when_unused(cluster, unloaded: Engine | None = None) -> None:
    """After an engine on ``cluster`` unloads: stop the cluster if we started it, unless another engine still
    uses one, or the user brought it up with ``%vllm_cluster --up`` (it then stays, its GPUs back with Ray,
    until --down)."""
    _ray_users.pop(unloaded, None)
    current = ray_cluster.current()
    if current is not cluster or not current.owned or current.kept:
        return
    if not _ray_users:
        ray_cluster.down()


# ------------------------------------------------------------------ reading the line
def _glue(argv: list[str], flag: str) -> list[str]:
    """``FLAG VALUE`` as ``FLAG=VALUE``, for a value that looks like a flag itself (``--slurm "-t 5"``)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            out.append(f"{flag}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="%vllm_load", add_help=False, allow_abbrev=False, exit_on_error=False,
                                usage="%%vllm_load [MODEL] [engine flags] [--name N] [--dry-run] "
                                      "[--server [--host H] [--port P] | --attach URL | --slurm 'OPTIONS' "
                                      "[--chain N] [--no-wait]] [--api-key-file F]")
    ours = p.add_argument_group("vllm-notebook")
    ours.add_argument("--name", default="default", help="engine name (several can coexist)")
    ours.add_argument("--dry-run", action="store_true", help="show what would start; start nothing")
    ours.add_argument("--ray-address", help="use this Ray cluster (multi-node) instead of starting one")
    ours.add_argument("--server", action="store_true",
                      help="run the engine as a vLLM server that outlives the kernel (reattached on reload)")
    ours.add_argument("--host", help="with --server: listen on this address (default 127.0.0.1, this node only)")
    ours.add_argument("--port", type=int, help="with --server: listen on this port (default: a free one)")
    ours.add_argument("--attach", metavar="URL", help="use a running OpenAI-compatible vLLM server")
    ours.add_argument("--api-key-file", metavar="FILE", help="the server's API key, in a file only you can read")
    ours.add_argument("--slurm", metavar="'SBATCH OPTIONS'",
                      help="run the engine as a server in a Slurm batch job (from a notebook with no GPU); "
                           "returns at once, requests wait for the job")
    ours.add_argument("--chain", type=int, default=0, metavar="N",
                      help="with --slurm: N successor jobs, each starting before the previous one's walltime ends")
    ours.add_argument("--no-wait", action="store_true",
                      help="with --slurm: requests before the job is ready fail at once instead of waiting")
    ours.add_argument("--replicas", type=_replicas_value, default=1, metavar="N|auto",
                      help="N engines of the same model and flags as one (data parallel): a batch is spread over "
                           "them; each gets its own GPUs (--tensor-parallel-size each, else one; more replicas "
                           "than GPUs share them) or, on the CPU build, its own cores. auto: the smallest "
                           "tensor-parallel size that holds the model, over every GPU (--dry-run shows the "
                           "arithmetic)")
    ours.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


class _Unset(list):
    """A namespace value that no flag set: a list, so that an ``append`` action can copy and extend it, and equal
    to anything, so that vLLM's parser (which warns of a deprecated flag whose value is not its default) is quiet."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = None


def _given(parser: argparse.ArgumentParser, words: list[str], ns: argparse.Namespace) -> set[str]:
    """The destinations that ``words`` set, a value equal to the default included (``-pp 1`` in a two-node
    allocation means one node): parsed again into a namespace whose every value is a marker, which argparse
    keeps where no flag writes (it fills in a default only where the namespace has no value)."""
    unset = _Unset()
    marked = parser.parse_args(words, namespace=argparse.Namespace(**dict.fromkeys(vars(ns), unset)))
    return {k for k, v in vars(marked).items() if v is not unset}


def _replicas_value(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of engines, or auto (not {text!r})") from None


def _import_line(enabled: bool):
    """A progress line for vLLM's first import in this process (~10 s, silent before)."""
    line = _load_line(enabled)

    def waiting(seconds: float, done: bool) -> None:
        if done:
            line.notes["import"] = seconds
            line.update(f"vllm-notebook: vLLM and torch imported in {seconds:.1f} s (once per kernel)")
        else:
            line.update(f"vllm-notebook: importing vLLM and torch (once per kernel) … {seconds:.0f} s", key="import")
    return waiting


def _import_note(line: LiveLine) -> str:
    seconds = line.notes.get("import")
    return f" (importing vLLM and torch: {seconds:.1f} s, once per kernel)" if seconds and seconds >= 0.5 else ""


def _resolve_early(rest: list[str]) -> tuple[tuple, str] | None:
    """Resolve the model named on the line (first, or ``--model``) before vLLM is imported: a missing model
    or a typo in its path is told in a second, not after 10 s of importing vLLM and torch."""
    if not rest or (rest[0].startswith("-") and not any(t == "--model" or t.startswith("--model=") for t in rest)):
        return None  # the model comes from elsewhere (the default, or a --config file): vLLM's parser finds it
    model, flags = _split_model(rest, "")
    if not model or any(t == "--config" or t.startswith("--config=") for t in flags):
        return None  # a --config file can set --revision or --download-dir too: vLLM's parser reads it first
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--revision")
    p.add_argument("--download-dir", "--download_dir", dest="download_dir")
    try:
        found, _ = p.parse_known_args(flags)
    except argparse.ArgumentError:
        return None  # vLLM's parser will say what is wrong
    where = (model, found.revision, found.download_dir)
    return where, resolve.resolve(*where)


def _check_loras(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """``--lora-modules`` as (name, path) pairs, each checked now: before the engine spends a minute starting."""
    loras = lora.parse_modules(getattr(ns, "lora_modules", None))
    if loras and not getattr(ns, "enable_lora", False):
        raise UsageError("%vllm_load: --lora-modules needs --enable-lora")
    names = [n for n, _ in loras]
    if len(set(names)) < len(names):
        raise UsageError(f"%vllm_load: an adapter name is given twice: {', '.join(names)}")
    for name, path in loras:
        lora.check(name, path, getattr(ns, "max_lora_rank", None))
    return loras


_NO_TOKEN = ("%vllm_load: no token on the line; set HF_TOKEN in the environment or run "
             "`hf auth login` once (then --hf-token alone uses the stored token)")
_NO_KEY = ("%vllm_load: put the key in a file and pass --api-key-file FILE "
           "(a key on the command line shows in `ps` and in the notebook)")


def _refuse_secret_words(words: list[str]) -> None:
    """Secrets never travel as flags: they would show in ``ps``, logs, dry runs and the server registry."""
    for i, word in enumerate(words):
        name = word.split("=", 1)[0].replace("_", "-")
        has_value = "=" in word or (i + 1 < len(words) and not words[i + 1].startswith("-"))
        value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if has_value else "")
        if name == "--api-key":
            raise SecretOnLineError(_NO_KEY, value)
        if name == "--hf-token" and has_value:
            raise SecretOnLineError(_NO_TOKEN, value)


def _refuse_secrets(ns: argparse.Namespace) -> None:
    """The same for what a ``--config`` file (or keyword arguments) set."""
    if isinstance(getattr(ns, "hf_token", None), str):
        raise UsageError(_NO_TOKEN)
    if getattr(ns, "api_key", None):
        raise UsageError(_NO_KEY)


def _split_model(rest: list[str], default_model: str) -> tuple[str | None, list[str]]:
    """The model and the other flags, without vLLM's parser (for the reattach fast path)."""
    if rest and not rest[0].startswith("-"):
        return rest[0], rest[1:]
    for i, t in enumerate(rest):
        if t == "--model" and i + 1 < len(rest):
            return rest[i + 1], rest[:i] + rest[i + 2:]
        if t.startswith("--model="):
            return t.split("=", 1)[1], rest[:i] + rest[i + 1:]
    return default_model or None, list(rest)


def _without(rest: list[str], model_tag: str | None) -> list[str]:
    """The flags of ``rest`` without the model (positional or ``--model``), as ``_split_model`` gives them."""
    out = list(rest)
    if model_tag and model_tag in out:
        out.remove(model_tag)
        return out
    return _split_model(out, "")[1] if any(t == "--model" or t.startswith("--model=") for t in out) else out


def _explain(message: str, argv: list[str], *parsers) -> str:
    hint = "see %vllm_load --help for every flag"
    if "unrecognized arguments" in message:
        flags = [s.split("=")[0] for s in argv if s.startswith("--")]
        known = [o for p in parsers for a in p._actions for o in a.option_strings]
        for flag in flags:
            if flag not in known:
                near = difflib.get_close_matches(flag, known, n=1)
                if near:
                    return f"%vllm_load: unknown flag {flag} (did you mean {near[0]}?); {hint}"
                return f"%vllm_load: unknown flag {flag}; {hint}"
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) > 1:  # pydantic: "argument --x: 1 validation error for X", then "Value error, WHY [type=...]"
        why = logs.pydantic_detail(lines[1]).removeprefix("invalid engine arguments: ")
        lines = [f"{lines[0].split(':')[0]}: {why}" if why else lines[0]]
    return f"%vllm_load: {lines[0] if lines else message}; {hint}"


def summary(eng) -> str:
    f = eng.facts
    each = " each" if f.get("replicas") else ""
    return (f"{f['model']} · {f['dtype']} · max_model_len {f['max_model_len']} · "
            + (f"{f['replicas']} replicas · " if f.get("replicas") else "")
            + f"TP {f['tensor_parallel_size']} / PP {f['pipeline_parallel_size']}{each} · {f['device']} · "
            f"KV cache {f['kv_cache_tokens']:,} tokens{each}")
