"""The magics' behaviour on the fake back-end (``fake_backend.py``), in the fast tier: parsing, interpolation,
splitting, streaming display, results, chat history, status, sleep, unload and one-line errors. The same
behaviours run on the real engine in ``test_magics.py`` (slow tier); here the texts are the fake's echo."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError as IPythonUsageError

from vllm_notebook.errors import NoEngineError, UsageError


def test_generate_cell_interpolates_streams_and_returns_the_result(fake_cell, fake_ip):
    fake_ip.user_ns["country"] = "France"
    result, _ = fake_cell("%%generate --max-tokens 3\nThe capital of {country} is")
    gen = result.result
    assert gen.prompts == ["The capital of France is"] and gen.text == " The capital of"
    assert fake_ip.user_ns["_"] is gen and gen.metrics["finish_reasons"] == {"length": 1}
    sent = fake_ip.user_ns["fake"].backend.sent[-1]
    assert sent[0] == "The capital of France is" and sent[1]["stream"] is True and sent[1]["max_tokens"] == 3


def test_dollar_names_escapes_and_no_interpolation(fake_cell, fake_ip):
    fake_ip.user_ns["tokens"] = 1
    result, _ = fake_cell("%%generate --max-tokens $tokens\nA cat says")  # $name on the line, as IPython does
    assert result.result.texts == [" A"]
    result, _ = fake_cell("%%generate --no-interpolate --max-tokens 1\nThe capital of {country} is")
    assert result.result.prompts == ["The capital of {country} is"]
    result, _ = fake_cell('%%generate --max-tokens 1\n{{"a": 1}} x')
    assert result.result.prompts == ['{"a": 1} x']


def test_split_and_batches_with_out(fake_cell, fake_ip):
    result, _ = fake_cell("%%generate --split lines --max-tokens 2\nred green\nblue\n")
    assert result.result.texts == [" red green", " blue blue"]
    fake_ip.user_ns["qs"] = ["one two", "three"]
    fake_cell("%generate -i qs --max-tokens 2 --out answers")
    assert fake_ip.user_ns["answers"].texts == [" one two", " three three"]
    assert list(fake_ip.user_ns["answers"].to_pandas()["text"]) == [" one two", " three three"]


def test_sampling_flags_reach_the_back_end(fake_cell, fake_ip):
    fake_ip.user_ns["sp"] = {"temperature": 0.5, "max_tokens": 1}
    result, _ = fake_cell("%%generate --params sp --max-tokens 4 --stop c -n 2\na b c d")
    fields = fake_ip.user_ns["fake"].backend.sent[-1][1]
    assert fields["temperature"] == 0.5 and fields["max_tokens"] == 4 and fields["stop"] == ["c"] and fields["n"] == 2
    assert result.result.texts == [" a b ", " b "]  # each completion ends before its stop string


def test_a_trailing_semicolon_shows_nothing(fake_cell, fake_ip):
    fake_ip.user_ns["xs"] = ["a", "b"]
    result, out = fake_cell("%generate -i xs --max-tokens 1 --out kept;")
    assert out == "" and fake_ip.user_ns["kept"].texts == [" a", " b"]


def test_chat_remembers_turns_and_resets(fake_cell):
    fake_cell("%chat_reset")
    r1, _ = fake_cell("%%chat --max-tokens 2\nhello there")
    r2, _ = fake_cell("%%chat --max-tokens 2\nand again")
    assert "hello there" in r2.result.prompts[0] and r1.result.text.strip() in r2.result.prompts[0]
    _, out = fake_cell("%chat_reset")
    assert "2 turn(s)" in out
    r3, _ = fake_cell("%%chat --max-tokens 2\nfresh")
    assert "hello there" not in r3.result.prompts[0]


def test_status_sleep_wake_and_unload(fake_cell, fake_ip):
    result, _ = fake_cell("%vllm_status")
    assert "fake/echo" in str(result.result) or "fake/echo" in repr(result.result._repr_html_())
    _, out = fake_cell("%vllm_sleep")
    assert fake_ip.user_ns["fake"].asleep == 1
    fake_cell("%%generate\nx", expect_error=UsageError)  # asleep: one line saying to wake it
    fake_cell("%vllm_wake")
    assert fake_ip.user_ns["fake"].asleep == 0
    _, out = fake_cell("%vllm_unload")
    assert "unloaded engine 'default'" in out and fake_ip.user_ns["fake"].state == "unloaded"
    fake_cell("%%generate\nx", expect_error=NoEngineError)


BAD = [
    ("%%generate --temprature 0\nx", UsageError, "did you mean --temperature"),
    ("%%generate --max-tokens abc\nx", UsageError, "invalid int"),
    ("%%generate --max-tokens -5\nx", UsageError, "max-tokens must be >= 1"),
    ("%%generate\n   \n", UsageError, "prompt is empty"),
    ("%%generate --name nope\nx", NoEngineError, "no engine named 'nope'"),
    ("%%generate --params missing\nx", UsageError, "no variable named 'missing'"),
    ("%generate -i missing", UsageError, "no variable named 'missing'"),
    ("%generate", UsageError, "needs -i VAR"),
    ("%%generate --split words\nx", UsageError, "invalid choice"),
    ("%%chat\n  \n", UsageError, "message is empty"),
    ("%vllm_unload --name nope", NoEngineError, "no engine named"),
    ("%vllm_status extra", UsageError, "unrecognized arguments: extra"),
    ("%%generate -n 0\nx", UsageError, "-n must be >= 1"),
    ("%%generate\n" + "word " * 80, Exception, "maximum context length"),
]


@pytest.mark.parametrize("code,error,match", BAD, ids=[b[0].splitlines()[0][:40] for b in BAD])
def test_a_mistake_is_one_line_and_the_engine_still_serves(fake_cell, code, error, match):
    result, out = fake_cell(code, expect_error=(error, IPythonUsageError))
    err = result.error_in_exec or result.error_before_exec
    assert match in str(err), str(err)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) <= 1 and "Traceback" not in out, out
    after, _ = fake_cell("%%generate --max-tokens 2\nstill here")
    assert after.result.text == " still here"


def test_a_batch_is_journaled_and_a_rerun_resumes_from_it(fake_cell, fake_ip, tmp_path):
    """The journal on the fake engine: every result appended as it ends; the same batch again is taken from it."""
    path = tmp_path / "nb.vllm-journal.jsonl"
    fake_ip.user_ns["qs"] = ["red green", "blue"]
    fake_cell(f"%config VllmMagics.journal_path = '{path}'")
    fake_cell("%config VllmMagics.journal = True")
    try:
        first, _ = fake_cell("%generate -i qs --max-tokens 2 --temperature 0")
        sent = len(fake_ip.user_ns["fake"].backend.sent)
        again, out = fake_cell("%generate -i qs --max-tokens 2 --temperature 0")
        assert again.result.texts == first.result.texts == [" red green", " blue blue"]
        assert len(fake_ip.user_ns["fake"].backend.sent) == sent and "2 of 2 from the journal" in out
        fresh, _ = fake_cell("%generate -i qs --max-tokens 2 --temperature 0 --fresh")
        assert len(fake_ip.user_ns["fake"].backend.sent) == sent + 2 and fresh.result.texts == first.result.texts
        history, _ = fake_cell("%vllm_history")
        assert list(history.result["text"])[-2:] == [" red green", " blue blue"]
    finally:
        fake_cell("%config VllmMagics.journal = False")
        fake_cell("%config VllmMagics.journal_path = ''")


def test_the_loading_cell_shows_an_engines_table_unless_the_load_line_summarised_it(fake_ip, capsys):
    from vllm_notebook.ui import render

    eng = fake_ip.user_ns["fake"]
    eng.announced_in = fake_ip.execution_count  # as %vllm_load does for the engine it returns
    capsys.readouterr()
    render.show_engine(eng)  # a server's or a job's table says more than its load line: shown
    assert capsys.readouterr().out
    eng.backend.summarised_on_load = True  # as an in-kernel engine's "ready in … — model · dtype · …" line
    render.show_engine(eng)
    assert not capsys.readouterr().out
    eng.announced_in = None  # any later cell shows it
    render.show_engine(eng)
    assert capsys.readouterr().out
