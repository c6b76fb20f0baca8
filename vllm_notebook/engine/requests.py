"""What a request is while it runs, shared by the engine and its back-ends: ``Run`` (one call's requests and
their latest outputs), ``PromptRejected`` (one prompt's own error), and the helpers that turn prompts into the
engine's form and errors into one line."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import RequestError, UsageError

Prompt = str | dict  # a text prompt, {"prompt_token_ids": [...]}, or chat {"messages": [...]}


@dataclass
class Run:
    """The state of one call to ``Engine.run``: its requests and their latest outputs."""

    rids: list[str]
    outputs: list[Any]
    q: queue.Queue = field(default_factory=queue.Queue)
    loras: list[Any] = field(default_factory=list)  # each request's LoRA adapter (None: the base model)
    future: Any = None
    params: Any = None
    started: float = 0.0
    first_token_at: float | None = None
    done: bool = False
    book: Any = None  # the journal finished outputs go to (None: not journaled)
    keys: list[str] = field(default_factory=list)  # each request's journal key
    texts: list[str] = field(default_factory=list)  # each request's prompt as text
    run_id: str = ""
    errors: dict[int, str] = field(default_factory=dict)  # a prompt's own error (too long, refused), by index
    finished: int = 0  # requests that ended with an output
    finished_tokens: int = 0  # their output tokens

    @cached_property
    def rid_set(self) -> set[str]:
        return set(self.rids)


@dataclass(frozen=True)
class Progress:
    """How far a batch is, about five times a second (``Engine.run``'s ``on_progress``): prompts done of all,
    output tokens so far (of the finished prompts, and of all including those still running)."""

    prompts: int
    done: int
    tokens: int
    done_tokens: int
    elapsed: float


class PromptRejected(Exception):
    """A back-end's word that ``error`` concerns one prompt alone (refused when it was added: too long, invalid),
    not the engine: in a batch, the other prompts go on (``Engine._events``' ``keep_going``)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error



class suppress_errors:
    """``with suppress_errors():`` ignores errors, never Ctrl-C or exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and not issubclass(exc[0], KeyboardInterrupt | SystemExit)


def as_batch(prompts) -> list:
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, list | tuple) or hasattr(prompts, "tolist"):
        batch = list(prompts.tolist() if hasattr(prompts, "tolist") else prompts)
        if batch:
            return batch
        raise UsageError("no prompts: the list is empty")
    raise UsageError(f"prompts must be a str, a list of str, or {{'prompt_token_ids': [...]}}, "
                     f"not {type(prompts).__name__}")


def engine_prompt(p: Prompt):
    if not isinstance(p, str | dict):
        raise UsageError(f"each prompt must be a str or {{'prompt_token_ids': [...]}}, not {type(p).__name__}")
    if isinstance(p, dict) and "prompt_token_ids" in p:
        return {"prompt_token_ids": list(p["prompt_token_ids"])}
    return p


def prompt_text(p: Prompt) -> str:
    if isinstance(p, dict):
        return str(p.get("prompt", p.get("prompt_token_ids", "")))
    return p


def aborted(o) -> bool:
    return any(c.finish_reason == "abort" for c in o.outputs)



def first_line(exc: BaseException) -> str:
    """The first line of the innermost cause of ``exc`` (or its type's name); a first line that ends in ``:``
    announces what follows (``regex parse error:`` then the pattern and the error), so the rest is joined to it."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    if not lines:
        return type(cause).__name__
    if lines[0].endswith(":") and len(lines) > 1 and not lines[0].startswith("Traceback"):
        return " ".join(lines)[:400]
    return lines[0]


def request_error(msg: str) -> RequestError:
    """A rejected request, with what to do when the prompt is too long."""
    if "maximum context length" in msg or "maximum model length" in msg:
        msg += " — shorten the prompt, or load with a larger --max-model-len"
    return RequestError(msg)
