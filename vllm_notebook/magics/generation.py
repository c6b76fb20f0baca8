"""Generation: ``%%generate`` / ``%generate``, ``%%chat`` (with ``%chat_history``, ``%chat_reset``) and
``%vllm_history``. They parse, call ``Engine.run`` (or ``compare``), and stream into the cell."""

from __future__ import annotations

from IPython.core.magic import cell_magic, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, argument_group, magic_arguments

from ..engine import compare, journal
from ..engine.prompts import interpolate, prompts_from_rows, prompts_from_value, split
from ..engine.sampling import parse_schema
from ..errors import UsageError
from ..ui.display import BatchBar, TextStream
from .args import parse_line, value_of
from .settings import Topic


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


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "regex", "choice")


@magics_class
class GenerationMagics(Topic):
    """%%generate, %generate, %%chat, %chat_history, %chat_reset, %vllm_history."""

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.conversation: list[dict] = []

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
            gen.written_to = f"{args.input}[{args.out_col!r}]"
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

    # ------------------------------------------------------------ helpers
    def _value(self, expr: str):
        return value_of(self.shell, expr)

    def _compare(self, prompts, names, args):
        from tqdm.auto import tqdm

        base, flags = self._sampling(args)
        cols = compare.columns(names, args.compare)
        bar = tqdm(total=len(prompts) * len(cols), desc="comparing", unit="result", leave=False)
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
            flags["max_tokens"] = self.settings.max_tokens
        if args.json_schema:
            flags["json"] = parse_schema(args.json_schema, ns)
        for flag, value, least in (("--max-tokens", flags["max_tokens"], 1), ("-n", flags["n"], 1),
                                   ("--logprobs", flags["logprobs"], 0)):
            if value is not None and value < least:
                raise UsageError(f"{flag} must be >= {least}, not {value}")
        return base, flags

    def _run(self, engine, prompts, params, args):
        streaming = self.settings.stream and not args.no_stream and len(prompts) == 1 and args.format != "json"
        view, bar = None, None
        if streaming:
            view = TextStream(self.settings.max_updates_per_second)
            on_output = lambda i, out: view.update(out.outputs[0].text)  # noqa: E731
        elif len(prompts) > 1:
            bar = BatchBar(engine.name, len(prompts), _max_tokens(params), params_n(params))
            on_output = None
        else:
            on_output = None
        try:
            gen = engine.run(prompts, params, stream=streaming, on_output=on_output, lora=args.lora,
                             resume=False if args.fresh else None, journal_results=not args.no_journal,
                             on_progress=bar)
        finally:
            if bar is not None:
                bar.close()
        gen.format = args.format
        if view is not None:
            view.attach(gen)
        if gen.reused:
            print(f"{gen.reused:,} of {len(prompts):,} from the journal ({journal.default_path().name}); "
                  "--fresh generates them again")
        if args.out:
            self.shell.user_ns[args.out] = gen
        return gen


def _max_tokens(params) -> int | None:
    value = params.get("max_tokens") if isinstance(params, dict) else getattr(params, "max_tokens", None)
    return int(value) if value else None


def params_n(params) -> int:
    return int((params.get("n") if isinstance(params, dict) else getattr(params, "n", 1)) or 1)


def _messages(system: str | None, history: list[dict], user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": user}]
