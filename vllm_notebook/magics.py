"""IPython magics: parse the line, call the Python API, show the result.

Importing this module imports neither vLLM nor torch.
"""

from __future__ import annotations

import os

from IPython.core.magic import (
    Magics,
    cell_magic,
    line_cell_magic,
    line_magic,
    magics_class,
    no_var_expand,
)
from IPython.core.magic_arguments import argument, argument_group, magic_arguments
from traitlets import Bool, Float, Int, Unicode, observe

from . import logs, private
from .cluster import ray as ray_cluster
from .cluster.allocation import Allocation
from .doctor import diagnose
from .engine import compare, journal, vllm_import
from .engine.base import Engine
from .engine.prompts import interpolate, prompts_from_rows, prompts_from_value, split
from .engine.registry import engines, get_engine, shutdown, unload_all
from .engine.sampling import parse_schema
from .errors import SecretOnLineError, UsageError
from .loader import load_from_argv
from .magic_args import forget_secret, line_words, parse_line, value_of
from .models.hub import models_table
from .server import process as server_process
from .server import registry as servers
from .server import slurm_job
from .task_magics import TaskMagics
from .ui.cluster_view import ClusterView
from .ui.display import TextStream
from .ui.status import Status


def _sampling_flags(func):
    """The sampling, structured-output and display flags shared by %%generate and %%chat."""
    decorators = [
        argument_group("sampling"),
        argument("--max-tokens", type=int, help="most tokens to generate (default: %%config VllmMagics.max_tokens)"),
        argument("--temperature", type=float), argument("--top-p", type=float), argument("--top-k", type=int),
        argument("--min-p", type=float), argument("--seed", type=int),
        argument("-n", type=int, help="completions per prompt"),
        argument("--stop", action="append", help="stop string (repeatable)"),
        argument("--presence-penalty", type=float), argument("--frequency-penalty", type=float),
        argument("--repetition-penalty", type=float),
        argument("--logprobs", type=int, metavar="N", help="return the top-N logprobs of each token"),
        argument("--ignore-eos", action="store_true", help="keep going after the end-of-sequence token"),
        argument("--params", metavar="VAR", help="a dict or SamplingParams variable; flags override it"),
        argument_group("structured output"),
        argument("--json-schema", metavar="SCHEMA", help="inline JSON, a file, or a variable name"),
        argument("--regex"),
        argument("--choice", action="append", help="allowed answer (repeatable)"),
        argument_group("prompt and display"),
        argument("--name", help="engine name (default: the only engine, or 'default')"),
        argument("--lora", metavar="ADAPTER", help="generate with this LoRA adapter (see %%vllm_lora)"),
        argument("--system", help="system message (chat)"),
        argument("--no-interpolate", action="store_true", help="leave {name} in the prompt as written"),
        argument("--format", choices=["auto", "markdown", "text", "json"], default="auto"),
        argument("--no-stream", action="store_true", help="show the result only at the end"),
        argument("--out", metavar="VAR", help="also store the Generation in this variable"),
        argument_group("journal"),
        argument("--fresh", action="store_true", help="generate every prompt again, even those the journal holds"),
        argument("--no-journal", action="store_true", help="neither read nor write the results journal"),
    ]
    for deco in reversed(decorators):
        func = deco(func)
    return func


_engine_name = argument("--name", help="engine (default: the only one, or 'default')")

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "regex", "choice")


@magics_class
class VllmMagics(Magics):
    """Magics for vLLM: %vllm_load, %%generate, %%chat, %vllm_history, %vllm_status, %vllm_unload, %vllm_logs, %vllm_servers,
    %vllm_jobs, %vllm_models, %vllm_doctor, %vllm_cluster, %vllm_panel, %vllm_sleep, %vllm_wake."""

    default_model = Unicode("", help="Model used by %vllm_load without one ($VLLM_NOTEBOOK_MODEL).").tag(config=True)
    max_tokens = Int(256, help="Default --max-tokens of %%generate and %%chat.").tag(config=True)
    max_updates_per_second = Float(20.0, help="Most display updates a second while streaming.").tag(config=True)
    stream = Bool(True, help="Stream single prompts into the cell as tokens arrive.").tag(config=True)
    journal = Bool(True, help="Append every result to the results journal; re-run batches resume from it "
                   "($VLLM_NOTEBOOK_JOURNAL=off turns it off by default).").tag(config=True)
    journal_path = Unicode("", help="The journal's file (default: beside the notebook, "
                           "NAME.vllm-journal.jsonl).").tag(config=True)

    preload = Bool(False, help="Import vLLM and torch in the background from %load_ext on, so the first "
                   "%vllm_load starts ~10 s sooner ($VLLM_NOTEBOOK_PRELOAD=1).").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        if self.preload or vllm_import.preload_by_environment():
            vllm_import.preload()
        self.conversation: list[dict] = []
        session = (shell.user_ns.get("__session__") if shell is not None else None) or ""
        journal.configure(notebook=str(session))
        if not journal.enabled_by_environment():
            self.journal = False
        self._journal_changed({"new": self.journal})
        self._journal_path_changed({"new": self.journal_path})

    @observe("preload")
    def _preload_changed(self, change):
        if change["new"]:
            vllm_import.preload()

    @observe("journal")
    def _journal_changed(self, change):
        journal.configure(enabled=change["new"])

    @observe("journal_path")
    def _journal_path_changed(self, change):
        journal.configure(path=change["new"])

    # ------------------------------------------------------------ engines
    @no_var_expand
    @line_magic
    def vllm_load(self, line: str):
        """Start a vLLM engine: %vllm_load [MODEL] [engine flags] [--name NAME] [--dry-run] [--server | --attach URL]

        Every engine flag of `vllm serve` works with the same spelling
        (--max-model-len, --tensor-parallel-size, --dtype, --enforce-eager, ...);
        `%vllm_load --help` lists them. MODEL defaults to
        `%config VllmMagics.default_model` or $VLLM_NOTEBOOK_MODEL.
        Re-running with the same model and flags reuses the running engine;
        with others it replaces it. `llm = %vllm_load MODEL` binds the Engine.

        --server runs the engine as a `vllm serve` process that survives kernel
        restarts (127.0.0.1, a free port, a random API key kept in a 0600 file);
        the same line in a restarted kernel attaches to it in well under a second.
        --attach URL [--api-key-file FILE] uses any OpenAI-compatible vLLM server.
        """
        argv = line_words("vllm_load", line, self.shell.user_ns)
        default = self.default_model or os.environ.get("VLLM_NOTEBOOK_MODEL", "")
        try:
            result = load_from_argv(argv, default_model=default)
        except SecretOnLineError as exc:
            forget_secret(self.shell, exc.secret)
            raise SecretOnLineError(f"{exc}. The value was removed from IPython's history; it is still in this "
                                    "cell: delete it there, and revoke it (anyone who saw the notebook has it)",
                                    exc.secret) from None
        if isinstance(result, Engine):
            result._announced_in = self.shell.execution_count
        return result

    @magic_arguments()
    @argument("--name", help="engine to unload (default: the only one, or 'default')")
    @argument("--all", action="store_true", help="unload every engine")
    @no_var_expand
    @line_magic
    def vllm_unload(self, line: str):
        """Stop an engine and free its memory and processes."""
        args = parse_line(self.vllm_unload, line, self.shell.user_ns)
        if args.all:
            names = sorted(engines())
            unload_all()
            print(f"unloaded {', '.join(names) if names else 'nothing (no engine was loaded)'}")
            return
        eng = get_engine(args.name)
        message = eng.unload()
        print(message or f"unloaded engine '{eng.name}' ({eng.model})")

    @magic_arguments()
    @argument("--level", type=int, default=1, choices=[1, 2],
              help="1: weights to CPU memory, KV cache dropped (default); 2: weights dropped too, reloaded on wake")
    @_engine_name
    @no_var_expand
    @line_magic
    def vllm_sleep(self, line: str):
        """Free the GPU and keep the engine (loaded with --enable-sleep-mode); %vllm_wake brings it back."""
        args = parse_line(self.vllm_sleep, line, self.shell.user_ns)
        print(self._engine(args.name).sleep(args.level))

    @magic_arguments()
    @_engine_name
    @no_var_expand
    @line_magic
    def vllm_wake(self, line: str):
        """Wake an engine put to sleep with %vllm_sleep."""
        args = parse_line(self.vllm_wake, line, self.shell.user_ns)
        print(self._engine(args.name).wake())

    @magic_arguments()
    @argument("--stop", metavar="ID", help="stop this registered server (id, port, URL or model)")
    @no_var_expand
    @line_magic
    def vllm_servers(self, line: str):
        """vLLM servers started with %vllm_load --server (by any kernel of yours): model, URL, uptime, job."""
        args = parse_line(self.vllm_servers, line, self.shell.user_ns)
        if args.stop:
            rec = servers.lookup(args.stop)
            for eng in list(engines().values()):
                if eng.record is not None and eng.record.id == rec.id:
                    eng.detach()
            server_process.stop(rec)
            print(f"stopped the server {rec.id} at {rec.url} ({rec.model})")
            return None
        return servers.listing()

    @magic_arguments()
    @argument("--cancel", metavar="WHAT", help="cancel this submission (engine name, job id, record or model)")
    @no_var_expand
    @line_magic
    def vllm_jobs(self, line: str):
        """Engines submitted as Slurm jobs (%vllm_load --slurm), by any kernel of yours: state, node, time left."""
        args = parse_line(self.vllm_jobs, line, self.shell.user_ns)
        if args.cancel:
            rec = slurm_job.lookup(args.cancel)
            for eng in list(engines().values()):
                if isinstance(eng, slurm_job.SlurmEngine) and eng.job.id == rec.id:
                    eng.detach()
            print(slurm_job.cancel(rec))
            return None
        return slurm_job.listing()

    @magic_arguments()
    @argument("-n", type=int, metavar="N", help="only the last N results")
    @argument("--path", metavar="FILE", help="another journal file")
    @no_var_expand
    @line_magic
    def vllm_history(self, line: str):
        """The results journal as a DataFrame: every result, with its run's model, revision and sampling."""
        args = parse_line(self.vllm_history, line, self.shell.user_ns)
        df = journal.history(args.path)
        return df.tail(args.n) if args.n else df

    @no_var_expand
    @line_magic
    def vllm_status(self, line: str):
        """Loaded engines: model, parallel sizes, devices, KV cache, requests, tokens, memory."""
        if line.strip():
            raise UsageError("%vllm_status takes no arguments")
        return Status.collect()

    @magic_arguments()
    @_engine_name
    @no_var_expand
    @line_magic
    def vllm_panel(self, line: str):
        """A prompt panel (ipywidgets) over a loaded engine; generation runs in the background."""
        from .ui.panel import PromptPanel

        args = parse_line(self.vllm_panel, line, self.shell.user_ns)
        if args.name:
            self._engine(args.name)  # a one-line error now if there is no such engine
        return PromptPanel(args.name, max_updates_per_second=self.max_updates_per_second)

    @magic_arguments()
    @argument("--download-dir", help="cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub)")
    @no_var_expand
    @line_magic
    def vllm_models(self, line: str):
        """Models in the Hugging Face cache: size, revision, and whether this vLLM supports them."""
        args = parse_line(self.vllm_models, line, self.shell.user_ns)
        return models_table(args.download_dir)

    @magic_arguments()
    @argument("--no-hub", action="store_true", help="do not check whether the Hub is reachable")
    @no_var_expand
    @line_magic
    def vllm_doctor(self, line: str):
        """This environment on one screen (vLLM, GPUs, Slurm, Ray, HF cache, offline), with pitfalls and fixes."""
        args = parse_line(self.vllm_doctor, line, self.shell.user_ns)
        return diagnose(in_kernel=True, check_hub=not args.no_hub)

    @magic_arguments()
    @argument("--up", action="store_true", help="start the Ray cluster across the allocation (or attach)")
    @argument("--down", action="store_true", help="stop the Ray cluster we started; detach from one we did not")
    @argument("--ray-address", help="attach to this Ray cluster instead of starting one")
    @argument("--timeout", type=float, default=180, help="seconds to wait for every node to join")
    @no_var_expand
    @line_magic
    def vllm_cluster(self, line: str):
        """The Slurm allocation, the plans of loaded engines and the Ray cluster; --up / --down manage Ray."""
        args = parse_line(self.vllm_cluster, line, self.shell.user_ns)
        if args.up and args.down:
            raise UsageError("%vllm_cluster: --up or --down, not both")
        if args.down:
            print(ray_cluster.down())
            return None
        alloc = Allocation.from_env()
        if args.up:
            ray_cluster.up(alloc, args.ray_address, timeout=args.timeout, keep=True)
        return ClusterView.collect(alloc, ray_cluster.current())

    @magic_arguments()
    @argument("-n", type=int, default=40, help="lines to show (default 40)")
    @_engine_name
    @no_var_expand
    @line_magic
    def vllm_logs(self, line: str):
        """Show the end of an engine's log file (vLLM's own output goes there)."""
        args = parse_line(self.vllm_logs, line, self.shell.user_ns)
        if args.n <= 0:
            raise UsageError("-n must be a positive number of lines")
        eng = get_engine(args.name)
        print(f"==> {eng.log_path} <==")
        print("\n".join(logs.tail(eng.log_path, args.n)))

    # ------------------------------------------------------------ generation
    @magic_arguments()
    @argument("-i", "--input", metavar="VAR", help="(line magic) a str or list of str: a variable or an "
              "expression such as df.prompt")
    @argument("--chat", action="store_true", help="apply the model's chat template")
    @argument("--split", choices=["lines", "blank"], help="one prompt per line, or per blank-line block")
    @argument("--template", metavar="TEXT", help="with -i DATAFRAME: one prompt per row, TEXT with {column} "
              "filled from the row, e.g. \"Q: {question}\\nA:\"")
    @argument("--out-col", metavar="COLUMN", help="with -i DATAFRAME: put each row's text in this column")
    @argument("--compare", metavar="SETTINGS", action="append", help="a column of a side-by-side comparison: "
              "NAME=VALUE sampling settings (or system='...'); repeat for each column. --name a,b compares engines")
    @_sampling_flags
    @no_var_expand
    @line_cell_magic
    def generate(self, line: str, cell: str | None = None):
        """Generate from the cell body (or -i VAR): streamed for one prompt, batched for many."""
        args = parse_line(self.generate, line, self.shell.user_ns)
        ns = self.shell.user_ns
        if cell is None:
            if not args.input:
                raise UsageError("%generate needs -i VAR (a str or list of str); use %%generate for a cell prompt")
            value = self._value(args.input)
            if args.template is not None:
                template = args.template.replace("\\n", "\n").replace("\\t", "\t")  # as typed on the line
                prompts = prompts_from_rows(value, template, args.input)
            else:
                prompts = prompts_from_value(value, args.input)
            if args.out_col and not (hasattr(value, "columns") and hasattr(value, "__setitem__")):
                raise UsageError(f"--out-col needs -i to name a DataFrame; {args.input} is a {type(value).__name__}")
        else:
            if args.input or args.template or args.out_col:
                raise UsageError("-i, --template and --out-col are for the line magic %generate; "
                                 "%%generate takes the cell as the prompt")
            text = cell if args.no_interpolate else interpolate(cell, ns)
            prompts = split(text.strip("\n"), args.split)
        if not prompts or not any(p.strip() for p in prompts):
            raise UsageError("the prompt is empty: write it in the cell body")
        if args.split is None and cell is not None:
            prompts = [prompts[0].strip()]
        names = [n.strip() for n in args.name.split(",") if n.strip()] if args.name else None
        if args.compare or (names and len(names) > 1):
            if args.out_col:
                raise UsageError("--out-col takes one column of texts; a comparison has several (use .to_pandas())")
            return self._compare(prompts, names, args)
        engine = self._engine(args.name)
        params = self._params(args, engine)
        if args.chat or args.system:
            prompts = [engine.chat_prompt(_messages(args.system, [], p)) for p in prompts]
        if cell is None and args.out_col and params_n(params) > 1:
            raise UsageError(f"--out-col takes one text per row, not -n {params_n(params)}")
        gen = self._run(engine, prompts, params, args)
        if cell is None and args.out_col:
            value[args.out_col] = gen.first_texts(missing=None)
        return gen

    @magic_arguments()
    @_sampling_flags
    @no_var_expand
    @cell_magic
    def chat(self, line: str, cell: str):
        """A conversation: each %%chat cell is a user turn; earlier turns are remembered (%chat_reset forgets)."""
        args = parse_line(self.chat, line, self.shell.user_ns)
        text = (cell if args.no_interpolate else interpolate(cell, self.shell.user_ns)).strip()
        if not text:
            raise UsageError("the message is empty: write it in the cell body")
        engine = self._engine(args.name)
        params = self._params(args, engine)
        if args.system is not None:
            self.conversation = [m for m in self.conversation if m["role"] != "system"]
            self.conversation.insert(0, {"role": "system", "content": args.system})
        messages = self.conversation + [{"role": "user", "content": text}]
        gen = self._run(engine, [engine.chat_prompt(messages)], params, args)
        if not gen.interrupted:
            self.conversation = messages + [{"role": "assistant", "content": gen.text}]
        return gen

    @no_var_expand
    @line_magic
    def chat_history(self, line: str):
        """The %%chat conversation so far: a list of role/content messages (a copy)."""
        return [dict(m) for m in self.conversation]

    @no_var_expand
    @line_magic
    def chat_reset(self, line: str):
        """Forget the %%chat conversation."""
        n = sum(1 for m in self.conversation if m["role"] == "user")
        self.conversation = []
        print(f"conversation cleared ({n} turn(s) forgotten)")

    # ------------------------------------------------------------ helpers
    def _value(self, expr: str):
        return value_of(self.shell, expr)

    def _engine(self, name):
        return get_engine(name)

    def _compare(self, prompts, names, args):
        from tqdm.auto import tqdm

        base, flags = self._sampling(args)
        cols = compare.columns(names, args.compare)
        bar = tqdm(total=len(prompts) * len(cols), desc="comparing", unit="result", leave=False, delay=0.5)
        try:
            result = compare.compare(prompts, names, args.compare, params=base, chat=args.chat, system=args.system,
                                     lora=args.lora,
                                     on_output=lambda label, i, out: bar.update(1) if out.finished else None,
                                     resume=False if args.fresh else None, journal_results=not args.no_journal,
                                     **flags)
        finally:
            bar.close()
        if result.interrupted:
            print("interrupted: every column was stopped; the table holds what was made")
        if args.out:
            self.shell.user_ns[args.out] = result
        return result

    def _params(self, args, engine):
        return engine.params(*self._sampling(args))

    def _sampling(self, args) -> tuple:
        """The ``--params`` base and the sampling flags given on the line (``None``: not given)."""
        ns = self.shell.user_ns
        base = None
        if args.params:
            if args.params not in ns:
                raise UsageError(f"--params: no variable named {args.params!r}")
            base = ns[args.params]
        flags = {k: getattr(args, k, None) for k in _SAMPLING_KEYS}
        if args.ignore_eos:
            flags["ignore_eos"] = True
        if flags["max_tokens"] is None and not (isinstance(base, dict) and "max_tokens" in base) \
                and not (base is not None and not isinstance(base, dict)):
            flags["max_tokens"] = self.max_tokens
        if args.json_schema:
            flags["json"] = parse_schema(args.json_schema, ns)
        for flag, value, least in (("--max-tokens", flags["max_tokens"], 1), ("-n", flags["n"], 1),
                                   ("--logprobs", flags["logprobs"], 0)):
            if value is not None and value < least:
                raise UsageError(f"{flag} must be >= {least}, not {value}")
        return base, flags

    def _run(self, engine, prompts, params, args):
        streaming = self.stream and not args.no_stream and len(prompts) == 1 and args.format != "json"
        view, bar = None, None
        if streaming:
            view = TextStream(self.max_updates_per_second)
            on_output = lambda i, out: view.update(out.outputs[0].text)  # noqa: E731
        else:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc=f"generating ({engine.name})", unit="prompt",
                       leave=False, delay=0.5, disable=len(prompts) == 1)
            on_output = lambda i, out: bar.update(1)  # noqa: E731
        try:
            gen = engine.run(prompts, params, stream=streaming, on_output=on_output, lora=args.lora,
                             resume=False if args.fresh else None, journal_results=not args.no_journal)
        finally:
            if bar is not None:
                bar.close()
        gen.format = args.format
        if view is not None:
            view.attach(gen)
        if gen.reused:
            print(f"{gen.reused:,} of {len(prompts):,} from the journal ({journal.default_path().name}); "
                  "--fresh generates them again")
        if gen.interrupted:
            print(f"interrupted: aborted {gen.aborted} request(s); the partial text is in the result (_)")
        if args.out:
            self.shell.user_ns[args.out] = gen
        return gen


def params_n(params) -> int:
    return int((params.get("n") if isinstance(params, dict) else getattr(params, "n", 1)) or 1)


def _messages(system: str | None, history: list[dict], user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": user}]


def register(ipython) -> None:
    """Register the magics once (loading the extension twice is harmless)."""
    if "VllmMagics" in ipython.magics_manager.registry:
        return
    private.protect_process()  # before torch or vLLM is imported: temp files, sockets and caches private
    ipython.register_magics(VllmMagics(shell=ipython))
    ipython.register_magics(TaskMagics(shell=ipython))


def unregister(ipython) -> None:
    """Undo ``register``: unload our engines and remove every magic we added."""
    shutdown()
    for cls in ("VllmMagics", "TaskMagics"):
        magics = ipython.magics_manager.registry.pop(cls, None)
        if magics is None:
            continue
        for kind, table in magics.magics.items():
            for name in table:
                ipython.magics_manager.magics[kind].pop(name, None)
        if magics in ipython.configurables:
            ipython.configurables.remove(magics)
