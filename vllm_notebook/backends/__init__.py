"""Back-ends: what runs an engine, behind one contract (``base.Backend``).

- ``local``: ``LocalBackend``, vLLM's ``AsyncLLM`` in this kernel;
- ``server``: ``ServerBackend``, a vLLM OpenAI-compatible server over HTTP (one we started or any other);
- ``slurm``: ``SlurmBackend``, a server in a Slurm batch job, wrapping a ``ServerBackend`` once it is up.

Only this package tells back-ends apart; the rest of vllm-notebook uses ``Engine`` and the contract.
"""
