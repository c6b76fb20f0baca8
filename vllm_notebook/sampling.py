"""Turning flags, dicts and ``SamplingParams`` into one ``SamplingParams``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .errors import UsageError

DEFAULT_MAX_TOKENS = 256
STRUCTURED = ("json", "regex", "choice", "grammar")


def build_params(base: Any = None, overrides: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None):
    """``defaults`` (the model's), then ``base`` (a dict or SamplingParams), then ``overrides``.

    ``None`` values in ``overrides`` mean "not given". Structured output can be
    given as ``json=``/``json_schema=``, ``regex=``, ``choice=`` or ``grammar=``.
    """
    from . import _vllm

    merged: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    merged.update(defaults or {})
    if base is not None:
        merged.update(_as_dict(base))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    structured = dict(merged.pop("structured_outputs", None) or {})
    if "json_schema" in merged:
        merged["json"] = merged.pop("json_schema")
    for key in STRUCTURED:
        if key in merged:
            structured[key] = merged.pop(key)
    if "json" in structured:
        structured["json"] = parse_schema(structured["json"])
    try:
        return _vllm.sampling_params(structured or None, **merged)
    except TypeError as exc:
        raise UsageError(f"unknown sampling parameter: {exc}") from None
    except Exception as exc:  # vLLM's own validation (ValueError or VLLMValidationError)
        raise UsageError(str(exc).splitlines()[0]) from None


def _as_dict(base: Any) -> dict[str, Any]:
    if isinstance(base, Mapping):
        return dict(base)
    from . import _vllm

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
            out["structured_outputs"] = {k: getattr(so, k) for k in STRUCTURED if getattr(so, k, None) is not None}
        return out
    raise UsageError(f"sampling parameters must be a dict or SamplingParams, not {type(base).__name__}")


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
