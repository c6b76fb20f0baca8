"""Engines: the protocol every back-end implements, and the in-kernel back-end.

- ``base``: ``Engine``, the protocol, with the request machinery both back-ends share;
- ``local``: ``LocalEngine``, vLLM's ``AsyncLLM`` in this kernel;
- ``vllm_api``: the one module that touches vLLM (imported on first load, never at ``%load_ext``);
- ``registry``: this kernel's engines by name;
- ``generation``, ``sampling``, ``prompts``: results, sampling parameters, prompt handling;
- ``sleep``, ``gpus``: sleep mode and GPU memory as NVML sees it.

The server back-end, ``ServerEngine``, lives in ``vllm_notebook.server``.
"""
