"""The prompt panel's logic on the fake back-end (``fake_backend.py``), in the fast tier: generating, Stop,
chat mode, saving, throttled updates and one-line errors. ``test_panel.py`` runs the same on the real engine,
and ``test_browser.py`` in real JupyterLab."""

from __future__ import annotations

import time

import pytest

from panel_steps import mistakes, show_mistake, stop_mid_stream

from vllm_notebook.ui.panel import PromptPanel


def _panel(prompt: str, **controls) -> PromptPanel:
    p = PromptPanel()
    p._prompt.value = prompt
    for name, value in controls.items():
        getattr(p, f"_{name}").value = value
    return p


def test_generate_shows_the_completion_and_its_stats(fake_ip):
    p = _panel("red green blue", max_tokens=4)
    assert p.status == "idle" and "default" in p._header.value
    p._generate.click()
    p.wait(10)
    assert p.text == " red green blue red" and p.status == "idle" and not p.error
    assert p._rendered.outputs[0]["data"]["text/markdown"] == " red green blue red"
    assert "finish: length" in p._stats.value and "tok/s" in p._stats.value
    assert not p._generate.disabled and p._stop.disabled


def test_stop_keeps_the_partial_text(fake_ip):
    fake_ip.user_ns["fake"].backend.delay = 0.02
    p = _panel("a b c", max_tokens=500)
    stop_mid_stream(p, 500)


def test_updates_are_throttled(fake_ip):
    fake_ip.user_ns["fake"].backend.delay = 0.002
    p = _panel("a b", max_tokens=400)
    t0 = time.monotonic()
    p._generate.click()
    p.wait(30)
    elapsed = time.monotonic() - t0
    assert p.updates <= 20 * elapsed + 2, (p.updates, elapsed)


def test_chat_mode_remembers_saves_and_clears(fake_ip):
    p = _panel("hello there", chat=True, max_tokens=2)
    p._generate.click()
    p.wait(10)
    first = p.text
    p._prompt.value = "and again"
    p._generate.click()
    p.wait(10)
    assert len(p.conversation) == 4 and p.conversation[1] == {"role": "assistant", "content": first}
    shown = p._rendered.outputs[-1]["data"]["text/markdown"]
    assert "**You:** hello there" in shown and f"**Assistant:** {p.text}" in shown
    p._var.value = "talk"
    p._save.click()
    assert fake_ip.user_ns["talk"]["conversation"] == p.conversation
    p._clear.click()
    assert p.conversation == [] and p.text == "" and p._rendered.outputs == ()


@pytest.mark.parametrize("setup,match", mistakes(80, "maximum context length"))
def test_errors_show_as_one_red_line(fake_ip, setup, match):
    p = _panel("still here", max_tokens=2)
    show_mistake(p, setup, match, 10)
    p._prompt.value = "still here"
    p._generate.click()
    p.wait(10)
    assert p.text == " still here" and not p.error and p.status == "idle"
