"""The prompt panel's widgets, driven with click() against the real engine."""

from __future__ import annotations

import time

import pytest

from panel_steps import mistakes, show_mistake, stop_mid_stream

from vllm_notebook.ui.panel import PromptPanel


@pytest.fixture(autouse=True)
def _shell(ip):
    """Widgets live in a shell, as in a kernel."""


def _panel(prompt: str, chat: bool = False, **controls) -> PromptPanel:
    p = PromptPanel(chat=chat)
    p._box.draft = prompt
    p._temperature.value = controls.pop("temperature", 0.0)
    for name, value in controls.items():
        getattr(p, f"_{name}").value = value
    return p


def test_generate_shows_the_exact_completion(engine):
    p = _panel("The capital of France is")
    assert p.status == "idle" and "default" in p._header.value
    p.send()
    p.wait(30)
    assert p.text == " Paris." and p.status == "idle" and not p.error
    last = p._box.messages[-1]
    assert [m["role"] for m in p._box.messages] == ["user", "assistant"] and p._box.draft == ""  # taken
    assert last["text"] == " Paris." and last["html"] == "<p>Paris.</p>\n"
    assert "finish: stop" in last["footer"] and "TTFT" in last["footer"] and "tok/s" in last["footer"]
    assert not p._box.busy


def test_stop_ends_a_long_generation_within_a_second(engine):
    p = _panel("Once upon a time", max_tokens=500)
    p.extra_params = {"ignore_eos": True}
    stop_mid_stream(p, 500)
    full = engine.generate("Once upon a time", temperature=0, max_tokens=500, ignore_eos=True).text
    assert p.text and full.startswith(p.text)  # the partial text is kept


def test_two_panels_generate_at_once_and_cells_still_run(engine, cell):
    a, b = _panel("The capital of France is", max_tokens=200), _panel("A dog says", max_tokens=200)
    a.extra_params = b.extra_params = {"ignore_eos": True}
    a.send()
    b.send()
    assert a.busy and b.busy
    r, _ = cell("%%generate --temperature 0\nThe capital of Japan is")  # the kernel is free meanwhile
    assert r.result.text == " Tokyo."
    a.wait(60)
    b.wait(60)
    for p, prompt in ((a, "The capital of France is"), (b, "A dog says")):
        want = engine.generate(prompt, temperature=0, max_tokens=200, ignore_eos=True).text
        assert p.text == want and len(p.last_generation.outputs[0].outputs[0].token_ids) == 200
        assert p.text.startswith(" Paris." if p is a else " woof.")


def test_updates_are_throttled(engine):
    p = _panel("Once upon a time", max_tokens=400)
    p.extra_params = {"ignore_eos": True}
    t0 = time.monotonic()
    p.send()
    p.wait(60)
    elapsed = time.monotonic() - t0
    assert p.updates <= 20 * elapsed + 2, (p.updates, elapsed)


def test_chat_mode_clear_and_save(engine, ip):
    p = _panel("What is the capital of France?", chat=True)
    p.send()
    p.wait(30)
    assert p.text == "The capital of France is Paris."
    p._box.draft = "What does a dog say?"
    p.send()
    p.wait(30)
    assert p.text == "A dog says woof." and len(p.conversation) == 4
    shown = [(m["role"], m["text"]) for m in p._box.messages]
    assert shown == [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris."),
                     ("user", "What does a dog say?"), ("assistant", "A dog says woof.")]
    p._var.value = "talk"
    p._save.click()
    assert ip.user_ns["talk"]["conversation"] == p.conversation
    assert ip.user_ns["talk"]["generation"].text == "A dog says woof."
    p.clear()
    assert p.conversation == [] and p.text == "" and p._box.messages == []


def test_system_prompt(engine):
    p = _panel("What color is the sky?", system="Answer briefly.")
    p.send()
    p.wait(30)
    assert p.text == "The sky is blue."


@pytest.mark.parametrize("setup,match", mistakes(600, "max-model-len"))
def test_errors_show_as_one_red_line(engine, setup, match):
    p = _panel("The capital of France is")
    show_mistake(p, setup, match, 30)
    assert "--jp-error-color0" in p._error.value
    p._box.draft = "The capital of France is"
    p.send()
    p.wait(30)
    assert p.text == " Paris." and not p.error and p.status == "idle"


def test_magic_returns_a_panel(cell):
    r, _ = cell("%vllm_panel")
    assert isinstance(r.result, PromptPanel)
    cell("%vllm_panel --name nope", expect_error=Exception)
