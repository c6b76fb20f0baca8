"""Beyond generation: embeddings, document ranking, and multiple-choice scoring by log-probability.

``Pooling`` is what an embedding request asks (the back-end makes it vLLM's ``PoolingParams`` or an
``/v1/embeddings`` body); ``Pooled`` is one answer, shaped alike from both back-ends. ``Ranking`` and
``ChoiceScores`` are the tables ``Engine.score`` and ``Engine.score_choices`` return. Choice scoring
follows lm-evaluation-harness: the continuation's tokens are those of ``encode(context + choice)`` after
``encode(context)``, and their log-probabilities come from the engine's ``prompt_logprobs``.
Nothing here imports vLLM; NumPy is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..tables import Table


@dataclass(frozen=True)
class Pooling:
    """An embedding request: vLLM's pooling task and its options."""

    task: str = "embed"
    dimensions: int | None = None


@dataclass
class Pooled:
    """One pooling result: the vector (a NumPy array) and the prompt's tokens."""

    request_id: str
    data: Any
    prompt_token_ids: list[int] = field(default_factory=list)
    finished: bool = True
    outputs: list = field(default_factory=list)  # no completions (so code that counts tokens sees none)


def stack(vectors: Sequence[Any]):
    import numpy as np

    return np.stack([np.asarray(v, dtype=np.float32) for v in vectors]) if vectors else np.zeros((0, 0), np.float32)


def cosine(query, documents):
    """Cosine similarity of one vector with each row of a matrix (what vLLM's bi-encoder scoring computes)."""
    import numpy as np

    q = np.asarray(query, dtype=np.float64)
    d = np.asarray(documents, dtype=np.float64)
    return (d @ q) / np.maximum(np.linalg.norm(d, axis=1) * np.linalg.norm(q), 1e-12)


# ------------------------------------------------------------------ ranking
class Ranking(Table):
    """Documents ranked by their score against a query (best first)."""

    COLUMNS = ("rank", "score", "#", "document")

    def __init__(self, query: str, documents: Sequence[str], scores: Sequence[float]):
        self.query = query
        self.documents = list(documents)
        self.scores = [float(s) for s in scores]

    @property
    def order(self) -> list[int]:
        """Document indexes, best first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])

    @property
    def best(self) -> str:
        return self.documents[self.order[0]]

    def title(self) -> str:
        return f"ranked against {self.query!r}"

    def rows(self) -> list[tuple]:
        return [(r + 1, f"{self.scores[i]:.4f}", i, _cut(self.documents[i])) for r, i in enumerate(self.order)]

    def to_pandas(self):
        pd = _pandas()
        df = pd.DataFrame({"document": self.documents, "score": self.scores})
        return df.iloc[self.order].rename_axis("index").reset_index()


# ------------------------------------------------------------------ multiple choice
def encode_pair(encode: Callable[[str, bool], list[int]], context: str, choice: str) -> tuple[list[int], list[int]]:
    """The context's tokens and the choice's, as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the choice; the choice's tokens are the tail of
    ``encode(context + choice)``, so tokens merged across the boundary are scored as the model sees them.
    """
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    whole = encode(context + choice, True)
    ctx = encode(context, True)
    if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
        return ctx, encode(choice, False)
    return ctx, whole[len(ctx):]


def continuation_logprob(prompt_logprobs: Sequence[Any] | None, token_ids: Sequence[int], start: int) -> float:
    """The sum of log-probabilities of ``token_ids[start:]`` from a request's ``prompt_logprobs``."""
    if not prompt_logprobs:
        return math.nan
    total = 0.0
    for pos in range(start, len(token_ids)):
        step = prompt_logprobs[pos] or {}
        lp = step.get(token_ids[pos], step.get(str(token_ids[pos])))
        if lp is None:
            return math.nan
        total += float(getattr(lp, "logprob", lp))
    return total


class ChoiceScores(Table):
    """Log-probability of each choice after each question: total, per token, and the best choice by each.

    One question shows one row per choice; several show one row per question (``to_pandas(long=True)``
    gives a row per question and choice).
    """

    def __init__(self, questions: Sequence[str], choices: Sequence[Sequence[str]],
                 logprobs: Sequence[Sequence[float]], tokens: Sequence[Sequence[int]], interrupted: bool = False):
        self.questions = list(questions)
        self.choices = [list(c) for c in choices]
        self.logprobs = [list(x) for x in logprobs]
        self.tokens = [list(x) for x in tokens]
        self.interrupted = interrupted

    def per_token(self, q: int) -> list[float]:
        return [lp / n if n else math.nan for lp, n in zip(self.logprobs[q], self.tokens[q])]

    @property
    def best(self) -> str | None:
        """The first question's best choice (as ``Ranking.best`` is the best document); ``answers`` has every
        question's, ``best_of(q, normalized=True)`` the per-token one."""
        return self.best_of(0)

    def best_of(self, q: int = 0, normalized: bool = False) -> str | None:
        """The choice with the highest total (or, ``normalized``, per-token) log-probability."""
        values = self.per_token(q) if normalized else self.logprobs[q]
        scored = [(v, i) for i, v in enumerate(values) if not math.isnan(v)]
        return self.choices[q][max(scored)[1]] if scored else None

    @property
    def answers(self) -> list[str | None]:
        """The best choice (by total log-probability) of each question."""
        return [self.best_of(q) for q in range(len(self.questions))]

    @property
    def COLUMNS(self) -> tuple[str, ...]:  # noqa: N802 - Table's name
        if len(self.questions) == 1:
            return ("choice", "logprob", "tokens", "per token", "best")
        return ("#", "question", "best", "best per token", *[f"logprob {c}" for c in self._shared_choices()])

    def _shared_choices(self) -> list[str]:
        return self.choices[0] if all(c == self.choices[0] for c in self.choices) else []

    def rows(self) -> list[tuple]:
        if len(self.questions) == 1:
            best, best_norm = self.best_of(0), self.best_of(0, normalized=True)
            return [(c, f"{lp:.4f}", n, f"{pt:.4f}", _mark(c == best, c == best_norm))
                    for c, lp, n, pt in zip(self.choices[0], self.logprobs[0], self.tokens[0], self.per_token(0))]
        shared = bool(self._shared_choices())
        return [(q, _cut(text), self.best_of(q), self.best_of(q, normalized=True),
                 *([f"{lp:.4f}" for lp in self.logprobs[q]] if shared else []))
                for q, text in enumerate(self.questions)]

    def title(self) -> str:
        note = " (interrupted: unscored choices are NaN)" if self.interrupted else ""
        if len(self.questions) == 1:
            return f"{_cut(self.questions[0], 120)!r}: best {self.best_of(0)!r}{note}"
        return f"{len(self.questions)} questions{note}"

    def to_pandas(self, long: bool = False):
        """One row per question (``best``, ``best_per_token``, ``logprob[choice]`` columns), or ``long=True``:
        one row per question and choice (``logprob``, ``tokens``, ``per_token``)."""
        pd = _pandas()
        if long:
            rows = [{"question": self.questions[q], "choice": c, "logprob": lp, "tokens": n, "per_token": pt}
                    for q in range(len(self.questions))
                    for c, lp, n, pt in zip(self.choices[q], self.logprobs[q], self.tokens[q], self.per_token(q))]
            return pd.DataFrame.from_records(rows, columns=["question", "choice", "logprob", "tokens", "per_token"])
        rows = []
        for q, text in enumerate(self.questions):
            row = {"question": text, "best": self.best_of(q), "best_per_token": self.best_of(q, normalized=True)}
            row.update({f"logprob[{c}]": lp for c, lp in zip(self.choices[q], self.logprobs[q])})
            rows.append(row)
        return pd.DataFrame.from_records(rows)


def parse_choices(text: str) -> list[str]:
    """``"A,B,C,D"`` (or ``" yes| no"`` with ``|``) as choices; spaces inside a choice are kept."""
    sep = "|" if "|" in text else ","
    choices = [c for c in text.split(sep) if c != ""]
    if len(choices) < 2:
        raise UsageError(f"--choices needs two choices or more, separated by commas (or |), not {text!r}")
    return choices


def _mark(best: bool, best_norm: bool) -> str:
    return "total, per token" if best and best_norm else "total" if best else "per token" if best_norm else ""


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise UsageError("to_pandas() needs pandas: pip install pandas") from None
    return pd
