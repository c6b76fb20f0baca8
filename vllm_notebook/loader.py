"""``load``, ``attach`` and ``%vllm_load``'s parser: from a line or a call to a running engine.

One pipeline under every path: the model is resolved, vLLM's own parser reads the
flags, ``prepare`` plans and sets the environment, then a back-end starts:
``LocalEngine`` in this kernel, or a server (``server/launch.py``). The reattach
fast path finds a running server from the line alone, without importing vLLM.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import time
from typing import Any

from . import logs, prepare
from .cluster import ray as ray_cluster
from .engine import registry as engine_registry
from .engine import lora, vllm_import
from .engine.local import LocalEngine
from .errors import SecretOnLineError, UsageError, VllmNotebookError
from .models import resolve
from .prepare import LoadPlan, Prepared, engine_flags, scoped_env
from .server import client, launch, slurm_job
from .server import registry as servers
from .ui.display import LiveLine

__all__ = ["LoadPlan", "attach", "load", "load_from_argv", "submit"]


def load(model: str | None = None, *, name: str = "default", dry_run: bool = False,
         progress: bool = True, ray_address: str | None = None, server: bool = False,
         host: str | None = None, port: int | None = None, api_key_file: str | None = None, **engine_args: Any):
    """Start (or reuse) an engine called ``name``; keyword arguments are ``EngineArgs`` fields, and
    ``lora_modules={"name": "/adapter/folder"}`` (with ``enable_lora=True``) loads LoRA adapters with it.

    Loading the same model with the same arguments again returns the running
    engine at once; different ones unload the old engine first. With
    ``server=True`` the engine is a ``vllm serve`` process that outlives the
    kernel, and a later identical ``load`` attaches to it in a fraction of a second.
    """
    if not model:
        raise UsageError("load() needs a model: a Hugging Face id or a model folder")
    if server:
        own = {"--name": name, "--ray-address": ray_address, "--host": host, "--port": port,
               "--api-key-file": api_key_file}
        argv = [str(model), "--server", *(["--dry-run"] if dry_run else []),
                *[t for k, v in own.items() if v is not None for t in (k, str(v))], *engine_flags(engine_args)]
        return load_from_argv(argv, progress=progress)
    if host or port or api_key_file:
        raise UsageError("host, port and api_key_file are for server=True")
    _refuse_secrets(argparse.Namespace(**engine_args))
    modules = engine_args.pop("lora_modules", None) or {}
    loras = _check_loras(argparse.Namespace(
        lora_modules=[f"{k}={v}" for k, v in modules.items()] if isinstance(modules, dict) else modules,
        enable_lora=engine_args.get("enable_lora"), max_lora_rank=engine_args.get("max_lora_rank", 16)))
    path = resolve.resolve(str(model), engine_args.get("revision"), engine_args.get("download_dir"))  # before vLLM
    _vllm = vllm_import.vllm_api()
    unknown = set(engine_args) - _vllm.engine_arg_fields()
    if unknown:
        bad = sorted(unknown)[0]
        near = difflib.get_close_matches(bad, _vllm.engine_arg_fields(), n=1)
        raise UsageError(f"unknown engine argument {bad!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    args = _vllm.engine_args(model=model, **engine_args)
    prep = prepare.prepare(name, args, path, set(engine_args), gpu_count=_vllm.device_count(),
                           cpu_build=_vllm.is_cpu_build())
    return prep.dry_run() if dry_run else start_local(prep, progress, ray_address, loras)


def attach(url: str, *, name: str = "default", api_key_file: str | None = None, api_key: str | None = None,
           model: str | None = None, progress: bool = True):
    """Use a running OpenAI-compatible vLLM server as engine ``name``; it is never stopped by us.

    The key comes from ``api_key``, ``api_key_file``, ``$VLLM_API_KEY``, or (for a
    server vllm-notebook started) its key file.
    """
    url = (url if "://" in url else f"http://{url}").rstrip("/")
    if api_key is None and api_key_file:
        api_key = servers.read_key(api_key_file)
    if api_key is None:
        api_key = os.environ.get("VLLM_API_KEY")
    if api_key is None:
        known = [r for r in servers.records() if r.url == url]
        api_key = known[0].api_key() if known else None
    t0 = time.monotonic()
    eng = client.connect(name, url, api_key, model=model)
    LiveLine(enabled=progress).done(
        f"vllm-notebook: attached to {url} in {time.monotonic() - t0:.2f} s — {eng.model} "
        f"(max_model_len {eng.facts.get('max_model_len')}); %vllm_unload detaches, the server keeps running")
    return eng


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
    ours.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


def load_from_argv(argv: list[str], default_model: str = "", progress: bool = True):
    """``%vllm_load``'s parser: vLLM's own flags (of the engine, or of ``vllm serve``) plus ours."""
    own = _own_parser()
    argv = _glue(argv, "--slurm")  # its value starts with "-": argparse would read it as a flag
    try:
        ours, rest = own.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise UsageError(f"%vllm_load: {exc}; see %vllm_load --help") from None
    if ours.attach and not ours.help:
        extra = [t for t in rest if t.startswith("-")]
        if extra or ours.server or ours.dry_run:
            bad = extra[0] if extra else ("--server" if ours.server else "--dry-run")
            raise UsageError(f"%vllm_load --attach uses the server as it runs: drop {bad} "
                             "(engine flags belong on the server's command line)")
        return attach(ours.attach, name=ours.name, api_key_file=ours.api_key_file,
                      model=rest[0] if rest else None, progress=progress)
    if ours.slurm is not None and not ours.help:
        return _submit_from_argv(ours, rest, default_model, progress)
    if (ours.chain or ours.no_wait) and not ours.help:
        raise UsageError("%vllm_load: --chain and --no-wait go with --slurm 'SBATCH OPTIONS'")
    if not ours.server and not ours.help and (ours.host or ours.port or ours.api_key_file):
        raise UsageError("%vllm_load: --host, --port and --api-key-file go with --server (or --attach URL)")
    _refuse_secret_words(rest)
    if ours.server and not ours.dry_run and not ours.help:
        model, flags = _split_model(rest, default_model)
        rec = servers.find(model, servers.normalize(flags)) if model else None
        if rec is not None:  # the fast path: no vLLM import at all
            return launch.attach_record(rec, ours.name, progress)
    early = None if ours.help else _resolve_early(rest)  # a missing model fails in a second, before vLLM loads
    _vllm = vllm_import.vllm_api(_import_line(progress and not ours.help))
    if ours.server:
        parser = _vllm.serve_arg_parser("%vllm_load --server")
    else:
        parser = _vllm.engine_arg_parser("%vllm_load")
        parser.add_argument("model_tag", nargs="?", help="model folder or Hugging Face id")
        parser.add_argument("--lora-modules", nargs="+", action=_vllm.lora_parser_action(), default=None,
                            help="LoRA adapters to load with the engine: NAME=PATH ... (needs --enable-lora)")
    if ours.help:
        print(own.format_help() + "\n" + parser.format_help())
        return None
    try:
        ns = parser.parse_args(rest)
    except argparse.ArgumentError as exc:
        raise UsageError(_explain(str(exc), argv, parser, own)) from None
    except SystemExit:
        raise UsageError("invalid %vllm_load arguments; see %vllm_load --help") from None
    _refuse_secrets(ns)
    explicit = {k for k, v in vars(ns).items() if v != parser.get_default(k)} - {"model_tag"}
    model = ns.model_tag or (ns.model if "model" in explicit else None) or default_model
    if not model:
        raise UsageError("no model given: %vllm_load MODEL, or set %config VllmMagics.default_model "
                         "(or $VLLM_NOTEBOOK_MODEL)")
    ns.model = model
    explicit.add("model")
    user_flags = _without(rest, ns.model_tag)
    del ns.model_tag
    loras = _check_loras(ns) if not ours.server else []
    # Resolve before EngineArgs exists: constructing it already looks the model up.
    where = (str(model), getattr(ns, "revision", None), getattr(ns, "download_dir", None))
    path = early[1] if early is not None and early[0] == where else resolve.resolve(*where)
    try:
        args = _vllm.engine_args_from_namespace(ns)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    prep = prepare.prepare(ours.name, args, path, explicit, gpu_count=_vllm.device_count(),
                           cpu_build=_vllm.is_cpu_build())
    if ours.server:
        listen = launch.Listen(ours.host, ours.port, ours.api_key_file)
        if ours.dry_run:
            return prep.dry_run(launch.command_for(prep, user_flags, listen))
        return start_server(prep, user_flags, listen, ours.ray_address, progress)
    return prep.dry_run() if ours.dry_run else start_local(prep, progress, ours.ray_address, loras)


def start_server(prep: Prepared, user_flags: list[str], listen, ray_address: str | None, progress: bool):
    """Start (or find) the server ``prep`` describes; the engine it replaces goes first where it holds devices
    here, and is started again if the new one fails (``restored``)."""
    found = launch.alike(prep)
    if found is not None:  # the same configuration runs: attach (the old engine of this name goes as it does)
        return launch.attach_record(found, prep.name, progress)
    old = engine_registry.engines().get(prep.name)
    if old is not None and shares_devices(old):
        old.unload()
    try:
        eng = launch.start_new(prep, user_flags, listen, ray_address, progress)
    except VllmNotebookError as exc:
        if old is None or isinstance(exc, UsageError) or not shares_devices(old) or old.alive:
            raise
        raise restored(old, exc, progress) from None
    if old is not None and not shares_devices(old) and engine_registry.engines().get(prep.name) is not old:
        old.unload()  # a Slurm job's engine: it goes once its replacement serves
    return eng


def shares_devices(old) -> bool:
    """Whether an engine holds devices (or memory) here that its replacement needs, so it goes first: all but
    a Slurm job's, which runs on the job's nodes and goes once its replacement serves."""
    return getattr(old, "job", None) is None


def restored(old, exc: VllmNotebookError, progress: bool) -> VllmNotebookError:
    """The engine a failed replacement had unloaded, started again from its own flags: an in-kernel engine from
    what it was prepared from, a server we started from its record. The error to raise, saying which way it went."""
    line = LiveLine(enabled=progress)
    if getattr(old, "prepared", None) is not None:
        return restart_previous(old, exc, line)
    rec = getattr(old, "record", None)
    if rec is None or getattr(old, "job", None) is not None:  # attached only (it still runs), or a Slurm job's
        return exc
    line.update(f"vllm-notebook: the new engine failed; starting the previous server ({old.model}) again …")
    argv = [rec.model, *rec.argv, "--server", "--name", old.name]
    if rec.host not in ("", "127.0.0.1"):
        argv += ["--host", rec.host]
    try:
        load_from_argv(argv, progress=False)
    except VllmNotebookError as second:
        line.done("vllm-notebook: the previous server could not be started again either")
        return type(exc)(f"{exc}; the previous server ({old.model}) could not be started again: {second}")
    line.done(f"vllm-notebook: the previous server ({old.model}) is serving again")
    return type(exc)(f"{exc}; the previous engine '{old.name}' ({old.model}) is serving again, as a new server")


def _import_line(enabled: bool):
    """A progress line for vLLM's first import in this process (~10 s, silent before)."""
    line = LiveLine(enabled=enabled)

    def waiting(seconds: float, done: bool) -> None:
        if done:
            line.done(f"vllm-notebook: vLLM and torch imported in {seconds:.1f} s (once per kernel)")
        else:
            line.update(f"vllm-notebook: importing vLLM and torch (once per kernel) … {seconds:.0f} s", key="import")
    return waiting


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


def _submit_from_argv(ours: argparse.Namespace, rest: list[str], default_model: str, progress: bool):
    """``%vllm_load MODEL --slurm 'OPTIONS'``: check the flags here, then submit (or find the job again)."""
    if ours.server or ours.host or ours.port or ours.api_key_file:
        raise UsageError("%vllm_load --slurm runs the server in a batch job, bound to the job's node and keyed: "
                         "drop --server, --host, --port and --api-key-file")
    _refuse_secret_words(rest)
    try:
        options = shlex.split(ours.slurm)
    except ValueError as exc:
        raise UsageError(f"%vllm_load --slurm: {exc} in {ours.slurm!r}") from None
    model, flags = _split_model(rest, default_model)
    if not model:
        raise UsageError("no model given: %vllm_load MODEL --slurm 'SBATCH OPTIONS'")
    flags = servers.normalize(flags)
    found = None if ours.dry_run else slurm_job.find(model, flags, options)
    if found is not None:  # no vLLM import to find it again
        return slurm_job.start(ours.name, model, flags, options, chain=ours.chain, wait=not ours.no_wait,
                               progress=progress, found=found)
    parser = vllm_import.vllm_api().serve_arg_parser("%vllm_load --slurm")
    try:  # a typo fails now, not after the job waited in the queue
        ns = parser.parse_args([model, *flags])
    except argparse.ArgumentError as exc:
        raise UsageError(_explain(str(exc), [model, *flags], parser, _own_parser())) from None
    except SystemExit:
        raise UsageError("invalid %vllm_load arguments; see %vllm_load --help") from None
    _refuse_secrets(ns)
    path = resolve.resolve(str(model), getattr(ns, "revision", None), getattr(ns, "download_dir", None))
    prepare.check_max_model_len(ns, resolve.read_config(path))  # before the queue, and before a running engine goes
    if ours.dry_run:
        rec = slurm_job.JobRecord(id="DRY-RUN", name=ours.name, model=model, flags=flags, options=options)
        print(f"would submit: sbatch {shlex.join(options)} {rec.script}"
              + (f" (and {ours.chain} chained successors)" if ours.chain else "") + "\n")
        print(slurm_job.script_text(rec, job_name=f"vnb-{ours.name}"))
        return None
    return slurm_job.start(ours.name, model, flags, options, chain=ours.chain, wait=not ours.no_wait,
                           progress=progress)


def submit(model: str, slurm: str = "", *, name: str = "default", chain: int = 0, wait: bool = True,
           dry_run: bool = False, progress: bool = True, **engine_args: Any):
    """Run ``model`` as a vLLM server in a Slurm batch job (``slurm``: sbatch options); the handle, at once.

    The handle shows the job's state as it goes (PENDING, RUNNING, READY, FAILED); requests wait until the
    server is ready (or, with ``wait=False``, fail at once). ``chain`` successor jobs keep the model up past
    the walltime. The same call in a restarted kernel finds the job instead of submitting another.
    """
    if not model:
        raise UsageError("submit() needs a model: a Hugging Face id or a model folder")
    argv = [str(model), "--slurm", slurm, "--name", name, "--chain", str(chain), *(["--no-wait"] if not wait else []),
            *(["--dry-run"] if dry_run else []), *engine_flags(engine_args)]
    return load_from_argv(argv, progress=progress)


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


def start_local(prep: Prepared, progress: bool = True, ray_address: str | None = None,
                loras: list[tuple[str, str]] = ()) -> LocalEngine:
    """Start the prepared engine in this kernel (or reuse the running one with the same configuration);
    ``loras``: (name, path) of the LoRA adapters to load with it."""
    args = prep.args
    line = LiveLine(enabled=progress)
    t0 = time.monotonic()
    if "disable_log_stats" not in prep.explicit:
        args.disable_log_stats = True
    if prep.hub_id is not None:  # the cached snapshot: no Hub lookups, so no network needed
        args.model = prep.path
        if "tokenizer" not in prep.explicit:
            args.tokenizer = prep.path
        args.revision = args.tokenizer_revision = None
    old = engine_registry.engines().get(prep.name)
    if old is not None:
        if old.key == prep.key and old.alive:
            for name, path in loras:  # adapters added to the line since: loaded into the running engine
                if name not in old.adapters:
                    old.add_lora(name, path)
            line.done(f"vllm-notebook: engine '{prep.name}' is already running {old.model} (reused)")
            return old
        if shares_devices(old):
            line.update(f"vllm-notebook: unloading the previous '{prep.name}' engine ({old.model}) …")
            old.unload()
    try:
        eng = _start_new(prep, args, line, t0, ray_address)
    except VllmNotebookError as exc:
        if old is None or old.key == prep.key or not shares_devices(old):
            raise
        raise restored(old, exc, progress) from None
    if old is not None and not shares_devices(old):
        old.unload()  # a Slurm job's engine: it goes once its replacement serves
    for name, path in loras:
        eng.add_lora(name, path)
    line.done(f"vllm-notebook: ready in {time.monotonic() - t0:.1f} s — {summary(eng)}")
    return eng


def restart_previous(old: LocalEngine, exc: VllmNotebookError, line: LiveLine) -> VllmNotebookError:
    """A replacement that failed to start: the engine it replaced, started again from its own settings (its
    adapters too), so the kernel is left as it was. The error to raise, saying which way it went."""
    line.update(f"vllm-notebook: the new engine failed; starting the previous one ({old.model}) again …")
    try:
        again = _start_new(old.prepared, old.prepared.args, line, time.monotonic(), None)
        for adapter in list(old.adapters):
            if adapter.name != lora.BASE_NAME:
                again.add_lora(adapter.name, adapter.path)
    except VllmNotebookError as second:
        line.done("vllm-notebook: the previous engine could not be started again either")
        return type(exc)(f"{exc}; the previous engine ({old.model}) could not be started again: {second}")
    line.done(f"vllm-notebook: the previous engine is serving again — {summary(again)}")
    return type(exc)(f"{exc}; the previous engine '{old.name}' ({old.model}) is serving again")


def _start_new(prep: Prepared, args, line: LiveLine, t0: float, ray_address: str | None) -> LocalEngine:
    """Start the engine ``prep`` describes, register it and return it (one line and the error if it fails)."""
    cluster = None
    if prep.plan.needs_ray:
        line.update(f"vllm-notebook: starting the Ray cluster on {prep.allocation.num_nodes} nodes …")
        cluster = ray_cluster.up(prep.allocation, ray_address)
    eng = LocalEngine(prep.name, args, prep.key, logs.new_log_path(prep.name), plan=prep.plan.as_dict())
    eng.prepared = prep  # what it was started from: a failed replacement starts it again (restart_previous)
    eng.ray_cluster = cluster
    if cluster is not None and cluster.owned:
        eng.on_unload.append(_stop_ray_when_unused)

    def report(phase: str, elapsed: float) -> None:
        line.update(f"vllm-notebook: {phase} … {elapsed:.0f} s  ({prep.model})", key=phase)

    try:
        with scoped_env(prep.env):
            eng._start(report)
    except VllmNotebookError:
        line.done(f"vllm-notebook: failed after {time.monotonic() - t0:.0f} s")
        raise
    eng.plan["executor"] = eng.facts.get("executor", eng.plan.get("executor"))
    if prep.hub_id is not None:
        eng.facts.update(model=prep.hub_id, path=prep.path)
    engine_registry.register(eng)
    return eng


def _stop_ray_when_unused(unloaded: LocalEngine) -> None:
    """After an engine on our Ray cluster unloads: stop the cluster unless another engine still uses it, or
    the user brought it up with ``%vllm_cluster --up`` (it then stays, its GPUs back with Ray, until --down)."""
    cluster = ray_cluster.current()
    if cluster is not unloaded.ray_cluster or cluster.kept:
        return
    if not any(e.ray_cluster is not None for e in engine_registry.engines().values() if e is not unloaded):
        ray_cluster.down()


def summary(eng) -> str:
    f = eng.facts
    return (f"{f['model']} · {f['dtype']} · max_model_len {f['max_model_len']} · "
            f"TP {f['tensor_parallel_size']} / PP {f['pipeline_parallel_size']} · {f['device']} · "
            f"KV cache {f['kv_cache_tokens']:,} tokens")
