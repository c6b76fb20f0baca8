"""``VllmMagics``: the magics' settings (``%config VllmMagics.max_tokens = 512``), and ``Topic``, the base of
every topic's magics class, which reads them."""

from __future__ import annotations

from IPython.core.magic import Magics, magics_class
from traitlets import Bool, Float, Int, Unicode, observe

from ..engine import journal, vllm_import
from ..engine.registry import get_engine


@magics_class
class VllmMagics(Magics):
    """The settings of vllm-notebook's magics (``%config VllmMagics``); the magics themselves are the topics'
    classes (``magics/engines.py``, ``generation.py``, ``tasks.py``, ``services.py``, ``environment.py``)."""

    default_model = Unicode("", help="Model used by %vllm_load without one ($VLLM_NOTEBOOK_MODEL).").tag(config=True)
    max_tokens = Int(256, help="Default --max-tokens of %%generate and %%chat.").tag(config=True)
    max_updates_per_second = Float(20.0, help="Most display updates a second while streaming.").tag(config=True)
    stream = Bool(True, help="Stream single prompts into the cell as tokens arrive.").tag(config=True)
    journal = Bool(True, help="Append every result to the results journal; re-run batches resume from it "
                   "($VLLM_NOTEBOOK_JOURNAL=off turns it off by default).").tag(config=True)
    journal_path = Unicode("", help="The journal's file (default: beside the notebook, "
                           "NAME.vllm-journal.jsonl).").tag(config=True)

    preload = Bool(False, help="Import vLLM and torch in the background from %load_ext on, so the first "
                   "%vllm_load starts ~10 s sooner ($VLLM_NOTEBOOK_PRELOAD=1).").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        if self.preload or vllm_import.preload_by_environment():
            vllm_import.preload()
        session = (shell.user_ns.get("__session__") if shell is not None else None) or ""
        journal.configure(notebook=str(session))
        if not journal.enabled_by_environment():
            self.journal = False
        self._journal_changed({"new": self.journal})
        self._journal_path_changed({"new": self.journal_path})

    @observe("preload")
    def _preload_changed(self, change):
        if change["new"]:
            vllm_import.preload()

    @observe("journal")
    def _journal_changed(self, change):
        journal.configure(enabled=change["new"])

    @observe("journal_path")
    def _journal_path_changed(self, change):
        journal.configure(path=change["new"])


@magics_class
class Topic(Magics):
    """What every topic's magics share: the settings, and the engine a ``--name`` names."""

    @property
    def settings(self) -> VllmMagics:
        return self.shell.magics_manager.registry["VllmMagics"]

    def _engine(self, name):
        return get_engine(name)
