"""``Generation``: the result of a generate call (``ui/render.py`` shows it)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import VllmNotebookError


class Generation:
    """Outputs of one generate call.

    ``text`` is the first completion, ``texts`` every completion (prompt-major),
    ``outputs`` vLLM's raw ``RequestOutput`` objects, ``params`` the
    ``SamplingParams`` used and ``metrics`` tokens, timings and finish reasons.
    """

    def __init__(self, prompts, outputs, params, engine, elapsed, ttft=None, interrupted=False, aborted=0,
                 reused=(), errors=None):
        self.prompts: list[str] = list(prompts)
        self.outputs: list[Any] = list(outputs)
        self.params = params
        self.engine = engine
        self.interrupted = interrupted
        self.aborted = aborted
        self.reused = len(reused)  # results taken from the journal instead of generated again
        self.errors: dict[int, str] = dict(errors or {})  # prompts that failed on their own: index -> one line
        self.provenance: dict[str, Any] = {}  # what made it: model, revision, versions, flags, sampling, node, job
        self.format = "auto"  # how it is shown: auto, markdown, text, json (``ui/render.py``)
        self.written_to: str | None = None  # where the texts went (``%generate --out-col``): shown instead of a table
        self.notes: list[str] = []  # what happened on the way (a replica died and its prompts went to the others)
        n_tokens = sum(len(c.token_ids) for o in self.outputs if o for c in o.outputs)
        reused = set(reused)
        new_tokens = sum(len(c.token_ids) for i, o in enumerate(self.outputs) if o and i not in reused
                         for c in o.outputs)
        self.metrics = {
            "prompts": len(self.prompts),
            "output_tokens": n_tokens,
            "elapsed_s": elapsed,
            "ttft_s": ttft,
            "tokens_per_s": new_tokens / elapsed if elapsed > 0 else 0.0,
            "from_journal": len(reused),
            "finish_reasons": dict(Counter(self.finish_reasons)),
        }

    # ------------------------------------------------------------ accessors
    @property
    def completions(self) -> list[tuple[int, Any]]:
        return [(i, c) for i, o in enumerate(self.outputs) if o is not None for c in o.outputs]

    @property
    def texts(self) -> list[str]:
        return [c.text for _, c in self.completions] if self.outputs else []

    def first_texts(self, missing: Any = "") -> list[Any]:
        """One text per prompt (its first completion), ``missing`` for a prompt that never started."""
        return [missing if o is None or not o.outputs else o.outputs[0].text for o in self.outputs]

    @property
    def text(self) -> str:
        texts = self.texts
        return texts[0] if texts else ""

    @property
    def finish_reasons(self) -> list[str]:
        out = []
        for i, o in enumerate(self.outputs):
            if o is None:
                out.append("error" if i in self.errors else "aborted")
            else:
                out.extend((c.finish_reason or ("aborted" if self.interrupted else "running")) for c in o.outputs)
        return out

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self):
        return iter(self.texts)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        m = self.metrics
        return (f"<Generation {m['prompts']} prompt(s), {len(self.texts)} completion(s), "
                f"{m['output_tokens']} tokens, finish={','.join(sorted(set(self.finish_reasons)))}>")

    def to_records(self) -> list[dict]:
        """One row per completion, in prompt order; a prompt that failed has one row with its ``error``."""
        rows = []
        done = {i: [] for i in range(len(self.prompts))}
        for i, c in self.completions:
            done[i].append({"prompt": self.prompts[i], "text": c.text, "tokens": len(c.token_ids),
                            "finish_reason": c.finish_reason or ("aborted" if self.interrupted else None)})
        for i in range(len(self.prompts)):
            if i in self.errors:
                done[i] = [{"prompt": self.prompts[i], "text": None, "tokens": 0, "finish_reason": "error",
                            "error": self.errors[i]}]
            rows += done[i]
        return rows

    def to_pandas(self):
        """A DataFrame with one row per completion (needs pandas: pip install pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise VllmNotebookError("to_pandas() needs pandas: pip install pandas") from None
        df = pd.DataFrame.from_records(self.to_records())
        df.attrs["provenance"] = dict(self.provenance)
        return df

    # ------------------------------------------------------------ display
    def footer(self) -> str:
        m = self.metrics
        parts = [f"{m['output_tokens']} tokens"]
        if self.reused and self.reused == m["prompts"]:  # nothing ran: no speed to tell (not "0.0 tok/s")
            parts.append(f"all {self.reused:,} from the journal, none generated")
        else:
            if m["ttft_s"] is not None and m["prompts"] == 1:
                parts.append(f"TTFT {m['ttft_s'] * 1000:.0f} ms")
            parts.append(f"{m['tokens_per_s']:.1f} tok/s")
            parts.append(f"{m['elapsed_s']:.2f} s")
        parts.append(f"finish: {reasons_text(m['finish_reasons'])}")
        if self.reused and self.reused != m["prompts"]:
            parts.append(f"{self.reused:,} of {m['prompts']:,} from the journal")
        if self.errors:
            first = min(self.errors)
            parts.append(f"{len(self.errors)} prompt(s) failed (.errors), e.g. prompt {first}: {self.errors[first]}")
        if self.interrupted:
            parts.append(f"interrupted: aborted {self.aborted} request(s), the text so far is kept")
        parts += self.notes
        return " · ".join(parts)

    @property
    def single(self) -> bool:
        """One prompt, one completion (shown as its text, not as a table)."""
        return len(self.prompts) == 1 and len(self.texts) <= 1


def reasons_text(counts: dict[str, int]) -> str:
    """``{"length": 3, "stop": 1}`` as ``length×3, stop``."""
    return ", ".join(k if v == 1 else f"{k}×{v}" for k, v in counts.items())
