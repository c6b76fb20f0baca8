"""``vllm_notebook.embed`` / ``score`` / ``score_choices``: an engine's method, on the engine named (or the only one)."""

from __future__ import annotations

from collections.abc import Sequence

from .pooling import ChoiceScores, Ranking
from .registry import get_engine


def embed(texts: str | Sequence[str], *, name: str | None = None, **options):
    """Embeddings of ``texts`` from engine ``name`` (default: the only one): a NumPy array."""
    return get_engine(name).embed(texts, **options)


def score(query: str, documents: str | Sequence[str], *, name: str | None = None, **options) -> Ranking:
    """``documents`` ranked against ``query`` by engine ``name`` (a pooling engine, or a server's ``/score``)."""
    return get_engine(name).score(query, documents, **options)


def score_choices(prompts, choices, *, name: str | None = None, **options) -> ChoiceScores:
    """Each choice's log-probability after each prompt, from engine ``name``."""
    return get_engine(name).score_choices(prompts, choices, **options)
