"""``PromptPanel``: a chat over a loaded engine, in ipywidgets (and one anywidget, the conversation: ``chatbox.py``).

Works in JupyterLab 4 and Notebook 7 (and wherever anywidget does). Generation runs in a background thread: the
kernel stays free for cells, and two panels (or a panel and a ``%%generate`` cell) generate at the same time and
are batched by vLLM. The thread only sets widget values; it never uses ``with output:``. Every colour is one of
JupyterLab's theme variables (``--jp-*``), so light and dark themes both read well.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets

from ..engine.registry import engines, get_engine
from ..errors import VllmNotebookError
from .chatbox import ChatBox, safe_html

#: The status dot's colour per state: theme variables (their contrast holds in light and dark themes).
_STATUS = {"idle": "var(--jp-success-color0)", "generating": "var(--jp-brand-color0)",
           "error": "var(--jp-error-color0)", "no engine": "var(--jp-warn-color0)"}
_WIDE = {"description_width": "initial"}  # a control's label at its own width: never cut ("Temperat…")


class PromptPanel(widgets.VBox):
    """A chat: the conversation with Copy buttons, an input at the bottom (Enter sends, Shift+Enter: new line;
    Stop keeps the text so far), settings (system prompt, sampling) folded away, Clear and Save below.

    Chat mode (the default where the model has a chat template) sends the conversation through the template;
    without it each message is a plain prompt completed on its own, and the panel still lists them."""

    def __init__(self, engine=None, *, temperature: float = 0.7, max_tokens: int = 256,
                 max_updates_per_second: float = 20.0, chat: bool | None = None, **sampling):
        """``sampling``: other sampling parameters without a control (e.g. ``ignore_eos=True``); ``chat``: keep
        the conversation and apply the chat template (None: where the model has one)."""
        self._engine_name = getattr(engine, "name", engine)
        self._interval = 1.0 / max_updates_per_second
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.conversation: list[dict] = []
        self.last_generation = None
        self.extra_params: dict = dict(sampling)  # sampling parameters without a control
        self.updates = 0

        self._picker = widgets.Dropdown(description="Engine", style=_WIDE, layout=widgets.Layout(width="auto"))
        self._header = widgets.HTML()
        self._box = ChatBox()
        self._system = widgets.Textarea(placeholder="System prompt (optional)", rows=2,
                                        layout=widgets.Layout(width="100%"))
        self._chat = widgets.Checkbox(description="Chat mode: keep the conversation, use the chat template",
                                      value=bool(chat), indent=False, layout=widgets.Layout(width="auto"))
        self._chat_given = chat is not None
        self._temperature = widgets.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                                description="Temperature", style=_WIDE)
        self._top_p = widgets.FloatSlider(value=1.0, min=0.01, max=1.0, step=0.01, description="Top-p", style=_WIDE)
        self._max_tokens = widgets.BoundedIntText(value=max_tokens, min=1, max=1_000_000, description="Max tokens",
                                                  style=_WIDE, layout=widgets.Layout(width="200px"))
        self._seed = widgets.Text(placeholder="random", description="Seed", style=_WIDE,
                                  layout=widgets.Layout(width="200px"))
        self._stop_strings = widgets.Text(placeholder="comma-separated", description="Stop at", style=_WIDE,
                                          layout=widgets.Layout(width="260px"))
        self._clear = widgets.Button(description="Clear", icon="eraser", tooltip="Forget the conversation")
        self._var = widgets.Text(placeholder="variable name", layout=widgets.Layout(width="160px"))
        self._save = widgets.Button(description="Save to variable", icon="save", layout=widgets.Layout(width="auto"),
                                    tooltip="The conversation and the last Generation, as a variable of the kernel")
        self._stats = widgets.HTML()
        self._error = widgets.HTML()

        self._box.on_msg(self._on_box_message)
        self._clear.on_click(lambda _: self.clear())
        self._save.on_click(lambda _: self.save(self._var.value))
        self._picker.observe(self._on_pick, names="value")
        settings = widgets.VBox([
            self._system, self._chat,
            widgets.HBox([self._temperature, self._top_p], layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self._max_tokens, self._seed, self._stop_strings],
                         layout=widgets.Layout(flex_flow="row wrap"))])
        self._settings = widgets.Accordion(children=[settings], selected_index=None)
        self._settings.set_title(0, "Settings: system prompt, sampling")
        below = widgets.HBox([self._clear, self._var, self._save], layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__(children=[widgets.HBox([self._picker, self._header]), self._settings, self._box,
                                   self._error, self._stats, below],
                         layout=widgets.Layout(width="100%", max_width="980px"))
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

    # ------------------------------------------------------------ actions (the browser's, or a script's)
    def send(self, text: str | None = None) -> None:
        """Send ``text`` (default: what is typed in the input), as Enter or Send does; the reply streams in."""
        if self.busy:
            return
        self._error.value = ""
        prompt = (self._box.draft if text is None else text).strip()
        if not prompt:
            self._fail("write a message first")
            return
        try:
            engine = self._engine()
            params = self._params(engine)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never a traceback
            self._fail(_one_line(exc))
            return
        self._stop_event.clear()
        self._text = ""
        with self._box.hold_sync():
            self._box.draft = ""  # taken: the input is free for the next message
            self._box.messages = [*self._box.messages, {"role": "user", "html": safe_html(prompt), "text": prompt}]
            self._box.live = ""
            self._box.busy = True
        self._set_status("generating")
        self._thread = threading.Thread(target=self._run, args=(engine, prompt, params), daemon=True,
                                        name="vllm-notebook-panel")
        self._thread.start()

    def stop(self) -> None:
        """Stop the reply being made (as the Stop button does); the text so far is kept."""
        self._stop_event.set()

    def clear(self) -> None:
        """Forget the conversation (a reply being made is stopped first)."""
        if self.busy:
            self._stop_event.set()
            self.wait(5)
        self.conversation = []
        self._text = ""
        with self._box.hold_sync():
            self._box.messages = []
            self._box.live = ""
            self._box.draft = ""
        self._stats.value = ""
        self._error.value = ""

    def save(self, name: str) -> None:
        """Put the conversation and the last Generation in the kernel's variable ``name``."""
        name = name.strip()
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

    def _on_box_message(self, _widget, content, _buffers) -> None:
        event = content.get("event") if isinstance(content, dict) else None
        if event == "send":
            self.send(str(content.get("text", "")))
        elif event == "stop":
            self.stop()

    def _on_pick(self, change) -> None:
        if change["new"]:
            self._engine_name = change["new"]
            self._set_status(self._status)

    # ------------------------------------------------------------ generation (background thread)
    def _run(self, engine, prompt: str, params) -> None:
        messages = self._messages(prompt)
        shown = [0.0]

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
            if self._chat.value:
                self.conversation = messages + [{"role": "assistant", "content": gen.text}]
            else:
                self.conversation = [*self.conversation, {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": gen.text}]
            self._reply(gen.text, gen.footer())
            self._stats.value = ""
            self._set_status("idle")
        except Exception as exc:  # noqa: BLE001 - one red line in the panel, never a traceback
            if self._text:
                self._reply(self._text, "")
            else:
                self._box.busy = False
            self._fail(_one_line(exc))

    def _show_stream(self) -> None:
        self.updates += 1
        self._box.live = self._text

    def _reply(self, text: str, footer: str) -> None:
        """The finished reply in the conversation: Markdown made safe, line breaks kept, its figures below it."""
        with self._box.hold_sync():
            self._box.messages = [*self._box.messages,
                                  {"role": "assistant", "html": safe_html(text), "text": text, "footer": footer}]
            self._box.live = ""
            self._box.busy = False

    # ------------------------------------------------------------ helpers
    def _messages(self, prompt: str) -> list[dict] | None:
        """The chat messages to send (None: ``prompt`` goes as a plain prompt)."""
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
        eng = engines().get(self._engine_name) if self._engine_name else None
        if eng is not None and not self._chat_given:  # chat mode where the model has a chat template
            self._chat.value = _has_chat_template(eng)
            self._chat_given = True

    def _set_status(self, status: str) -> None:
        self._status = status
        eng = engines().get(self._engine_name) if self._engine_name else None
        if eng is None:
            what, shown = "no engine: run <code>%vllm_load MODEL</code> first", "no engine"
        else:
            f = eng.facts
            what = (f"<b>{html.escape(eng.name)}</b>: {html.escape(eng.model)} · TP {f.get('tensor_parallel_size')}"
                    f" / PP {f.get('pipeline_parallel_size')}")
            shown = status
        self._box.ready = eng is not None
        self._box.hint = ("No engine yet: run %vllm_load MODEL in a cell, then write here." if eng is None
                          else "Write a message below: Enter sends, Shift+Enter starts a new line.")
        self._header.value = (f"<span style='color:var(--jp-ui-font-color1)'>{what}</span> &nbsp; "
                              f"<span style='color:{_STATUS[shown]}'>● {shown}</span>")

    def _fail(self, message: str) -> None:
        self._error_text = message
        self._error.value = f"<span style='color:{_STATUS['error']}'>{html.escape(message)}</span>"
        self._set_status("error")
        self._box.busy = False

    _text = ""
    _status = "idle"
    _error_text = ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, VllmNotebookError) else f"{type(exc).__name__}: {text}"


def _small(text: str) -> str:
    return f"<span style='font-size:smaller;color:var(--jp-ui-font-color1)'>{text}</span>"


def _has_chat_template(engine) -> bool:
    try:
        return bool(getattr(engine.tokenizer, "chat_template", None))
    except Exception:  # noqa: BLE001 - a server's tokenizer may not be here: plain prompts
        return False


def panel(engine=None, **options) -> PromptPanel:
    """A chat panel over ``engine`` (an Engine or its name; default: the only or 'default' engine).

    ``options``: ``temperature``, ``max_tokens`` (the controls' start values), ``chat`` (keep the conversation and
    use the chat template; default: where the model has one) and any other sampling parameter (e.g.
    ``ignore_eos=True``).
    """
    return PromptPanel(engine, **options)
