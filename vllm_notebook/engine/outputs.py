"""Results shaped like vLLM's ``RequestOutput``: what a server streams back, and what the journal restores."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class Completion:
    """One completion of a request, with the fields of vLLM's ``CompletionOutput`` that we use."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: token id -> log-probability


@dataclass
class RequestOutput:
    """A request's (cumulative) output, shaped like vLLM's ``RequestOutput``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] = field(default_factory=list)
    outputs: list[Completion] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token, when asked

    def apply(self, data: dict, chat: bool) -> None:
        """Add one response (or one streamed chunk) of the completions or chat API."""
        if data.get("prompt_token_ids") and not self.prompt_token_ids:  # a continuation keeps the first prompt
            self.prompt_token_ids = list(data["prompt_token_ids"])
        for ch in data.get("choices") or ():
            i = int(ch.get("index", 0))
            while len(self.outputs) <= i:
                self.outputs.append(Completion(index=len(self.outputs)))
            c = self.outputs[i]
            if chat:
                c.text += (ch.get("delta") or ch.get("message") or {}).get("content") or ""
            else:
                c.text += ch.get("text") or ""
            c.token_ids.extend(ch.get("token_ids") or ())
            if ch.get("prompt_token_ids") and not self.prompt_token_ids:
                self.prompt_token_ids = list(ch["prompt_token_ids"])
            if ch.get("prompt_logprobs") is not None:
                self.prompt_logprobs = [None if step is None else {int(t): float(v["logprob"] if isinstance(v, dict)
                                                                                  else v) for t, v in step.items()}
                                        for step in ch["prompt_logprobs"]]
            if ch.get("finish_reason"):
                c.finish_reason, c.stop_reason = ch["finish_reason"], ch.get("stop_reason")
        self.finished = bool(self.outputs) and all(c.finish_reason for c in self.outputs)


def continuation(fields: dict, cut: RequestOutput | None) -> tuple[dict, dict] | None:
    """The completions request that continues ``cut``, a single streamed completion that a server's end broke off:
    the prompt's tokens and those generated so far as the prompt, the tokens left as ``max_tokens`` (0: every token
    was made, only the end was cut off). ``cut`` is reset to go on (its text and tokens stay first). None when it
    cannot be continued (nothing generated yet, token ids unknown, n > 1, prompt logprobs asked for); then the
    request is sent again whole. Stop strings across the cut: ``StopsAcrossCut``."""
    done = cut.outputs[0] if cut is not None and len(cut.outputs) == 1 else None
    if done is None or not done.token_ids or not cut.prompt_token_ids or fields.get("prompt_logprobs") is not None:
        return None
    fields, made = dict(fields), len(done.token_ids)
    if fields.get("max_tokens") is not None:
        fields["max_tokens"] = max(0, int(fields["max_tokens"]) - made)
    if fields.get("min_tokens"):
        fields["min_tokens"] = max(0, int(fields["min_tokens"]) - made)
    done.finish_reason = done.stop_reason = None  # e.g. "abort" from a dying server
    cut.finished = False
    return {"prompt_token_ids": cut.prompt_token_ids + done.token_ids}, fields


def stop_strings(fields: dict) -> list[str]:
    """The request's stop strings (``stop`` is one string or a list)."""
    stop = fields.get("stop") or ()
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


class StopsAcrossCut:
    """What a continued stream checks itself: a stop string that begins in the text made before the cut and ends in
    the successor's. Each server sees only its own text, so neither would find it.

    ``held``: the end of the text made before the cut that the first server had not streamed yet (vLLM holds back
    the last ``len(longest stop) - 1`` characters, which could begin a stop string). It joins the text here; the
    text shown stays what was streamed until the successor's text rules out a stop across the cut. ``watch``: False
    while fewer tokens than ``min_tokens`` were made (vLLM checks no stop string before), then only ``held`` counts.
    """

    def __init__(self, out: RequestOutput, held: str, stop: list[str], include: bool, watch: bool = True):
        c = out.outputs[0]
        self.shown, self.stop, self.include = len(c.text), stop if watch else [], include or not watch
        c.text += held
        self.cut, self.longest = len(c.text), max(map(len, stop))

    def check(self, out: RequestOutput) -> tuple[RequestOutput, bool]:
        """``(what to show, whether the request ends here)``; a stop found ends the output as vLLM would."""
        c = out.outputs[0]
        found = [(p, s) for s in self.stop if -1 < (p := c.text.find(s, max(0, self.cut - len(s) + 1))) < self.cut]
        if found:
            p, s = min(found)
            c.text = c.text[:p + len(s) if self.include else p]
            c.finish_reason, c.stop_reason, out.finished = "stop", s, True
            return out, True
        if self.include or c.finish_reason or len(c.text) >= self.cut + self.longest - 1:
            return out, False
        return replace(out, outputs=[replace(c, text=c.text[:self.shown])]), False


def from_record(request_id: str, prompt: str | None, record: dict) -> RequestOutput:
    """A finished output again, from a journal result."""
    outs = []
    for k, c in enumerate(record.get("outputs") or ()):
        logprobs = [{int(t): lp for t, lp in step.items()} for step in c["logprobs"]] if c.get("logprobs") else None
        outs.append(Completion(index=k, text=c.get("text", ""), token_ids=list(c.get("token_ids") or ()),
                               finish_reason=c.get("finish_reason"), stop_reason=c.get("stop_reason"),
                               logprobs=logprobs))
    return RequestOutput(request_id, prompt, list(record.get("prompt_token_ids") or ()), outs, finished=True)


def merged(previous, out):
    """``out`` with every completion of the request so far: a streamed request with ``n > 1`` comes from vLLM as
    one output per step of each sample (only that sample's completion in it), so the request's state keeps the
    latest of each sample, by index. Outputs that already hold every sample are returned as they are."""
    if previous is None or previous is out:
        return out
    by_index = {getattr(c, "index", k): c for k, c in enumerate(previous.outputs)}
    new = {getattr(c, "index", k): c for k, c in enumerate(out.outputs)}
    if set(new) >= set(by_index):
        return out
    by_index.update(new)
    out.outputs = [by_index[k] for k in sorted(by_index)]
    return out

