/* vllm-notebook's JupyterLab extension, written by hand (no build step, nothing bundled).

JupyterLab loads a prebuilt ("federated") extension by running this script and asking the container it leaves in
window._JUPYTERLAB["vllm-notebook"] for its modules: init(shareScope), then get("./extension") and get("./style"),
each a promise of a factory (webpack's dynamic remote container protocol, which JupyterLab's bootstrap.js and
index.js use). Nothing here imports from JupyterLab: the plugin uses only the application object it is given.

- "vllm-notebook:insert-cell": a command, also reached by the DOM event of the same name, which the chat panel's
  Insert buttons dispatch (widgets cannot reach the notebook themselves). It inserts a code or Markdown cell below
  the cell whose output holds the button, in the notebook that holds it, and makes it the active cell.
- The style: error and stderr lines wrap at spaces (JupyterLab breaks output text anywhere, `word-break:
  break-all`, which cut commands such as `--max-model-len 2048` in two); a word wider than the output still
  breaks.
*/
var _JUPYTERLAB;
(function () {
  "use strict";
  var NAME = "vllm-notebook";
  var COMMAND = "vllm-notebook:insert-cell";
  var CSS =
    "/* vllm-notebook: error lines wrap at spaces, so commands in them stay whole */\n" +
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] pre {\n" +
    "  word-break: normal; overflow-wrap: anywhere;\n}\n";

  // The notebook widget (a panel in the main area, or the current one) and the index of the cell holding `node`.
  function place(app, node) {
    var panels = [];
    var it = app.shell.widgets("main");
    for (var w = it.next(); w && !w.done && w.value !== undefined; w = it.next()) panels.push(w.value);
    var notebookOf = function (w) {
      return w && w.content && w.content.model && w.content.model.sharedModel && w.content.widgets ? w.content : null;
    };
    for (var i = 0; i < panels.length; i++) {
      var nb = notebookOf(panels[i]);
      if (nb && node && panels[i].node.contains(node)) {
        for (var c = 0; c < nb.widgets.length; c++) {
          if (nb.widgets[c].node.contains(node)) return { notebook: nb, index: c };
        }
        return { notebook: nb, index: nb.activeCellIndex };
      }
    }
    var current = notebookOf(app.shell.currentWidget);  // e.g. the panel shown in a separate output view
    return current ? { notebook: current, index: current.activeCellIndex } : null;
  }

  function insert(app, args, node) {
    var where = place(app, node);
    if (!where) return false;
    var nb = where.notebook;
    var type = args.cellType === "markdown" ? "markdown" : "code";
    var cell = { cell_type: type, source: String(args.source || ""), metadata: {} };
    if (type === "code") cell.metadata.trusted = false;  // as JupyterLab's own set_next_input does
    var at = Math.min(where.index + 1, nb.model.sharedModel.cells.length);
    nb.model.sharedModel.insertCell(at, cell);
    nb.activeCellIndex = at;
    if (typeof nb.deselectAll === "function") nb.deselectAll();
    var added = nb.widgets[at];
    if (added && typeof nb.scrollToCell === "function") void nb.scrollToCell(added).catch(function () {});
    return true;
  }

  var plugin = {
    id: "vllm-notebook:insert-cell",
    description: "The chat panel's Insert buttons: a reply (or its code) in a new cell below the panel.",
    autoStart: true,
    activate: function (app) {
      app.commands.addCommand(COMMAND, {
        label: "Insert a cell below (vllm-notebook)",
        execute: function (args) { return insert(app, args || {}, null); },
      });
      // The chat panel dispatches this event from the button; handled here, it is cancelled (defaultPrevented),
      // which tells the panel it worked.
      document.addEventListener(COMMAND, function (event) {
        if (insert(app, event.detail || {}, event.target)) event.preventDefault();
      });
      document.documentElement.setAttribute("data-vllm-notebook-insert", "1");  // the panel shows Insert
    },
  };

  function addStyle() {
    if (document.getElementById("vllm-notebook-style")) return;
    var style = document.createElement("style");
    style.id = "vllm-notebook-style";
    style.textContent = CSS;
    document.head.appendChild(style);
  }

  var modules = {
    "./extension": function () { return { __esModule: true, default: [plugin] }; },
    "./style": function () { addStyle(); return {}; },
  };
  _JUPYTERLAB = window._JUPYTERLAB = window._JUPYTERLAB || {};
  _JUPYTERLAB[NAME] = {
    init: function () {},  // shares nothing, needs nothing shared
    get: function (module) {
      if (!modules[module]) return Promise.reject(new Error('Module "' + module + '" does not exist in container.'));
      return Promise.resolve(modules[module]);
    },
  };
})();
