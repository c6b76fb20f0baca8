"""``Backend``: the one contract every back-end implements, and nothing else.

An ``Engine`` (``engine/core.py``) is one concrete class over a back-end: it owns the event-loop thread,
submitting a batch at once, streaming, Ctrl-C and Stop, results, the journal, statistics, sleep and wake.
A back-end says how a request goes out and comes back, and what the engine is:

- ``LocalBackend`` (``local.py``): vLLM's ``AsyncLLM`` in this kernel;
- ``ServerBackend`` (``server.py``): a vLLM OpenAI-compatible server over HTTP;
- ``SlurmBackend`` (``slurm.py``): a server in a Slurm batch job; it wraps a ``ServerBackend`` once the job's
  server is up, and moves it to a chained successor's;
- ``ReplicasBackend`` (``replicas.py``): several back-ends of one configuration as one (data parallel), a batch
  spread over them with work stealing.

Everything above the back-ends talks to ``Engine`` only: what differs between back-ends is asked of the
back-end through this contract (``kind``, ``holds_devices_here``, ``outlives_kernel``, ``same_as``), never by
testing its class.
"""

from __future__ import annotations

import abc
import asyncio
import queue
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..engine.lora import Adapter, Adapters
from ..engine.requests import Run
from ..errors import UsageError


class Backend(abc.ABC):
    """How one engine's requests go out and come back, and what the engine is (see the module's text)."""

    #: ``"local"``, ``"server"``, ``"slurm"`` or ``"replicas"``: shown to the user (status, provenance), never dispatched on.
    kind: ClassVar[str] = ""
    #: The engine lives on after the kernel (a server, a job): kernel exit and ``detach`` only let go of it.
    outlives_kernel: ClassVar[bool] = False
    #: It holds devices (or memory) on this node that a replacement needs, so it goes before one starts.
    holds_devices_here: ClassVar[bool] = True
    #: The load's last line already summarised the engine, so the cell that loaded it does not show its table
    #: again (a server's or a job's table says more: URL, pid, script, output file).
    summarised_on_load: ClassVar[bool] = False
    #: ``add_lora`` checks an adapter's rank against the engine's ``--max-lora-rank`` (known to the back-end).
    checks_rank: bool = True

    def __init__(self, key: tuple = (), log_path: str = "", plan: dict | None = None):
        self.key = key  # what identifies the configuration: a re-run of the same load reuses the engine
        self.log_path = str(log_path)
        self.plan: dict[str, Any] = dict(plan or {})
        self.facts: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}  # the scheduler's latest KV-cache use and queue lengths
        self.adapters = Adapters()  # LoRA adapters requests can name (``lora=``)
        self.load_seconds: float | None = None
        self.vllm_version: str | None = None
        self.name = ""  # the engine's name, for messages (set by ``Engine``)
        #: What the engine was loaded from, to start it again if a replacement fails: the loader's ``Prepared``
        #: (in-kernel), a ``%vllm_load`` line (a server we started), or None (attached, a job: nothing to redo).
        self.origin: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the engine's event loop (set by ``Engine``)

    # ---------------------------------------------------------------- what the engine is
    @property
    def model(self) -> str:
        return str(self.facts.get("model") or "")

    @property
    def owned(self) -> bool:
        """Started by vllm-notebook, so ``unload`` stops it (an attached server is only detached)."""
        return True

    @property
    def tokenizer(self):
        """The model's tokenizer where it lives in this process (in-kernel engines), else None."""
        return None

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """The engine can answer (it may be asleep)."""

    @property
    def ready(self) -> bool:
        """It takes requests now (a queued job's engine is alive but not ready yet)."""
        return self.alive

    def state(self) -> str | None:
        """A state of the back-end's own (a job's place in the queue), or None for the engine's usual one."""
        return None

    def same_as(self, key: tuple) -> bool:
        """This back-end runs the configuration ``key`` (a server's record id, a job's, an in-kernel load's)."""
        return self.key == key

    def uses_server(self, record_id: str) -> bool:
        """The engine runs on the registered server ``record_id`` (``%vllm_servers`` shows which)."""
        return False

    def rows(self) -> list[tuple[str, Any]]:
        """What the engine is, as (label, value) rows for its display."""
        f = self.facts
        return [("model", self.model), ("dtype", f.get("dtype") or "unknown"),
                ("max_model_len", f.get("max_model_len")), ("log", self.log_path)]

    def title(self) -> str:
        """The display's heading, after the engine's name."""
        return "vLLM engine"

    def parts(self) -> list[dict[str, Any]]:
        """The engines this one is made of, for ``%vllm_status`` (each: ``where``, ``state``, ``in flight``,
        ``served``, ``log``); none for a back-end that is one engine."""
        return []

    def place(self) -> str:
        """Where the engine runs, in a word or two, for ``%vllm_status``'s compact table (e.g. ``kernel``,
        ``server :8123``, ``job 42``)."""
        return self.kind

    # ---------------------------------------------------------------- start
    @abc.abstractmethod
    def start(self, progress: Callable[[str, float], None] | None = None) -> None:
        """Bring the engine up (or connect to it) on ``loop``, which runs; ``progress(phase, seconds)`` while it
        loads. A Slurm job's back-end only starts following its job here."""

    def abandon_start(self) -> None:
        """Ask a ``start`` running on another thread to give up soon (it then stops what it started and raises
        ``VllmNotebookError``): Ctrl-C during replicas started together. Most back-ends start in the caller's
        thread, where Ctrl-C reaches them itself: nothing to do."""

    # ---------------------------------------------------------------- checks
    @abc.abstractmethod
    def check_usable(self) -> None:
        """Raise a one-line ``EngineDiedError`` if the engine (or its server, its job) has died; a back-end that
        is not ready yet (a queued job) waits here or says where it stands."""

    @abc.abstractmethod
    def translate(self, exc: BaseException) -> BaseException:
        """A one-line error for an exception raised while serving a request."""

    # ---------------------------------------------------------------- sampling and prompts
    @abc.abstractmethod
    def sampling(self, base: Any = None, overrides: dict[str, Any] | None = None) -> Any:
        """Sampling for this engine: the model's defaults, then ``base`` (dict or SamplingParams), then ``overrides``."""

    @abc.abstractmethod
    def default_sampling(self) -> dict[str, Any]:
        """The model's own sampling defaults, as the engine applies them."""

    @abc.abstractmethod
    def chat_prompt(self, messages: Sequence[dict]) -> dict:
        """An engine prompt for one assistant reply to ``messages``."""

    @abc.abstractmethod
    def sampling_record(self, params: Any) -> dict[str, Any]:
        """``params`` as JSON-able settings (for the journal's keys and the run record)."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes the engine's results what they are: model, path, revision, flags."""

    @abc.abstractmethod
    def where(self) -> dict[str, Any]:
        """The node and Slurm job the engine runs in (and a server's URL)."""

    # ---------------------------------------------------------------- requests
    @abc.abstractmethod
    def prepare(self, params: Any, stream: bool) -> Any:
        """The back-end's form of ``params`` (sampling, or a ``Pooling`` request) for one run."""

    @abc.abstractmethod
    async def request(self, i: int, prompt, params, rid: str, q: queue.Queue, lora: Adapter | None = None) -> Any:
        """Send one request (to the LoRA adapter ``lora``, if any); put ``(i, output)`` on ``q`` for each
        (cumulative) output."""

    def sends(self, items: list, params: Any, run: Run) -> list[tuple[int, Any]]:
        """The coroutines that send ``run``'s requests, each with the index its error is told under: one request
        per prompt here (a back-end may group them)."""
        return [(i, self.request(i, p, params, rid, run.q, run.loras[i]))
                for i, (p, rid) in enumerate(zip(items, run.rids))]

    @abc.abstractmethod
    def abort(self, run: Run, pending: list[str]) -> None:
        """Abort the requests ``pending`` of ``run``."""

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        """``text`` as the model's tokens (``special``: with the tokens the tokenizer adds, such as BOS)."""
        tok = self.tokenizer
        if tok is None:
            raise UsageError(f"engine '{self.name}' has no tokenizer in this kernel")
        return list(tok.encode(text, add_special_tokens=special))

    def scores(self, query: str, documents: list[str], lora: str | None) -> list[float] | None:
        """The back-end's own scores of ``documents`` against ``query`` (a server's ``/score``), or None: the
        engine then ranks by the cosine of embeddings."""
        return None

    async def add_lora(self, adapter: Adapter) -> None:
        raise UsageError(f"engine '{self.name}' cannot add adapters")

    async def remove_lora(self, adapter: Adapter) -> None:
        raise UsageError(f"engine '{self.name}' cannot remove adapters")

    def tokens_in_flight(self, run: Run) -> int | None:
        """Output tokens made so far by ``run``'s unfinished requests (a batch's progress while no output has come
        back yet), or None where the back-end cannot tell without slowing the run."""
        return None

    def refresh_usage(self) -> None:
        """Update ``usage`` (KV-cache use, queue lengths) where the back-end must ask for it."""

    # ---------------------------------------------------------------- sleep mode
    @abc.abstractmethod
    def can_sleep(self) -> bool:
        """Sleep mode is on for this engine."""

    def sleeping_at(self) -> int:
        """The level the engine sleeps at when this kernel starts using it (a server asleep since an earlier one)."""
        return 0

    @abc.abstractmethod
    async def sleep(self, level: int) -> None: ...

    @abc.abstractmethod
    async def wake(self, level: int) -> None: ...

    # ---------------------------------------------------------------- stop
    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the engine from this kernel, on its still-running event loop (an in-kernel engine shuts down;
        a connection closes)."""

    @abc.abstractmethod
    def stop(self) -> str:
        """After ``close`` and the loop's end: stop what vllm-notebook started (processes, a server, a job);
        returns what was done."""

    def detached(self) -> str:
        """What ``detach`` says for a back-end that outlives the kernel."""
        return f"detached from engine '{self.name}'"
