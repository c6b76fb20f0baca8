"""Engines: ``%vllm_load``, ``%vllm_unload``, ``%vllm_sleep``, ``%vllm_wake``, ``%vllm_status``, ``%vllm_logs`` and
``%vllm_panel``. Each parses its line and calls the Python API (``loader``, ``Engine``)."""

from __future__ import annotations

import os

from IPython.core.magic import line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from .. import logs
from ..engine.registry import engines, get_engine, unload_all
from ..errors import SecretOnLineError, UsageError
from ..loader import LoadPlan, load_from_argv
from ..ui.status import Status
from .args import engine_name, forget_secret, line_words, parse_line
from .settings import Topic


@magics_class
class EngineMagics(Topic):
    """%vllm_load, %vllm_unload, %vllm_sleep, %vllm_wake, %vllm_status, %vllm_logs, %vllm_panel."""

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
        default = self.settings.default_model or os.environ.get("VLLM_NOTEBOOK_MODEL", "")
        try:
            result = load_from_argv(argv, default_model=default)
        except SecretOnLineError as exc:
            forget_secret(self.shell, exc.secret)
            raise SecretOnLineError(f"{exc}. The value was removed from IPython's history; it is still in this "
                                    "cell: delete it there, and revoke it (anyone who saw the notebook has it)",
                                    exc.secret) from None
        if result is not None and not isinstance(result, LoadPlan):  # an engine, not a dry run's plan
            result.announced_in = self.shell.execution_count
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
    @engine_name
    @no_var_expand
    @line_magic
    def vllm_sleep(self, line: str):
        """Free the GPU and keep the engine (loaded with --enable-sleep-mode); %vllm_wake brings it back."""
        args = parse_line(self.vllm_sleep, line, self.shell.user_ns)
        print(self._engine(args.name).sleep(args.level))

    @magic_arguments()
    @engine_name
    @no_var_expand
    @line_magic
    def vllm_wake(self, line: str):
        """Wake an engine put to sleep with %vllm_sleep."""
        args = parse_line(self.vllm_wake, line, self.shell.user_ns)
        print(self._engine(args.name).wake())

    @magic_arguments()
    @argument("--all", action="store_true", help="every field (parallel sizes, dtype, LoRA, requests, tokens, "
              "plan, log), not only the compact table")
    @no_var_expand
    @line_magic
    def vllm_status(self, line: str):
        """Loaded engines, one compact row each: model, where, state, tokens/s, KV-cache use (--all: every field;
        .to_pandas() on the result gives them as a DataFrame)."""
        args = parse_line(self.vllm_status, line, self.shell.user_ns)
        return Status.collect(all=args.all)

    @magic_arguments()
    @argument("-n", type=int, default=40, help="lines to show (default 40)")
    @engine_name
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

    @magic_arguments()
    @engine_name
    @no_var_expand
    @line_magic
    def vllm_panel(self, line: str):
        """A prompt panel (ipywidgets) over a loaded engine; generation runs in the background."""
        from ..ui.panel import PromptPanel

        args = parse_line(self.vllm_panel, line, self.shell.user_ns)
        if args.name:
            self._engine(args.name)  # a one-line error now if there is no such engine
        return PromptPanel(args.name, max_updates_per_second=self.settings.max_updates_per_second)
