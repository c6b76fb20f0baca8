"""The prompt panel's logic on the fake back-end (``fake_backend.py``), in the fast tier: generating, Stop,
chat mode, saving, throttled updates and one-line errors. ``test_panel.py`` runs the same on the real engine,
and ``test_browser.py`` in real JupyterLab."""

from __future__ import annotations

import time

import pytest

from panel_steps import mistakes, show_mistake, stop_mid_stream

from vllm_notebook.ui.panel import PromptPanel


def _panel(prompt: str, chat: bool = False, **controls) -> PromptPanel:
    p = PromptPanel(chat=chat)
    p._box.draft = prompt
    for name, value in controls.items():
        getattr(p, f"_{name}").value = value
    return p


def test_generate_shows_the_completion_and_its_stats(fake_ip):
    p = _panel("red green blue", max_tokens=4)
    assert p.status == "idle" and "default" in p._header.value
    p.send()
    p.wait(10)
    assert p.text == " red green blue red" and p.status == "idle" and not p.error
    last = p._box.messages[-1]
    assert [m["role"] for m in p._box.messages] == ["user", "assistant"] and p._box.draft == ""  # taken
    assert last["text"] == " red green blue red" and last["html"] == "<p>red green blue red</p>\n"
    assert "finish: length" in last["footer"] and "tok/s" in last["footer"]
    assert not p._box.busy


def test_stop_keeps_the_partial_text(fake_ip):
    fake_ip.user_ns["fake"].backend.delay = 0.02
    p = _panel("a b c", max_tokens=500)
    stop_mid_stream(p, 500)


def test_updates_are_throttled(fake_ip):
    fake_ip.user_ns["fake"].backend.delay = 0.002
    p = _panel("a b", max_tokens=400)
    t0 = time.monotonic()
    p.send()
    p.wait(30)
    elapsed = time.monotonic() - t0
    assert p.updates <= 20 * elapsed + 2, (p.updates, elapsed)


def test_chat_mode_remembers_saves_and_clears(fake_ip):
    p = _panel("hello there", chat=True, max_tokens=2)
    p.send()
    p.wait(10)
    first = p.text
    p._box.draft = "and again"
    p.send()
    p.wait(10)
    assert len(p.conversation) == 4 and p.conversation[1] == {"role": "assistant", "content": first}
    shown = [(m["role"], m["text"]) for m in p._box.messages]
    assert shown == [("user", "hello there"), ("assistant", first), ("user", "and again"), ("assistant", p.text)]
    p._var.value = "talk"
    p._save.click()
    assert fake_ip.user_ns["talk"]["conversation"] == p.conversation
    p.clear()
    assert p.conversation == [] and p.text == "" and p._box.messages == []


@pytest.mark.parametrize("setup,match", mistakes(80, "maximum context length"))
def test_errors_show_as_one_red_line(fake_ip, setup, match):
    p = _panel("still here", max_tokens=2)
    show_mistake(p, setup, match, 10)
    p._box.draft = "still here"
    p.send()
    p.wait(10)
    assert p.text == " still here" and not p.error and p.status == "idle"


def test_the_browser_sends_and_stops_through_the_chat_box(fake_ip):
    """What the page sends on Enter (or Send) and on Stop: the same as ``send`` and ``stop``."""
    fake_ip.user_ns["fake"].backend.delay = 0.02
    p = PromptPanel(max_tokens=200)
    p._box.draft = "one two"  # typed, then Enter: the page sends the text with the event
    p._on_box_message(p._box, {"event": "send", "text": "one two"}, [])
    assert p.busy and p._box.busy and p._box.draft == ""
    deadline = time.monotonic() + 5
    while not p.text and time.monotonic() < deadline:
        time.sleep(0.01)
    p._on_box_message(p._box, {"event": "stop"}, [])
    p.wait(5)
    assert p.last_generation.interrupted and p._box.messages[-1]["text"] == p.text and not p._box.busy


def test_no_engine_says_so_and_sending_tells_what_to_do(fake_ip):
    p = PromptPanel("nope")
    assert "no engine" in p._header.value and "%vllm_load" in p._header.value and not p._box.ready
    assert "%vllm_load" in p._box.hint
    p.send("hello")
    assert "no engine named 'nope'" in p.error and "\n" not in p.error and not p._box.busy


def test_the_panel_uses_theme_colours_only():
    """Hard-coded colours fail the 4.5:1 contrast minimum in one theme or the other; JupyterLab's variables don't."""
    import inspect
    import re

    from vllm_notebook.ui import chatbox, panel

    for module in (panel, chatbox):
        source = inspect.getsource(module)
        assert not re.search(r"#[0-9a-fA-F]{3,6}\b(?![\w-])", source.replace("#unsafe", "")), module.__name__
        assert not re.search(r"\b(rgb|hsl)a?\(", source), module.__name__


@pytest.mark.parametrize("text,shown,absent", [
    ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)&gt;", "<img"),
    ("![cat](http://evil/track.png)", "http://evil/track.png", "<img"),
    ("[click](javascript:alert(1))", "[click](javascript:alert(1))", "href=\"javascript"),
    ("line one\nline two", "line one<br />\nline two", None),
    ("- a\n- b", "<li>a</li>", None),
    ("`<b>`", "<code>&lt;b&gt;</code>", "<b>"),
])
def test_replies_show_as_safe_html_with_their_line_breaks(text, shown, absent):
    from vllm_notebook.ui.chatbox import safe_html

    out = safe_html(text)
    assert shown in out and (absent is None or absent not in out), out
