"""An sbatch script from `vllm-notebook sbatch-template`, validated and run by the dev Slurm cluster.

In a module of its own: test_cluster.py's allocation holds every GPU of the dev
cluster until that module ends, and a batch job would wait for it.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from test_cluster import CLI, SLURM_CONF, _check_jupyter, _cluster_up, _wait_for


def test_sbatch_template_is_valid_and_runs(shared_path):
    tmp_path = shared_path  # the job runs on a node: not under /tmp, which is the node's own
    if not _cluster_up():
        if os.environ.get("CI"):
            pytest.fail("the dev Slurm cluster did not start (scripts/dev-cluster up)")
        pytest.skip("no Slurm here: run scripts/dev-cluster up (needs root and Debian's slurm packages)")
    env = {**os.environ, "SLURM_CONF": SLURM_CONF}
    script = tmp_path / "lab.sbatch"
    out = subprocess.run([*CLI, "sbatch-template", "--nodes", "2", "--gpus-per-node", "2", "--time", "0:10:00",
                          "-o", str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and f"sbatch {script}" in out.stdout
    server = tmp_path / "server.sbatch"
    subprocess.run([*CLI, "sbatch-template", "--server", "org/model --max-model-len 4096", "-o", str(server)],
                   check=True, capture_output=True, env=env)
    for path in (script, server):
        test = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, env=env)
        assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    job_id = sub.stdout.strip().split(";")[0]
    assert job_id.isdigit(), sub.stderr
    try:
        text = _wait_for(tmp_path / f"vllm-notebook-{job_id}.out", "then open:")
        assert f"job {job_id}" in text
        _check_jupyter(text)
    finally:
        subprocess.run(["scancel", job_id], env=env)
