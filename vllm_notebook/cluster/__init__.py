"""The cluster: the Slurm allocation, parallel plans, the Ray cluster, Slurm queries, job scripts.

- ``allocation``: ``Allocation.from_env`` (pure parsers of ``SLURM_*``);
- ``plan``: tensor/pipeline parallel sizes from an allocation and a model;
- ``ray``: the token-protected Ray cluster across the allocation;
- ``slurm``: questions for ``squeue``, asked once for many jobs;
- ``notebook_job``: Jupyter on a compute node: kernelspecs, ``vllm-notebook jupyter``, its sbatch script, ``ssh -L`` lines.
"""
