"""Engines: the one ``Engine`` class, and what it is made of.

- ``core``: ``Engine``, one concrete class over a back-end (``vllm_notebook.backends``): submitting batches,
  streaming, Ctrl-C and Stop, results, the journal, statistics, sleep and wake;
- ``requests``: ``Run`` and the prompt and error helpers the engine and its back-ends share;
- ``tasks``: embeddings, ranking, choice scoring and adapters (part of ``Engine``);
- ``vllm_api``: the one module that touches vLLM (imported on first load, never at ``%load_ext``);
- ``registry``: this kernel's engines by name;
- ``generation``, ``outputs``, ``sampling``, ``prompts``, ``pooling``, ``lora``: results, sampling parameters,
  prompts, pooling requests and LoRA adapters;
- ``journal``: every result appended as it finishes; ``compare``: several engines or settings side by side;
- ``sleep``, ``gpus``: sleep mode and GPU memory as NVML sees it.
"""
