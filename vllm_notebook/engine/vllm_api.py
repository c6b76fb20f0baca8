"""Every touch of vLLM lives here, so supporting a new vLLM release is one file's work.

Supported: vLLM 0.26 to 0.33 (tested: 0.26 CUDA on an H200, 0.32 CPU). Where the two
differ, the difference is handled here and says which release has what.
Nothing in this module is imported at ``%load_ext`` time.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import vllm
from vllm import PoolingParams, SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: F401 - LocalBackend tells a dead engine by it

VERSION = vllm.__version__
FINAL_ONLY = RequestOutputKind.FINAL_ONLY
CUMULATIVE = RequestOutputKind.CUMULATIVE


class _Parser(FlexibleArgumentParser):
    """vLLM's parser, but errors raise instead of calling ``sys.exit``."""

    def error(self, message):  # noqa: D401 - argparse API
        raise argparse.ArgumentError(None, message)

    def exit(self, status=0, message=None):
        raise SystemExit(status)


def engine_arg_parser(prog: str) -> argparse.ArgumentParser:
    """A parser holding every engine flag of ``vllm serve``, from vLLM's own definitions."""
    parser = _Parser(prog=prog, add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def serve_arg_parser(prog: str) -> argparse.ArgumentParser:
    """Every flag of ``vllm serve`` (frontend and engine), with its ``model_tag`` positional."""
    try:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser(_Parser(prog=prog, add_help=False))


def engine_args_from_namespace(ns: argparse.Namespace) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(ns)


def engine_args(**kwargs: Any) -> AsyncEngineArgs:
    return AsyncEngineArgs(**kwargs)


def engine_arg_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def _usage_logger(sink: dict[str, Any]):
    """A stat logger that only keeps the scheduler's latest KV-cache use and queue lengths.

    Only for an engine with stats on: a custom logger turns vLLM's per-token stats on.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class UsageLogger(StatLoggerBase):
        def __init__(self, vllm_config=None, engine_index: int = 0):
            pass

        def record(self, scheduler_stats=None, iteration_stats=None, *args, **kwargs):
            if scheduler_stats is not None:
                sink["kv_cache_usage"] = scheduler_stats.kv_cache_usage
                sink["running"] = scheduler_stats.num_running_reqs
                sink["waiting"] = scheduler_stats.num_waiting_reqs

        def log_engine_initialized(self):
            pass

    return UsageLogger


def start_engine(args: AsyncEngineArgs, usage: dict[str, Any] | None = None) -> AsyncLLM:
    """Create the engine. Call inside the running event loop that will drive it.

    The usage context is the ``LLM`` class's: vLLM derives defaults from it
    (max_num_seqs, max_num_batched_tokens), and a notebook engine is used the way
    ``LLM`` is, so it gets the same defaults as ``vllm.LLM(...)`` would.
    """
    from vllm.usage.usage_lib import UsageContext

    # Stats cost about a quarter of the front-end's time on big batches (per-token accounting and the loggers;
    # profiled at 1,024 prompts on CPU). Like ``LLM``, the engine runs without them unless asked
    # (``disable_log_stats=False``); only then does ``usage`` get the scheduler's KV-cache use.
    loggers = [_usage_logger(usage)] if usage is not None and not args.disable_log_stats else None
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS, stat_loggers=loggers)


def stop_engine(llm: AsyncLLM) -> None:
    llm.shutdown()


def free_memory() -> None:
    """Release distributed state and cached device memory after an engine is gone."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


def sleep_mode_enabled(llm: AsyncLLM) -> bool:
    return bool(getattr(llm.vllm_config.model_config, "enable_sleep_mode", False))


async def sleep(llm: AsyncLLM, level: int) -> None:
    await llm.sleep(level)


async def wake(llm: AsyncLLM, level: int) -> None:
    """Wake from ``level``; level 2 dropped the weights, so they are reloaded before the KV cache returns."""
    if level >= 2:
        await llm.wake_up(["weights"])
        await llm.collective_rpc("reload_weights")
        await llm.wake_up(["kv_cache"])
    else:
        await llm.wake_up(None)


def render_batch(llm: AsyncLLM, prompts: list) -> list | None:
    """Tokenize a batch of text and token-id prompts in one call, the way ``LLM.generate`` does.

    Requests of rendered prompts skip ``AsyncLLM``'s per-request tokenization (0.32 hands each raw prompt
    to a thread, then back to the loop): about a fifth less front-end CPU on a big batch, which on a small
    node is CPU the engine core gets. Both 0.26 and 0.32 have ``Renderer.render_cmpl``. ``None`` when the
    batch cannot be rendered at once (say one prompt is too long): the requests then go one by one, so
    each error is told with its own prompt.
    """
    renderer = getattr(llm, "renderer", None)
    if renderer is None or not hasattr(renderer, "render_cmpl"):
        return None
    try:
        return renderer.render_cmpl([{"prompt": p} if isinstance(p, str) else p for p in prompts])
    except Exception:  # noqa: BLE001 - the per-request path tells the error
        return None


def tokens_in_flight(llm: AsyncLLM, request_ids: set[str]) -> int | None:
    """Output tokens so far of the unfinished requests ``request_ids`` (the front end's detokenizer counts them
    even when only final outputs are sent), or None where this vLLM keeps them elsewhere. Read from another thread:
    the state dict is copied in one C call, and each count is one ``len``."""
    try:
        states = list(llm.output_processor.request_states.values())
        total = 0
        for state in states:
            parent = state.parent_req
            rid = getattr(state, "external_req_id", None) or (parent.request_id if parent else state.request_id)
            if rid in request_ids:
                total += state.detokenizer.num_output_tokens()
        return total
    except (AttributeError, RuntimeError):
        return None


def default_sampling(llm: AsyncLLM) -> dict[str, Any]:
    """The model's generation-config defaults (what ``LLM.generate`` applies too)."""
    get = getattr(llm.model_config, "get_diff_sampling_param", None)
    return dict(get() or {}) if get else {}


def tokenizer(llm: AsyncLLM):
    tok = getattr(llm, "tokenizer", None)
    if tok is None and hasattr(llm, "get_tokenizer"):
        tok = llm.get_tokenizer()
    return tok


def engine_facts(llm: AsyncLLM) -> dict[str, Any]:
    """Model, dtype, lengths, parallel sizes and KV-cache capacity of a started engine."""
    cfg = llm.vllm_config
    par = cfg.parallel_config
    cache = cfg.cache_config
    blocks = cache.num_gpu_blocks or 0
    return {
        "model": cfg.model_config.model,
        "served_model_name": cfg.model_config.served_model_name,
        "dtype": str(cfg.model_config.dtype).replace("torch.", ""),
        "max_model_len": cfg.model_config.max_model_len,
        "tensor_parallel_size": par.tensor_parallel_size,
        "pipeline_parallel_size": par.pipeline_parallel_size,
        "data_parallel_size": getattr(par, "data_parallel_size", 1),
        "executor": str(par.distributed_executor_backend),
        "device": _device_name(),
        "kv_cache_tokens": blocks * (cache.block_size or 0),
        "max_num_seqs": getattr(cfg.scheduler_config, "max_num_seqs", None),
        "vllm_version": VERSION,
        "runner": getattr(cfg.model_config, "runner_type", None),
        "lora": {"max_lora_rank": cfg.lora_config.max_lora_rank, "max_loras": cfg.lora_config.max_loras}
        if cfg.lora_config is not None else None,
    }


def _device_name() -> str:
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_name", None) or current_platform.device_type)


def device_count() -> int:
    """Visible accelerators, counted without initialising CUDA (0 on the CPU build)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return 0
    if hasattr(current_platform, "device_count"):
        return int(current_platform.device_count())
    import torch  # platforms without device_count() (ROCm, XPU): torch counts without initialising either

    return torch.cuda.device_count()


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def sampling_params(structured: dict[str, Any] | None = None, **kwargs: Any) -> SamplingParams:
    if structured:
        kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
    return SamplingParams(**kwargs)


def supported_architectures() -> set[str]:
    """Model architectures (``config.json`` ``architectures``) this vLLM can run."""
    from vllm import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def pooling_params(task: str, dimensions: int | None = None) -> PoolingParams:
    return PoolingParams(task=task, dimensions=dimensions)


def pooled_vector(out) -> Any:
    """A ``PoolingRequestOutput``'s vector as a float32 NumPy array."""
    data = out.outputs.data
    return data.float().cpu().numpy() if hasattr(data, "cpu") else data


def lora_request(adapter) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, adapter.id, adapter.path)


def lora_parser_action() -> type:
    """The argparse action of ``vllm serve --lora-modules`` (``name=path`` or JSON)."""
    try:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import LoRAParserAction
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.openai.cli_args import LoRAParserAction
    return LoRAParserAction


def vllm_loggers() -> list[logging.Logger]:
    return [logging.getLogger("vllm")]
