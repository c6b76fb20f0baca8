"""What an engine does besides generating: embeddings, ranking, choice scoring, and LoRA adapters.

``TaskMethods`` is part of ``Engine`` (core.py): these methods use the same request machinery as
generation (one event loop, Ctrl-C aborts, one-line errors), so they work on every back-end. A back-end
supplies only what differs: how a pooling request goes out (``request`` with a ``Pooling``), how text
becomes tokens (``token_ids``), how a server scores (``scores``) and how adapters are added or removed
(``add_lora`` / ``remove_lora``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from .lora import Adapter
from .pooling import (
    ChoiceScores,
    Pooling,
    Ranking,
    continuation_logprob,
    cosine,
    encode_pair,
    stack,
)


class TaskMethods:
    """Embeddings, ranking, multiple-choice scoring and adapters (mixed into ``Engine``)."""

    # ---------------------------------------------------------------- what kind of model
    @property
    def runner(self) -> str | None:
        """``"generate"`` or ``"pooling"`` (vLLM's ``--runner``); None when the engine does not say."""
        return self.facts.get("runner")

    def _check_runner(self, pooling: bool) -> None:
        runner = self.runner
        if pooling and runner == "generate":
            raise UsageError(f"engine '{self.name}' generates text; embeddings and ranking need a pooling model: "
                             f"%vllm_load {self.model} --runner pooling --name emb (beside this one)")
        if not pooling and runner == "pooling":
            raise UsageError(f"engine '{self.name}' is a pooling model (--runner pooling): it embeds and ranks "
                             "(%embed, engine.embed(), engine.score()); load a generator for %%generate")

    # ---------------------------------------------------------------- embeddings and ranking
    def embed(self, texts: str | Sequence[str], *, lora: str | Sequence[str | None] | None = None,
              dimensions: int | None = None):
        """One embedding per text, as a NumPy array (texts × dimensions), in the texts' order.

        Needs a pooling engine (``--runner pooling``). Ctrl-C aborts the requests; the engine stays.
        """
        batch = _texts(texts, "embed()")
        run = self._submit(batch, Pooling("embed", dimensions), stream=False,
                           loras=self.adapters.for_prompts(lora, len(batch)))
        try:
            for _ in self._events(run):
                pass
        except BaseException:
            self._stop_run(run)
            self._account(run, sum(1 for o in run.outputs if o is None))
            raise
        self._account(run, 0)
        return stack([o.data for o in run.outputs])

    def score(self, query: str, documents: str | Sequence[str], *, lora: str | None = None) -> Ranking:
        """Rank ``documents`` by their similarity to ``query`` (best first): a ``Ranking`` table.

        In-kernel engines score embedding models by cosine similarity (what ``LLM.score`` does for them);
        a server scores with vLLM's ``/score`` endpoint (embedding models and cross-encoders).
        """
        if not isinstance(query, str):
            raise UsageError(f"score() takes one query (a str), not {type(query).__name__}")
        docs = _texts(documents, "score()")
        return Ranking(query, docs, self._score(query, docs, lora))

    def _score(self, query: str, documents: list[str], lora: str | None) -> list[float]:
        self._check()
        own = self.backend.scores(query, documents, lora)
        if own is not None:
            return own
        vectors = self.embed([query, *documents], lora=lora)
        return [float(x) for x in cosine(vectors[0], vectors[1:])]

    # ---------------------------------------------------------------- multiple choice
    def score_choices(self, prompts: str | Sequence[str], choices: Sequence[str] | Sequence[Sequence[str]], *,
                      lora: str | None = None) -> ChoiceScores:
        """The log-probability of each choice as the continuation of each prompt (total and per token).

        ``choices``: one list for every prompt, or one list per prompt. All pairs go to the engine at once
        (``prompt_logprobs``, one generated token each). Returns a ``ChoiceScores`` table.
        """
        questions = _texts(prompts, "score_choices()")
        if not choices:
            raise UsageError("score_choices() needs choices, e.g. [' A', ' B', ' C', ' D']")
        per_question = [list(choices)] * len(questions) if isinstance(choices[0], str) else [list(c) for c in choices]
        if len(per_question) != len(questions):
            raise UsageError(f"{len(per_question)} lists of choices for {len(questions)} prompts: give one list, "
                             "or one per prompt")
        if any(len(c) < 2 or not all(isinstance(x, str) and x for x in c) for c in per_question):
            raise UsageError("each question needs two choices or more, each a non-empty str")
        pairs = [encode_pair(self.token_ids, q, c) for q, cs in zip(questions, per_question) for c in cs]
        params = self.params(None, {"max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
        gen = self.run([{"prompt_token_ids": ctx + cont} for ctx, cont in pairs], params, journal_results=False,
                       lora=lora)
        logprobs, tokens, k = [], [], 0
        for cs in per_question:
            row_lp, row_n = [], []
            for _ in cs:
                ctx, cont = pairs[k]
                out = gen.outputs[k]
                lp = getattr(out, "prompt_logprobs", None) if out is not None and out.finished else None
                row_lp.append(continuation_logprob(lp, ctx + cont, len(ctx)) if lp else math.nan)
                row_n.append(len(cont))
                k += 1
            logprobs.append(row_lp)
            tokens.append(row_n)
        return ChoiceScores(questions, per_question, logprobs, tokens, interrupted=gen.interrupted)

    # ---------------------------------------------------------------- LoRA adapters
    @property
    def loras(self) -> dict[str, str]:
        """The LoRA adapters requests can name: name → folder."""
        return {a.name: a.path for a in self.adapters}

    def add_lora(self, name: str, path: str) -> Adapter:
        """Load a LoRA adapter (a PEFT folder) so requests can use it as ``lora=name``."""
        self._check()
        adapter = self.adapters.new(name, path, check_rank=self.backend.checks_rank)
        self._call(self.backend.add_lora(adapter))
        self.adapters.add(adapter)
        return adapter

    def remove_lora(self, name: str) -> None:
        """Unload the adapter ``name`` (requests naming it fail from now on)."""
        self._check()
        adapter = self.adapters.get(name)
        self._call(self.backend.remove_lora(adapter))
        self.adapters.pop(name)


def _texts(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise UsageError(f"{what} takes a str or a list of str, not {type(value).__name__}") from None
    if not items:
        raise UsageError(f"{what}: the list is empty")
    bad = next((x for x in items if not isinstance(x, str)), None)
    if bad is not None:
        raise UsageError(f"{what} takes a list of str; it holds a {type(bad).__name__}")
    return items
