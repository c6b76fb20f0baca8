"""Every command in README.md and docs/ runs as written (issue 29): each `vllm-notebook` line parses with the
command's own parser, each script it names exists, each magic exists and takes its flags, and each Python
block compiles once IPython has turned its magics into calls. The slow tier checks `%vllm_load`'s engine flags
with vLLM's own parser and runs README's first notebook in a real kernel."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# what the pages tell users to run that is not ours: the shell, pip, Slurm, ssh
EXTERNAL = {"source", "export", "pip", "python", "python3", "salloc", "srun", "sbatch", "ssh", "jupyter", "cd",
            "git", "hf", "module", "conda"}


def _blocks() -> list[tuple[str, str, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        out += [(page.name, m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return out


def _shell_commands() -> list[tuple[str, str]]:
    cmds = []
    for page, lang, body in _blocks():
        if lang not in ("bash", "sh"):
            continue
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                cmds += [(page, c.strip()) for c in line.split("&&")]
    return cmds


def _magic_lines() -> list[tuple[str, str]]:
    """``%magic ...`` lines of every block (fenced or inline), assignments like ``x = %magic`` included."""
    lines = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            for line in m.group(2).splitlines():
                found = re.match(r"^(?:\w+\s*=\s*)?(%%?\w+.*)$", line.strip())
                if found:
                    lines.append((page.name, found.group(1).split("  #", 1)[0].strip()))
    return lines


def _inline_magic_names() -> list[tuple[str, str]]:
    """The magics the prose names in `code` (``%vllm_*`` stands for them all)."""
    names = []
    for page in PAGES:
        for m in INLINE.finditer(FENCE.sub("", page.read_text())):
            found = re.match(r"^%%?(\w+)", m.group(1))
            if found and not m.group(1).startswith("%vllm_*"):
                names.append((page.name, found.group(1)))
    return names


@pytest.mark.parametrize("page,command", _shell_commands(), ids=lambda v: v if len(v) < 40 else v[:40])
def test_every_shell_command_runs_as_written(page, command):
    from vllm_notebook.cli import make_parser

    words = shlex.split(command)
    if words[0] == "vllm-notebook":
        make_parser().parse_args(words[1:])  # exits (SystemExit) on a flag or subcommand it does not have
    elif words[0] == "bash" or words[0].startswith(("scripts/", "./scripts/")):
        script = words[1] if words[0] == "bash" else words[0]
        assert (ROOT / script).is_file(), f"{page}: {command}: no {script}"
    elif words[0] in ("python", "python3") and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"{page}: {command}: no {words[1]}"
    else:
        assert words[0] in EXTERNAL, f"{page}: {command}: not a command the tests know"


def test_every_inline_vllm_notebook_command_names_a_real_subcommand_and_flags():
    from vllm_notebook.cli import make_parser

    def subcommand(parser, words):  # the innermost subparser the words name ("kernel install")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and words and words[0] in action.choices:
                return subcommand(action.choices[words[0]], words[1:])
        return parser

    top, bad = make_parser(), []
    for page in PAGES:
        for m in INLINE.finditer(FENCE.sub("", page.read_text())):
            words = m.group(1).replace("\\|", "|").split()
            if words[0] != "vllm-notebook" or len(words) < 2:
                continue
            parser = subcommand(top, words[1:])
            if parser is top:
                bad.append(f"{page.name}: {m.group(1)}: no subcommand {words[1]}")
                continue
            known = {o for a in parser._actions for o in a.option_strings}
            bad += [f"{page.name}: {m.group(1)}: {w}" for w in re.findall(r"--[\w-]+", m.group(1)) if w not in known]
    assert not bad, "\n".join(bad)


def test_every_magic_exists_and_takes_its_flags():
    from IPython.core.magic_arguments import UsageError as ArgUsageError

    from vllm_notebook.loader import _own_parser
    from vllm_notebook.magics.args import line_words
    from vllm_notebook.magics import MAGICS

    known = {n: m for cls in MAGICS for kind in ("line", "cell") for n, m in cls.magics[kind].items()}
    classes = {n: cls for cls in MAGICS for kind in ("line", "cell") for n in cls.magics[kind]}
    ns = {"MODEL": "m", "prompts": [], "docs": [], "df": None}
    bad = [f"{page}: %{name}: no such magic" for page, name in _inline_magic_names()
           if name not in known and name not in ("load_ext", "unload_ext", "config")]
    for page, line in _magic_lines():
        name, _, rest = line.lstrip("%").partition(" ")
        if name in ("load_ext", "unload_ext", "config"):
            continue
        if name not in known:
            bad.append(f"{page}: {line}: no magic %{name}")
            continue
        method = getattr(classes[name], known[name])
        try:
            if name == "vllm_load":
                _own_parser().parse_known_args(line_words("vllm_load", rest, ns))
            elif hasattr(method, "parser"):
                method.parser.parse_args(line_words(name, rest, ns))
        except (ArgUsageError, SystemExit, Exception) as exc:  # noqa: BLE001 - reported below, with the line
            bad.append(f"{page}: {line}: {exc}")
    assert not bad, "\n".join(bad)


def test_every_python_block_compiles():
    from IPython.core.inputtransformer2 import TransformerManager

    bad = []
    for page, lang, body in _blocks():
        if lang != "python":
            continue
        try:
            compile(TransformerManager().transform_cell(body), page, "exec")
        except SyntaxError as exc:
            bad.append(f"{page}: {exc}\n{body}")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_vllm_load_lines_take_their_engine_flags_by_vllms_parser():
    """The flags after the model on each %vllm_load line, as vLLM's own parser reads them (no engine starts)."""
    from vllm_notebook.engine import vllm_import
    from vllm_notebook.loader import _own_parser
    from vllm_notebook.magics.args import line_words

    api = vllm_import.vllm_api()
    bad = []
    for page, line in _magic_lines():
        if not line.startswith("%vllm_load "):
            continue
        ours, rest = _own_parser().parse_known_args(line_words("vllm_load", line[len("%vllm_load "):], {"MODEL": "m"}))
        if ours.attach or ours.slurm is not None or ours.help:
            continue
        parser = api.serve_arg_parser("%vllm_load --server") if ours.server else api.engine_arg_parser("%vllm_load")
        if not ours.server:
            parser.add_argument("model_tag", nargs="?")
            parser.add_argument("--lora-modules", nargs="+", action=api.lora_parser_action(), default=None)
        try:
            parser.parse_args(rest)
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - reported below, with the line
            bad.append(f"{page}: {line}: {exc}")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_readmes_first_notebook_runs_in_a_real_kernel(tmp_path):
    """README's "A first notebook" cells, as a newcomer pastes them, in a real kernel (nbclient)."""
    import nbformat
    from nbclient import NotebookClient

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A first notebook"):]
    section = section[:section.index("\n## ", 1)]
    cells = [body for lang, body in ((m.group(1), m.group(2)) for m in FENCE.finditer(section))
             if "__main__" not in body]  # the plain script is for python, not a kernel
    assert len(cells) >= 3 and "%vllm_load" in cells[0]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells + ["%vllm_unload"]])
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = ["".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in c.outputs)
            for c in nb.cells]
    assert "ready in" in outs[0] and "Paris" in outs[1], outs[:2]
    assert "Rome" in outs[2] and "Traceback" not in "".join(outs), outs[2]
