"""The magics beyond generation: ``%vllm_lora``, ``%embed`` and ``%%score``. They parse and delegate to
``Engine.add_lora`` / ``remove_lora`` / ``embed`` / ``score`` / ``score_choices`` (``engine/tasks.py``).

``%%generate --lora NAME`` lives with ``%%generate`` (``magics/generation.py``); ``--compare lora=NAME`` compares an
adapter with the base model.
"""

from __future__ import annotations

from IPython.core.magic import line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ..engine.pooling import parse_choices
from ..engine.prompts import interpolate, prompts_from_rows, prompts_from_value, split
from ..engine.registry import get_engine
from ..errors import UsageError
from ..tables import Table
from .args import parse_line, value_of
from .settings import Topic


class AdapterList(Table):
    COLUMNS = ("adapter", "rank", "folder")

    def __init__(self, engine):
        self.engine = engine

    def title(self) -> str:
        limit = self.engine.adapters.max_rank
        return f"LoRA adapters of engine '{self.engine.name}'" + (f" (--max-lora-rank {limit})" if limit else "")

    def empty(self) -> str:
        if not self.engine.adapters.enabled:
            return (f"engine '{self.engine.name}' was loaded without LoRA; reload with --enable-lora "
                    "[--lora-modules NAME=PATH ...]")
        return f"no LoRA adapters on engine '{self.engine.name}'; add one with %vllm_lora add NAME PATH"

    def rows(self) -> list[tuple]:
        return [(a.name, a.rank if a.rank is not None else "?", a.path) for a in self.engine.adapters]


@magics_class
class TaskMagics(Topic):
    """%vllm_lora (adapters), %embed (embeddings), %%score (choices by log-probability, or documents ranked)."""

    @magic_arguments()
    @argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    @argument("adapter", nargs="?", help="the adapter's name (requests use it: %%generate --lora NAME)")
    @argument("path", nargs="?", help="with add: the adapter's folder (PEFT: adapter_config.json and weights)")
    @argument("--name", help="engine (default: the only one, or 'default')")
    @no_var_expand
    @line_magic
    def vllm_lora(self, line: str):
        """LoRA adapters at run time: %vllm_lora [list] | add NAME PATH | remove NAME."""
        args = parse_line(self.vllm_lora, line, self.shell.user_ns)
        engine = get_engine(args.name)
        if args.action == "add":
            if not (args.adapter and args.path):
                raise UsageError("%vllm_lora add NAME PATH: give the adapter's name and folder")
            adapter = engine.add_lora(args.adapter, args.path)
            print(f"adapter '{adapter.name}' loaded (rank {adapter.rank or '?'}); "
                  f"use it with %%generate --lora {adapter.name}")
        elif args.action == "remove":
            if not args.adapter:
                raise UsageError("%vllm_lora remove NAME: give the adapter's name")
            engine.remove_lora(args.adapter)
            print(f"adapter '{args.adapter}' removed")
        return AdapterList(engine)

    @magic_arguments()
    @argument("-i", "--input", metavar="VAR", help="a str, a list of str, or a DataFrame with --template")
    @argument("--template", metavar="TEXT", help="with -i DATAFRAME: one text per row, {column} filled in")
    @argument("--out", metavar="VAR", help="store the array (texts × dimensions) in this variable")
    @argument("--dimensions", type=int, help="shorter embeddings (models that support it)")
    @argument("--lora", metavar="ADAPTER", help="embed with this LoRA adapter")
    @argument("--name", help="engine (default: the only one, or 'default')")
    @no_var_expand
    @line_cell_magic
    def embed(self, line: str, cell: str | None = None):
        """Embeddings as a NumPy array: %embed -i texts --out X, or %%embed with one text per line."""
        args = parse_line(self.embed, line, self.shell.user_ns)
        texts = self._texts(args, cell, "%embed")
        vectors = get_engine(args.name).embed(texts, lora=args.lora, dimensions=args.dimensions)
        if args.out:
            self.shell.user_ns[args.out] = vectors
            print(f"{args.out} = {vectors.shape[0]} embedding(s) × {vectors.shape[1]} dimensions ({vectors.dtype})")
            return None
        return vectors

    @magic_arguments()
    @argument("--choices", metavar="'A,B,C'", help="score these continuations of each prompt by log-probability")
    @argument("--documents", metavar="VAR", help="rank the documents in this variable against the cell (a query)")
    @argument("-i", "--input", metavar="VAR", help="(line magic) the prompts: a str, a list, or a DataFrame")
    @argument("--template", metavar="TEXT", help="with -i DATAFRAME: one prompt per row, {column} filled in")
    @argument("--out", metavar="VAR", help="also store the table in this variable")
    @argument("--lora", metavar="ADAPTER", help="score with this LoRA adapter")
    @argument("--name", help="engine (default: the only one, or 'default')")
    @no_var_expand
    @line_cell_magic
    def score(self, line: str, cell: str | None = None):
        """%%score --choices " A, B, C, D": the log-probability of each choice after the prompt (total and per
        token, with the best). %score -i df --template ... --choices ...: one row per question.
        %%score --documents DOCS: the documents ranked against the cell's text (a pooling engine)."""
        args = parse_line(self.score, line, self.shell.user_ns)
        if bool(args.choices) == bool(args.documents):
            raise UsageError("%score needs --choices 'A,B,...' (multiple choice) or --documents VAR (ranking)")
        engine = get_engine(args.name)
        if args.documents:
            if cell is None or not cell.strip():
                raise UsageError("%%score --documents VAR ranks them against the cell's text: write the query there")
            docs = prompts_from_value(self._value(args.documents), args.documents)
            result = engine.score(interpolate(cell, self.shell.user_ns).strip(), docs, lora=args.lora)
        else:
            if cell is not None and cell.strip():
                prompts = [interpolate(cell, self.shell.user_ns).rstrip("\n")]
            else:
                prompts = self._texts(args, None, "%score")
            result = engine.score_choices(prompts, parse_choices(args.choices), lora=args.lora)
            if result.interrupted:
                print("interrupted: the choices not scored are NaN")
        if args.out:
            self.shell.user_ns[args.out] = result
        return result

    # ------------------------------------------------------------ helpers
    def _texts(self, args, cell: str | None, name: str) -> list[str]:
        if cell is not None and cell.strip():
            if args.input:
                raise UsageError(f"{name}: -i is for the line magic; the cell holds the texts (one per line)")
            return [t for t in split(interpolate(cell, self.shell.user_ns).strip("\n"), "lines") if t.strip()]
        if not args.input:
            raise UsageError(f"{name} needs -i VAR (a str, a list of str, or a DataFrame with --template)")
        value = self._value(args.input)
        if args.template is not None:
            return prompts_from_rows(value, args.template.replace("\\n", "\n").replace("\\t", "\t"), args.input)
        return prompts_from_value(value, args.input)

    def _value(self, expr: str):
        return value_of(self.shell, expr)
