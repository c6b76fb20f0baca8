"""``PromptPanel``: an ipywidgets GUI over a loaded engine.

Standard widgets only, so it works in JupyterLab 4, Notebook 7 and VS Code.
Generation runs in a background thread: the kernel stays free for cells, and two
panels (or a panel and a ``%%generate`` cell) generate at the same time and are
batched by vLLM. The thread only sets widget values and appends to an Output
widget; it never uses ``with output:``.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets

from ..engine.registry import engines, get_engine
from ..errors import VllmNotebookError
from . import render

_STATUS = {"idle": "#2e7d32", "generating": "#1565c0", "error": "#c62828"}


class PromptPanel(widgets.VBox):
    """Prompt, sampling controls, Generate / Stop / Clear / Save, streamed output and stats."""

    def __init__(self, engine=None, *, temperature: float = 0.7, max_tokens: int = 256,
                 max_updates_per_second: float = 20.0, **sampling):
        """``sampling``: other sampling parameters without a control (e.g. ``ignore_eos=True``)."""
        self._engine_name = getattr(engine, "name", engine)
        self._interval = 1.0 / max_updates_per_second
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.conversation: list[dict] = []
        self.last_generation = None
        self.extra_params: dict = dict(sampling)  # sampling parameters without a control
        self.updates = 0

        self._picker = widgets.Dropdown(description="Engine", layout=widgets.Layout(width="260px"))
        self._header = widgets.HTML()
        self._system = widgets.Textarea(placeholder="System prompt (optional)", rows=1,
                                        layout=widgets.Layout(width="100%"))
        self._prompt = widgets.Textarea(placeholder="Prompt", rows=4, layout=widgets.Layout(width="100%"))
        self._chat = widgets.Checkbox(description="Chat mode (keep the conversation)", value=False, indent=False)
        self._temperature = widgets.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05, description="Temperature")
        self._top_p = widgets.FloatSlider(value=1.0, min=0.01, max=1.0, step=0.01, description="Top-p")
        self._max_tokens = widgets.BoundedIntText(value=max_tokens, min=1, max=1_000_000, description="Max tokens")
        self._seed = widgets.Text(placeholder="random", description="Seed")
        self._stop_strings = widgets.Text(placeholder="comma-separated", description="Stop at")
        self._generate = widgets.Button(description="Generate", button_style="primary", icon="play")
        self._stop = widgets.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self._clear = widgets.Button(description="Clear", icon="eraser")
        self._var = widgets.Text(placeholder="variable name", layout=widgets.Layout(width="160px"))
        self._save = widgets.Button(description="Save to variable", icon="save")
        self._stream = widgets.HTML()
        self._rendered = widgets.Output()
        self._stats = widgets.HTML()
        self._error = widgets.HTML()

        self._generate.on_click(self._on_generate_click)
        self._stop.on_click(self._on_stop_click)
        self._clear.on_click(self._on_clear_click)
        self._save.on_click(self._on_save_click)
        self._picker.observe(self._on_pick, names="value")
        sampling = widgets.HBox([widgets.VBox([self._temperature, self._top_p]),
                                 widgets.VBox([self._max_tokens, self._seed, self._stop_strings])])
        buttons = widgets.HBox([self._generate, self._stop, self._clear, self._var, self._save])
        super().__init__(children=[widgets.HBox([self._picker, self._header]), self._system, self._prompt,
                                   self._chat, sampling, buttons, self._error, self._stream, self._rendered,
                                   self._stats])
        self.add_class("vllm-notebook-panel")
        self._refresh_engines()
        self._set_status("idle")

    # ------------------------------------------------------------ public state
    @property
    def status(self) -> str:
        return self._status

    @property
    def text(self) -> str:
        """The text of the last (or current) generation."""
        return self._text

    @property
    def error(self) -> str:
        """The error shown in the panel ("" when there is none)."""
        return self._error_text if self._error.value else ""

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float = 60) -> None:
        """Block until the current generation ends (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ handlers
    def _on_generate_click(self, _=None) -> None:
        if self.busy:
            return
        self._error.value = ""
        prompt = self._prompt.value.strip()
        if not prompt:
            self._fail("write a prompt first")
            return
        try:
            engine = self._engine()
            params = self._params(engine)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never a traceback
            self._fail(_one_line(exc))
            return
        self._generate.disabled, self._stop.disabled = True, False
        self._stop_event.clear()
        self._set_status("generating")
        self._thread = threading.Thread(target=self._run, args=(engine, prompt, params), daemon=True,
                                        name="vllm-notebook-panel")
        self._thread.start()

    def _on_stop_click(self, _=None) -> None:
        self._stop_event.set()

    def _on_clear_click(self, _=None) -> None:
        if self.busy:
            self._stop_event.set()
            self.wait(5)
        self.conversation = []
        self._text = ""
        self._stream.value = ""
        self._rendered.outputs = ()
        self._stats.value = ""
        self._error.value = ""
        self._prompt.value = ""

    def _on_save_click(self, _=None) -> None:
        name = self._var.value.strip()
        if not name.isidentifier():
            self._fail(f"{name!r} is not a valid variable name" if name else "type a variable name first")
            return
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            self._fail("no IPython kernel to save into")
            return
        shell.user_ns[name] = {"conversation": list(self.conversation), "generation": self.last_generation}
        self._error.value = ""
        self._stats.value = _small(f"saved to <code>{html.escape(name)}</code> (conversation and last Generation)")

    def _on_pick(self, change) -> None:
        if change["new"]:
            self._engine_name = change["new"]
            self._set_status(self._status)

    # ------------------------------------------------------------ generation (background thread)
    def _run(self, engine, prompt: str, params) -> None:
        messages = self._messages(prompt)
        shown = [0.0]
        self._text = ""
        self._stream.value = ""
        self._rendered.outputs = ()

        def on_output(i, out):
            self._text = out.outputs[0].text
            now = time.monotonic()
            if now - shown[0] >= self._interval:
                shown[0] = now
                self._show_stream()

        try:
            prompt_in = engine.chat_prompt(messages) if messages else prompt
            gen = engine.run([prompt_in], params, stream=True, on_output=on_output, stop_event=self._stop_event)
            self.last_generation = gen
            self._text = gen.text
            if messages:
                self.conversation = messages + [{"role": "assistant", "content": gen.text}]
            self._stream.value = ""
            self._render(gen)
            self._stats.value = _small(html.escape(gen.footer()))
            self._set_status("idle")
        except Exception as exc:  # noqa: BLE001 - one red line in the panel, never a traceback
            self._show_stream()
            self._fail(_one_line(exc))
        finally:
            self._generate.disabled, self._stop.disabled = False, True

    def _show_stream(self) -> None:
        self.updates += 1
        self._stream.value = ("<div style='white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace)'>"
                              f"{html.escape(self._text)}</div>")

    def _render(self, gen) -> None:
        """Show the result (or the whole conversation) as Markdown, with a plain-text fallback."""
        if self._chat.value:
            text = "\n\n".join(f"**{'You' if m['role'] == 'user' else 'Assistant'}:** {m['content']}"
                                for m in self.conversation if m["role"] != "system")
        else:
            text = gen.text
        self._rendered.outputs = ({"output_type": "display_data", "metadata": {},
                                   "data": {"text/markdown": render.safe_markdown(text), "text/plain": text}},)

    # ------------------------------------------------------------ helpers
    def _messages(self, prompt: str) -> list[dict] | None:
        system = self._system.value.strip()
        if not self._chat.value and not system:
            return None
        head = [{"role": "system", "content": system}] if system else []
        history = [m for m in self.conversation if m["role"] != "system"] if self._chat.value else []
        return head + history + [{"role": "user", "content": prompt}]

    def _params(self, engine):
        seed = self._seed.value.strip()
        if seed and not seed.lstrip("-").isdigit():
            raise VllmNotebookError(f"seed must be a whole number, not {seed!r}")
        stops = [s for s in (x.strip() for x in self._stop_strings.value.split(",")) if s]
        return engine.params(self.extra_params, {"temperature": self._temperature.value, "top_p": self._top_p.value,
                                                 "max_tokens": self._max_tokens.value, "seed": int(seed) if seed else None,
                                                 "stop": stops or None})

    def _engine(self):
        self._refresh_engines()
        return get_engine(self._engine_name)

    def _refresh_engines(self) -> None:
        names = sorted(engines())
        self._picker.options = names
        if self._engine_name is None and names:  # none asked for: the only one, or 'default'
            self._engine_name = "default" if "default" in names else names[0]
        if self._engine_name in names:
            self._picker.value = self._engine_name
        self._picker.layout.display = "" if len(names) > 1 else "none"

    def _set_status(self, status: str) -> None:
        self._status = status
        eng = engines().get(self._engine_name) if self._engine_name else None
        if eng is None:
            what = "no engine loaded — run %vllm_load MODEL"
        else:
            f = eng.facts
            what = (f"<b>{html.escape(eng.name)}</b>: {html.escape(eng.model)} · TP {f.get('tensor_parallel_size')}"
                    f" / PP {f.get('pipeline_parallel_size')}")
        self._header.value = (f"<span>{what}</span> &nbsp; <span style='color:{_STATUS[status]}'>● {status}</span>")

    def _fail(self, message: str) -> None:
        self._error_text = message
        self._error.value = f"<span style='color:{_STATUS['error']}'>{html.escape(message)}</span>"
        self._set_status("error")
        self._generate.disabled, self._stop.disabled = False, True

    _text = ""
    _status = "idle"
    _error_text = ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, VllmNotebookError) else f"{type(exc).__name__}: {text}"


def _small(text: str) -> str:
    return f"<span style='font-size:smaller;color:#666'>{text}</span>"


def panel(engine=None, **options) -> PromptPanel:
    """A prompt panel over ``engine`` (an Engine or its name; default: the only or 'default' engine).

    ``options``: ``temperature``, ``max_tokens`` (the controls' start values) and any other
    sampling parameter (e.g. ``ignore_eos=True``).
    """
    return PromptPanel(engine, **options)
