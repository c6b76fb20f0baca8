"""``ChatBox``: the panel's conversation and its input, as one anywidget (a few lines of plain JavaScript, no build).

What ipywidgets' own controls cannot do is here: Enter sends and Shift+Enter starts a new line, the input is cleared
once a message is taken, the conversation scrolls to its newest message (unless the reader has scrolled up), and
each reply has a Copy button. The kernel sends the messages as HTML it made safe (``safe_html``: model output is
untrusted, so no raw HTML, no images, no script links); the reply being generated is plain text. Where
vllm-notebook's JupyterLab extension runs (it ships in the wheel: ``vllm_notebook/labextension``), each reply has an
Insert button (the reply as a Markdown cell below the panel's cell), and each code block in it Copy and Insert (the
code as a code cell). Colours and fonts are JupyterLab's theme variables only, so it reads the same in light and
dark themes.
"""

from __future__ import annotations

import html

import anywidget
import traitlets

_ESM = r"""
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function flash(button, said) {
  const label = button.textContent;
  button.textContent = said;
  setTimeout(() => { button.textContent = label; }, 1200);
}

function copy(text, button) {
  const done = () => flash(button, "Copied");
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallback());
  } else {
    fallback();
  }
  function fallback() {
    const area = el("textarea"); area.value = text; document.body.appendChild(area); area.select();
    try { document.execCommand("copy"); done(); } finally { area.remove(); }
  }
}

// vllm-notebook's JupyterLab extension (in the wheel) inserts cells: a widget cannot reach the notebook itself.
const INSERT = "vllm-notebook:insert-cell";
const canInsert = () => document.documentElement.hasAttribute("data-vllm-notebook-insert");

function insertButton(title, source, cellType) {
  const b = el("button", "vnb-insert jp-mod-styled", "Insert");
  b.title = title;
  b.addEventListener("click", () => {
    const event = new CustomEvent(INSERT, { bubbles: true, cancelable: true, detail: { source: source(), cellType } });
    flash(b, b.dispatchEvent(event) ? "Not here" : "Inserted");  // cancelled = the extension took it
  });
  return b;
}

function copyButton(title, text) {
  const c = el("button", "vnb-copy jp-mod-styled", "Copy");
  c.title = title;
  c.addEventListener("click", () => copy(text(), c));
  return c;
}

// A toolbar on each code block of a reply: Copy, and Insert as a code cell.
function codeBars(body) {
  for (const pre of body.querySelectorAll("pre")) {
    const code = () => pre.textContent.replace(/\n$/, "");
    const bar = el("div", "vnb-code-bar");
    bar.append(copyButton("Copy this code", code));
    if (canInsert()) bar.append(insertButton("Insert this code in a new code cell below the panel", code, "code"));
    pre.before(bar);
  }
}

function render({ model, el: root }) {
  root.classList.add("vnb-chat");
  const log = el("div", "vnb-log");
  log.setAttribute("role", "log");
  const empty = el("div", "vnb-empty");
  const composer = el("div", "vnb-composer");
  const input = el("textarea", "vnb-input");
  input.rows = 2;
  // Keys typed here are the chat's, not JupyterLab's (Shift+Enter would run the cell again).
  input.setAttribute("data-lm-suppress-shortcuts", "true");
  input.setAttribute("data-p-suppress-shortcuts", "true");
  const send = el("button", "vnb-send jp-mod-styled jp-mod-accept", "Send");
  const stop = el("button", "vnb-stop jp-mod-styled jp-mod-warn", "Stop");
  send.title = "Send (Enter); Shift+Enter starts a new line";
  stop.title = "Stop the reply; the text so far is kept";
  composer.append(input, send, stop);
  root.append(log, composer);

  let stuck = true;  // follow the newest message unless the reader scrolled up
  log.addEventListener("scroll", () => {
    stuck = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  });
  const follow = () => { if (stuck) log.scrollTop = log.scrollHeight; };

  function bubble(m) {
    const b = el("div", "vnb-msg vnb-" + m.role);
    const head = el("div", "vnb-head");
    head.append(el("span", "vnb-role", m.role === "user" ? "You" : "Assistant"));
    if (m.role === "assistant" && m.text) {
      const tools = el("span", "vnb-tools");
      tools.append(copyButton("Copy this reply", () => m.text));
      if (canInsert()) tools.append(insertButton("Insert this reply in a new Markdown cell below the panel",
                                                 () => m.text, "markdown"));
      head.append(tools);
    }
    const body = el("div", "vnb-body jp-RenderedHTMLCommon");
    body.innerHTML = m.html;  // made safe in the kernel (safe_html): escaped text, checked links, no images
    if (m.role === "assistant") codeBars(body);
    b.append(head, body);
    if (m.footer) b.append(el("div", "vnb-footer", m.footer));
    return b;
  }

  let liveBody = null;
  function drawAll() {
    log.replaceChildren();
    const messages = model.get("messages");
    for (const m of messages) log.append(bubble(m));
    liveBody = null;
    if (model.get("busy")) {
      const b = el("div", "vnb-msg vnb-assistant vnb-pending");
      const head = el("div", "vnb-head");
      head.append(el("span", "vnb-role", "Assistant"), el("span", "vnb-typing", "generating…"));
      liveBody = el("div", "vnb-body vnb-live");
      liveBody.textContent = model.get("live");
      b.append(head, liveBody);
      log.append(b);
    }
    if (!messages.length && !model.get("busy")) {
      empty.textContent = model.get("hint");
      log.append(empty);
    }
    follow();
  }
  function drawLive() {
    if (liveBody) { liveBody.textContent = model.get("live"); follow(); } else { drawAll(); }
  }
  function drawState() {
    const busy = model.get("busy");
    send.disabled = busy || !model.get("ready");
    stop.disabled = !busy;
    input.placeholder = model.get("placeholder");
  }

  input.value = model.get("draft");
  input.addEventListener("input", () => { model.set("draft", input.value); model.save_changes(); });
  function submit() {
    if (send.disabled || !input.value.trim()) return;
    const text = input.value;
    model.set("draft", text);
    model.save_changes();
    model.send({ event: "send", text });
  }
  input.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.isComposing || e.altKey || e.ctrlKey || e.metaKey) return;
    e.preventDefault();
    e.stopPropagation();
    if (!e.shiftKey) { submit(); return; }
    // Shift+Enter: a new line, put in by hand (inside a notebook's output the browser's own line break is
    // cancelled before it lands).
    input.setRangeText("\n", input.selectionStart, input.selectionEnd, "end");
    model.set("draft", input.value);
    model.save_changes();
  });
  send.addEventListener("click", submit);
  stop.addEventListener("click", () => model.send({ event: "stop" }));

  model.on("change:messages", drawAll);
  model.on("change:busy", () => { drawState(); drawAll(); });
  model.on("change:ready", drawState);
  model.on("change:placeholder", drawState);
  model.on("change:hint", drawAll);
  model.on("change:live", drawLive);
  model.on("change:draft", () => {
    // The kernel's word wins when it clears the input (a message taken) or while no one types here; an echo of
    // what was typed a moment ago must not undo the keys pressed since.
    const draft = model.get("draft");
    if (input.value !== draft && (draft === "" || document.activeElement !== input)) input.value = draft;
  });
  drawState();
  drawAll();
}
export default { render };
"""

_CSS = """
.vnb-chat { display: flex; flex-direction: column; gap: 6px; width: 100%; box-sizing: border-box;
  font-family: var(--jp-content-font-family); font-size: var(--jp-content-font-size1);
  color: var(--jp-content-font-color1); }
.vnb-log { max-height: 420px; min-height: 72px; overflow-y: auto; box-sizing: border-box; padding: 6px;
  border: var(--jp-border-width) solid var(--jp-border-color1); border-radius: var(--jp-border-radius);
  background: var(--jp-layout-color0); display: flex; flex-direction: column; gap: 8px; }
.vnb-empty { color: var(--jp-content-font-color1); opacity: 1; font-style: italic; padding: 4px; }
.vnb-msg { border-radius: var(--jp-border-radius); padding: 4px 8px; max-width: 100%; box-sizing: border-box;
  overflow-wrap: anywhere; }
.vnb-user { background: var(--jp-layout-color2); align-self: flex-end; max-width: 85%; }
.vnb-assistant { background: var(--jp-layout-color1);
  border-left: 3px solid var(--jp-brand-color1); }
.vnb-head { display: flex; align-items: center; gap: 8px; font-size: var(--jp-ui-font-size1);
  color: var(--jp-ui-font-color1); font-weight: 600; }
.vnb-typing { font-weight: normal; font-style: italic; }
.vnb-tools { margin-left: auto; display: flex; gap: 4px; }
.vnb-chat button.vnb-copy, .vnb-chat button.vnb-insert { font-size: var(--jp-ui-font-size0); padding: 0 6px;
  height: 22px; line-height: 20px; min-width: 52px;
  font-weight: normal; color: var(--jp-ui-font-color1); background: var(--jp-layout-color2);
  border: var(--jp-border-width) solid var(--jp-border-color1); border-radius: var(--jp-border-radius); cursor: pointer; }
.vnb-code-bar { display: flex; justify-content: flex-end; gap: 4px; margin: 6px 0 2px; }
.vnb-body .vnb-code-bar + pre { margin-top: 0; }
.vnb-body { line-height: var(--jp-content-line-height); }
.vnb-body > :first-child { margin-top: 2px; }
.vnb-body > :last-child { margin-bottom: 2px; }
.vnb-live { white-space: pre-wrap; }
.vnb-footer { font-size: var(--jp-ui-font-size0); color: var(--jp-ui-font-color1); margin-top: 2px; }
.vnb-composer { display: flex; gap: 6px; align-items: flex-end; }
.vnb-input { flex: 1; resize: vertical; min-height: 40px; box-sizing: border-box; padding: 4px 6px;
  font-family: var(--jp-content-font-family); font-size: var(--jp-content-font-size1);
  color: var(--jp-content-font-color1); background: var(--jp-input-background, var(--jp-layout-color1));
  border: var(--jp-border-width) solid var(--jp-input-border-color, var(--jp-border-color1));
  border-radius: var(--jp-border-radius); }
.vnb-input:focus { outline: 1px solid var(--jp-brand-color1); }
.vnb-send, .vnb-stop { height: 30px; min-width: 64px; padding: 0 12px; cursor: pointer;
  border-radius: var(--jp-border-radius); font-size: var(--jp-ui-font-size1); }
.vnb-send { background: var(--jp-brand-color1); color: var(--jp-ui-inverse-font-color0);
  border: 1px solid var(--jp-brand-color1); }
.vnb-stop { background: var(--jp-layout-color2); color: var(--jp-ui-font-color0);
  border: 1px solid var(--jp-border-color1); }
.vnb-send:disabled, .vnb-stop:disabled { opacity: 0.55; cursor: default; }
/* The panel's own ipywidgets: the accordion's title is 54 % black in ipywidgets' style, 4.4:1 on its grey. */
.vllm-notebook-panel .jupyter-widget-Collapse-header, .vllm-notebook-panel .lm-Collapse-header,
.vllm-notebook-panel .p-Collapse-header { color: var(--jp-ui-font-color1) !important; }
"""


class ChatBox(anywidget.AnyWidget):
    """The conversation (``messages``: role, safe ``html``, raw ``text``, ``footer``) and the reply being made
    (``live``, plain text), above an input (``draft``). The browser sends ``{"event": "send", "text": ...}`` on Enter
    or Send and ``{"event": "stop"}`` on Stop."""

    _esm = _ESM
    _css = _CSS
    messages = traitlets.List(traitlets.Dict()).tag(sync=True)
    live = traitlets.Unicode("").tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    ready = traitlets.Bool(True).tag(sync=True)
    draft = traitlets.Unicode("").tag(sync=True)
    placeholder = traitlets.Unicode("Message (Enter sends, Shift+Enter: new line)").tag(sync=True)
    hint = traitlets.Unicode("").tag(sync=True)


_MD = None


def safe_html(text: str) -> str:
    """Model output (untrusted) as HTML that shows Markdown's structure and nothing else: raw HTML is escaped (shown
    as typed), images become plain links (nothing loads), links only to http(s) and mail (markdown-it's checks),
    and single line breaks are kept, as the stream showed them."""
    global _MD
    if _MD is None:
        from markdown_it import MarkdownIt

        md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False})
        md.disable("image")
        md.validateLink = lambda url: url.strip().lower().startswith(("http://", "https://", "mailto:", "#"))
        _MD = md
    try:
        return _MD.render(text)
    except Exception:  # noqa: BLE001 - never lose a reply to the renderer: the text, escaped
        return f"<p style='white-space:pre-wrap'>{html.escape(text)}</p>"
