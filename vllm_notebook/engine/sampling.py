"""Turning flags, dicts and ``SamplingParams`` into one ``SamplingParams`` (or a server request's fields)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError

DEFAULT_MAX_TOKENS = 256
STRUCTURED = ("json", "regex", "choice", "grammar")


def merge(base: Any = None, overrides: Mapping[str, Any] | None = None,
          defaults: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``defaults`` (the model's), then ``base`` (a dict or SamplingParams), then ``overrides``.

    Returns the sampling fields and the structured-output fields (``json``,
    ``regex``, ``choice``, ``grammar``) separately. ``None`` values in
    ``overrides`` mean "not given"; ``json_schema=`` is an alias of ``json=``.
    """
    merged: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    merged.update(defaults or {})
    if base is not None:
        merged.update(as_dict(base))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    structured = dict(merged.pop("structured_outputs", None) or {})
    if "json_schema" in merged:
        merged["json"] = merged.pop("json_schema")
    for key in STRUCTURED:
        if key in merged:
            structured[key] = merged.pop(key)
    if "json" in structured:
        structured["json"] = parse_schema(structured["json"])
    return merged, structured


def build_params(base: Any = None, overrides: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None):
    """One vLLM ``SamplingParams`` from :func:`merge`'s layers, validated by vLLM."""
    from . import vllm_api as _vllm

    merged, structured = merge(base, overrides, defaults)
    check_numbers(merged)
    try:
        return _vllm.sampling_params(structured or None, **merged)
    except TypeError as exc:
        raise UsageError(f"unknown sampling parameter: {exc}") from None
    except Exception as exc:  # vLLM's own validation (ValueError or VLLMValidationError)
        raise UsageError(str(exc).splitlines()[0]) from None


NUMBERS = {"temperature": float, "top_p": float, "min_p": float, "presence_penalty": float,
           "frequency_penalty": float, "repetition_penalty": float, "max_tokens": int, "min_tokens": int,
           "top_k": int, "n": int, "seed": int, "logprobs": int, "prompt_logprobs": int}


MAX_N = 1024  # completions per prompt: beyond this a typo (-n 1000000000) would exhaust the engine's memory


def check_numbers(fields: Mapping[str, Any]) -> None:
    """A one-line error for a number given as something else (``temperature="hot"``), or an absurd ``n``."""
    for name, kind in NUMBERS.items():
        value = fields.get(name)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int | float) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise UsageError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}")
    if isinstance(fields.get("n"), int) and fields["n"] > MAX_N:
        raise UsageError(f"n (completions per prompt) must be at most {MAX_N}, not {fields['n']:,}")


# Sampling fields the OpenAI-compatible server takes (vLLM's CompletionRequest extras included).
REQUEST_FIELDS = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "logprobs",
    "prompt_logprobs", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "truncate_prompt_tokens", "allowed_token_ids", "bad_words", "logit_bias", "length_penalty",
})


def request_fields(base: Any = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON sampling fields of an OpenAI-compatible request (no vLLM import needed).

    Values are checked by the server, which answers a bad one with a one-line 400.
    """
    merged, structured = merge(base, overrides)
    check_numbers(merged)
    unknown = sorted(set(merged) - REQUEST_FIELDS)
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], REQUEST_FIELDS, n=1)
        raise UsageError(f"unknown sampling parameter {unknown[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    if structured:
        merged["structured_outputs"] = structured
    return merged


def as_dict(base: Any) -> dict[str, Any]:
    """Sampling settings as a dict: a dict as it is; a ``SamplingParams``' fields that differ from vLLM's defaults."""
    if isinstance(base, Mapping):
        return dict(base)
    if type(base).__name__ != "SamplingParams":
        raise _not_params(base)
    from . import vllm_api as _vllm

    if isinstance(base, _vllm.SamplingParams):
        out = {}
        fresh = _vllm.SamplingParams()
        for name in base.__struct_fields__ if hasattr(base, "__struct_fields__") else vars(base):
            if name.startswith("_") or name == "output_kind":
                continue
            value = getattr(base, name)
            if value != getattr(fresh, name, None):
                out[name] = value
        if out.get("structured_outputs") is not None:
            so = out["structured_outputs"]
            keys = (*STRUCTURED, "disable_any_whitespace", "whitespace_pattern")
            out["structured_outputs"] = {k: getattr(so, k) for k in keys if getattr(so, k, None) is not None}
        return out
    raise _not_params(base)


def _not_params(base: Any) -> UsageError:
    return UsageError(f"sampling parameters must be a dict or SamplingParams, not {type(base).__name__}")


def parse_schema(value: Any, namespace: Mapping[str, Any] | None = None) -> dict:
    """A JSON schema from a dict, inline JSON text, a file path, or a variable name."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "model_json_schema"):  # a pydantic model class
        return value.model_json_schema()
    if not isinstance(value, str):
        raise UsageError(f"--json-schema takes JSON text, a file or a variable, not {type(value).__name__}")
    text = value.strip()
    if namespace is not None and text.isidentifier() and text in namespace:
        return parse_schema(namespace[text])
    if not text.startswith(("{", "[")) and os.path.exists(os.path.expanduser(text)):
        try:
            with open(os.path.expanduser(text)) as f:
                text = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read the JSON schema file {value!r}: {exc.strerror}") from None
    elif not text.startswith(("{", "[")) and text.isidentifier():
        raise UsageError(f"--json-schema: no variable or file named {text!r}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json-schema is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise UsageError("--json-schema must be a JSON object")
    return schema
