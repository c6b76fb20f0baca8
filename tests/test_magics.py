"""The magics through a real IPython shell, on the session engine."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError as IPythonUsageError

from vllm_notebook.errors import NoEngineError, RequestError, UsageError, VllmNotebookError


def test_generate_cell_streams_and_returns_generation(cell, ip):
    ip.user_ns["country"] = "France"
    result, _ = cell("%%generate --temperature 0\nThe capital of {country} is")
    gen = result.result
    assert gen.text == " Paris." and gen.prompts == ["The capital of France is"]
    assert ip.user_ns["_"] is gen
    assert gen.params.max_tokens == 256


def test_interpolation_off_and_escapes(cell):
    result, _ = cell("%%generate --temperature 0 --no-interpolate --max-tokens 3\nThe capital of {country} is")
    assert result.result.prompts == ["The capital of {country} is"]
    result, _ = cell('%%generate --temperature 0 --max-tokens 3\n{{"a": 1}} {"b": 2}')
    assert result.result.prompts == ['{"a": 1} {"b": 2}']


def test_split_lines_and_blank(cell):
    result, _ = cell("%%generate --temperature 0 --split lines\nThe capital of France is\nA dog says\n")
    assert result.result.texts == [" Paris.", " woof."]
    result, _ = cell("%%generate --temperature 0 --split blank --format text\nA cat says\n\nA cow says")
    assert result.result.texts == [" meow.", " moo."]


def test_line_magic_with_list_and_out(cell, ip):
    ip.user_ns["qs"] = ["The capital of Spain is", "The capital of Peru is"]
    result, _ = cell("%generate -i qs --temperature 0 --out answers")
    assert ip.user_ns["answers"].texts == [" Madrid.", " Lima."]
    df = ip.user_ns["answers"].to_pandas()
    assert list(df["text"]) == [" Madrid.", " Lima."]


def test_params_variable_and_override(cell, ip):
    ip.user_ns["sp"] = {"temperature": 0.0, "max_tokens": 1}
    result, _ = cell("%%generate --params sp --max-tokens 2\nOnce upon a time")
    assert result.result.params.max_tokens == 2 and result.result.text == " there"


def test_chat_flag_and_system(cell):
    result, _ = cell("%%generate --chat --temperature 0\nWhat is the capital of Japan?")
    assert result.result.text == "The capital of Japan is Tokyo."
    result, _ = cell("%%generate --system 'Answer briefly.' --temperature 0\nWhat color is the grass?")
    assert result.result.text == "The grass is green."


def test_chat_remembers_and_resets(cell, ip):
    cell("%chat_reset")
    r1, _ = cell("%%chat --temperature 0\nWhat is the capital of France?")
    assert r1.result.text == "The capital of France is Paris."
    r2, _ = cell("%%chat --temperature 0\nWhat does a dog say?")
    assert r2.result.text == "A dog says woof."
    assert "What is the capital of France?" in r2.result.prompts[0]
    assert "The capital of France is Paris." in r2.result.prompts[0]
    _, out = cell("%chat_reset")
    assert "2 turn(s)" in out
    r3, _ = cell("%%chat --temperature 0\nWhat does a cat say?")
    assert "France" not in r3.result.prompts[0] and r3.result.text == "A cat says meow."


def test_structured_flags(cell, ip):
    r, _ = cell("%%generate --choice yes --choice no --temperature 0\nIs the sky blue?")
    assert r.result.text in ("yes", "no")
    ip.user_ns["schema"] = {"type": "string", "enum": ["Paris", "Rome"]}
    r, _ = cell("%%generate --json-schema schema --temperature 0 --max-tokens 10\nThe capital of France is")
    assert r.result.text.strip('"') in ("Paris", "Rome")
    r, _ = cell("%%generate --regex '(yes|no)' --temperature 0 --max-tokens 4\nSay:")
    assert r.result.text in ("yes", "no")


def _one_line(text: str) -> bool:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


BAD = [
    ("%%generate --temprature 0\nx", UsageError, "did you mean --temperature"),
    ("%%generate --max-tokens abc\nx", UsageError, "invalid int"),
    ("%%generate --max-tokens -5\nx", UsageError, "max-tokens must be >= 1"),
    ("%%generate --temperature -1\nx", UsageError, "temperature"),
    ("%%generate --top-p 7\nx", UsageError, "top_p"),
    ("%%generate\n   \n", UsageError, "prompt is empty"),
    ("%%generate --name nope\nx", NoEngineError, "no engine named 'nope'"),
    ("%%generate --params missing\nx", UsageError, "no variable named 'missing'"),
    ("%generate -i missing", UsageError, "no variable named 'missing'"),
    ("%generate", UsageError, "needs -i VAR"),
    ("%%generate --json-schema '{bad'\nx", UsageError, "not valid JSON"),
    ("%%generate --json-schema nosuchthing\nx", UsageError, "no variable or file"),
    ("%%generate --json-schema '{\"type\": \"nonsense\"}'\nx", RequestError, "nonsense"),
    ("%%generate --regex '(['\nx", RequestError, "regex"),
    ("%%generate --split words\nx", UsageError, "invalid choice"),
    ("%%chat\n  \n", UsageError, "message is empty"),
    ("%vllm_logs -n 0", UsageError, "positive"),
    ("%vllm_logs --name nope", NoEngineError, "no engine named"),
    ("%vllm_unload --name nope", NoEngineError, "no engine named"),
    ("%vllm_status extra", UsageError, "unrecognized arguments: extra"),
    ("%vllm_load --enforce-eagr", UsageError, "did you mean --enforce-eager"),
    ("%vllm_load /no/such/dir", VllmNotebookError, "no model folder"),
    ("%vllm_load --max-model-len notanumber x", UsageError, "max-model-len"),
    ("%vllm_load 'unterminated", UsageError, "quotation"),
    ("%vllm_load --enforce-eager", UsageError, "no model given"),
    ("%%generate -n 0\nx", UsageError, "-n must be >= 1"),
    ("%vllm_sleep", UsageError, "loaded without sleep mode: load it with --enable-sleep-mode"),
    ("%vllm_sleep --level 3", UsageError, "invalid choice"),
    ("%vllm_wake", UsageError, "is awake already"),
    ("%vllm_sleep --name nope", NoEngineError, "no engine named"),
]


@pytest.mark.parametrize("code,error,match", BAD, ids=[b[0].splitlines()[0][:40] for b in BAD])
def test_bad_input_is_one_line(cell, ip, code, error, match):
    ip.user_ns["schema_str"] = "{}"
    result, out = cell(code, expect_error=(error, IPythonUsageError))
    err = result.error_in_exec
    assert match in str(err), str(err)
    assert _one_line(out), out
    after, _ = cell("%%generate --temperature 0\nThe capital of France is")
    assert after.result.text == " Paris."


def test_regex_on_the_line_reaches_the_engine_as_typed(cell):
    """IPython's line expansion once turned \\d{2,4} into \\d(2, 4): the output then did not match."""
    import re

    result, _ = cell("%%generate --regex '[0-9]{3}-[0-9]{2,4}' --max-tokens 12 --temperature 0\nA number:")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{2,4}", result.result.text), result.result.text


def test_prompt_too_long_is_one_line(cell, ip):
    ip.user_ns["long"] = "word " * 600
    result, out = cell("%%generate\n{long}", expect_error=RequestError)
    assert "max-model-len" in str(result.error_in_exec) and _one_line(out)


def test_status_logs_and_dry_run(cell, demo_path):
    r, _ = cell("%vllm_status")  # compact: one row per engine that fits 100 characters
    lines = str(r.result).splitlines()
    assert lines[0].split() == ["engine", "model", "where", "state", "tok/s", "KV", "use"], lines
    assert lines[1].startswith("default") and max(map(len, lines[:2])) <= 100, lines
    assert r.result.to_pandas().loc[0, "max_model_len"] == 512
    r, _ = cell("%vllm_status --all")
    text = str(r.result)
    assert "engine 'default'" in text and "KV cache tokens" in text
    assert "requests" in text and "plan" in text and "memory: kernel" in text
    _, out = cell("%vllm_logs -n 5")
    assert out.startswith("==> ") and len(out.strip().splitlines()) <= 6
    r, _ = cell(f"%vllm_load {demo_path} --max-model-len 256 --dry-run --name other")
    assert "would start engine 'other'" in str(r.result) and "--max-model-len 256" in str(r.result)


def test_same_load_reuses_engine(cell, engine, demo_path):
    from conftest import LOAD_FLAGS

    r, _ = cell(f"%vllm_load {demo_path} {LOAD_FLAGS}")
    assert r.result is engine


def test_default_model_from_config(cell, ip, engine, demo_path, monkeypatch):
    from conftest import LOAD_FLAGS

    cell(f"%config VllmMagics.default_model = {demo_path!r}")
    try:
        r, _ = cell(f"llm = %vllm_load {LOAD_FLAGS}")
        assert ip.user_ns["llm"] is engine
    finally:
        cell("%config VllmMagics.default_model = ''")
    monkeypatch.setenv("VLLM_NOTEBOOK_MODEL", demo_path)
    r, _ = cell(f"%vllm_load {LOAD_FLAGS}")
    assert r.result is engine


def test_failed_start_shows_root_cause(cell, demo_path, engine):
    # A --max-model-len over the model's limit is refused before anything starts (issue 29), in tokens.
    result, out = cell(f"%vllm_load {demo_path} --name broken --enforce-eager --max-model-len 100000",
                       expect_error=VllmNotebookError)
    assert "use --max-model-len 2048" in str(result.error_in_exec) and "Traceback" not in out
    result, out = cell(f"%vllm_load {demo_path} --name broken --enforce-eager --quantization awq",
                       expect_error=VllmNotebookError)
    msg = str(result.error_in_exec)
    assert "engine failed to start" in msg and "awq" in msg.lower()
    assert "full log:" in msg and "Traceback" not in out
    assert engine.generate("The capital of France is", temperature=0).text == " Paris."


def test_named_engines_coexist_and_changed_flags_replace(cell, ip, engine, demo_path):
    r, _ = cell(f"%vllm_load {demo_path} --name small --enforce-eager --max-model-len 512 --max-num-seqs 32")
    small = r.result
    assert small is not engine and engine.alive and small.backend.args.max_num_seqs == 32
    r, _ = cell("%%generate --name small --temperature 0\nA cow says")
    assert r.result.text == " moo." and r.result.engine == "small"
    r, _ = cell("%%generate --temperature 0\nA cow says")  # no --name: 'default'
    assert r.result.engine == "default"
    r, _ = cell(f"%vllm_load {demo_path} --name small --enforce-eager --max-model-len 512 --max-num-seqs 16")
    assert r.result is not small and not small.alive and r.result.backend.args.max_num_seqs == 16
    _, out = cell("%vllm_unload --name small")
    assert "unloaded engine 'small'" in out
    import vllm_notebook

    assert set(vllm_notebook.engines()) == {"default"} and engine.alive


def test_load_help_lists_every_flag(cell):
    """It used to fail inside argparse: the usage line's "%vllm_load" read as a format directive."""
    _, out = cell("%vllm_load --help")
    assert "usage: %vllm_load [MODEL]" in out and "--max-model-len" in out and "--api-key-file" in out
