"""Steps the panel's tests share, on the real engine (``test_panel.py``) and the fake one (``test_panel_fake.py``)."""

from __future__ import annotations

import time


def stop_mid_stream(p, max_tokens: int):
    """Send, wait for the first text, Stop: it must end the run within a second, keep the partial
    text and leave the panel ready. Returns the interrupted Generation."""
    p.send()
    deadline = time.monotonic() + 10
    while not p.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.busy and p._box.busy
    t0 = time.monotonic()
    p.stop()
    p.wait(5)
    assert time.monotonic() - t0 < 1.0
    gen = p.last_generation
    assert gen.interrupted and 0 < len(gen.outputs[0].outputs[0].token_ids) < max_tokens and p.text == gen.text
    assert not p._box.busy and p.status == "idle"
    return gen


def mistakes(too_long_words: int, too_long_says: str) -> list[tuple]:
    """(setup, what the red line says) for each mistake a panel can be given; a prompt of ``too_long_words``
    words is over the engine's length."""
    return [
        (lambda p: setattr(p._box, "draft", "  "), "write a message first"),
        (lambda p: setattr(p._seed, "value", "abc"), "seed must be a whole number"),
        (lambda p: setattr(p._box, "draft", "word " * too_long_words), too_long_says),
        (lambda p: setattr(p, "_engine_name", "nope"), "no engine named 'nope'"),
        (lambda p: setattr(p._var, "value", "not a name"), "not a valid variable name"),
    ]


def show_mistake(p, setup, match: str, timeout: float) -> None:
    """Give the panel a mistake: one red line, no traceback, and the panel ready for the next click."""
    setup(p)
    p._save.click() if "name" in match and "engine" not in match else p.send()
    p.wait(timeout)
    assert match in p.error and "\n" not in p.error and "Traceback" not in p.error
    assert p.status == "error" and not p._box.busy
    p._engine_name = "default"
    p._seed.value = ""
