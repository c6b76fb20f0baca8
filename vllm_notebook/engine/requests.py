"""What a request is while it runs, shared by the engine and its back-ends: ``Run`` (one call's requests and
their latest outputs), ``PromptRejected`` (one prompt's own error), and the helpers that turn prompts into the
engine's form and errors into one line."""

from __future__ import annotations

import queue
import re
from collections.abc import Callable
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
    notes: list[str] = field(default_factory=list)  # what happened on the way, one line each (a replica died)
    stopping: bool = False  # the run asked its requests to end (Ctrl-C, Stop): their aborts are its own

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
    final: bool = False  # the run has ended: the last call


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


_TOO_LONG = [  # vLLM's ways of saying a prompt is too long: (pattern, the limit's group, the prompt's, its unit)
    (re.compile(r"maximum context length is ([\d,]+) tokens\. However, your prompt contains ([\d,]+) characters"),
     "characters"),
    (re.compile(r"prompt \(length ([\d,]+)\) (?:plus the number of requested output tokens \(at least 1\) )?is longer "
                r"than the maximum model length of ([\d,]+)"), "tokens"),
    (re.compile(r"maximum context length is ([\d,]+) tokens\. However, you requested ([\d,]+) tokens"), "requested"),
    (re.compile(r"maximum context length is ([\d,]+) tokens\. However, your prompt contains at least ([\d,]+) input "
                r"tokens"), "at least"),
]
_FIX = "shorten the prompt, or load with a larger --max-model-len"


def request_error(msg: str, prompt_tokens: int | None = None) -> RequestError:
    """A rejected request in one line. A prompt too long is told in tokens (``prompt_tokens``, where the caller
    could count them; vLLM's front end counts characters first), with the engine's limit and what to do."""
    for pattern, unit in _TOO_LONG:
        m = pattern.search(msg)
        if m is None:
            continue
        a, b = (int(g.replace(",", "")) for g in m.groups())
        if unit == "tokens":
            has, limit = a, b
        else:
            limit, has = a, b
        if prompt_tokens is not None:
            return RequestError(f"the prompt has {prompt_tokens:,} tokens; this engine takes at most {limit:,} "
                                f"(max_model_len), and the reply needs room too — {_FIX}")
        if unit == "characters":
            return RequestError(f"the prompt is too long: {has:,} characters, more than {limit:,} tokens "
                                f"(max_model_len) can hold — {_FIX}")
        if unit == "at least":
            return RequestError(f"the prompt has at least {has:,} tokens; this engine takes at most {limit:,} "
                                f"(max_model_len), and the reply needs room too — {_FIX}")
        if unit == "requested":
            return RequestError(f"the prompt and the reply need {has:,} tokens; this engine takes at most {limit:,} "
                                f"(max_model_len) — {_FIX}, or ask for fewer --max-tokens")
        return RequestError(f"the prompt has {has:,} tokens; this engine takes at most {limit:,} (max_model_len), "
                            f"and the reply needs room too — {_FIX}")
    if "maximum context length" in msg or "maximum model length" in msg:
        msg += f" — {_FIX}"
    return RequestError(msg)


def too_long(error: BaseException, count: Callable[[], int]) -> BaseException:
    """``error`` with the prompt's exact count of tokens (``count()``) when vLLM gave characters or a lower bound."""
    if not isinstance(error, RequestError) or not ("characters, more than" in str(error)
                                                   or str(error).startswith("the prompt has at least")):
        return error
    try:
        n = count()
    except Exception:  # noqa: BLE001 - no tokenizer here: the characters' line stands
        return error
    limit = re.search(r"more than ([\d,]+) tokens|takes at most ([\d,]+)", str(error))
    return RequestError(f"the prompt has {n:,} tokens; this engine takes at most "
                        f"{(limit.group(1) or limit.group(2)) if limit else '?'} "
                        f"(max_model_len), and the reply needs room too — {_FIX}")
