"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

IN_ALLOCATION = {"multi_node"}  # run inside the test Slurm allocation by test_cluster.py
NEEDS_SLURM = {"slurm_job"}  # submits a job to the dev Slurm cluster (scripts/dev-cluster)
NOTEBOOKS = [p for p in sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
             if p.stem not in IN_ALLOCATION]
LOG_LINE = re.compile(r"\b(INFO|WARNING|DEBUG)\b \d\d-\d\d ")


def _texts(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(str(out.data.get("text/plain", "")) + str(out.data.get("text/markdown", "")))
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, demo_path, tmp_path):
    if path.stem in NEEDS_SLURM:
        import shutil
        import subprocess

        from test_cluster import SLURM_CONF, _cluster_up

        if not (shutil.which("sbatch") and _cluster_up()):
            if os.environ.get("CI"):
                pytest.fail("the dev Slurm cluster did not start (scripts/dev-cluster up)")
            pytest.skip("no Slurm here: run scripts/dev-cluster up")
        os.environ["SLURM_CONF"] = SLURM_CONF
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [_texts(c) for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(outputs)
    for c in nb.cells:  # only %vllm_logs may show vLLM's log
        if c.cell_type == "code" and not c.source.startswith("%vllm_logs"):
            assert not LOG_LINE.search(_texts(c)), f"vLLM log lines leaked into the output of {c.source!r}"
    assert "Traceback" not in everything
    if path.stem == "quickstart":  # the starter model: a real model, so only its surest answers are checked
        assert "ready in" in everything and "smollm2-135m-instruct" in everything
        assert " Paris" in outputs[2] and " Tokyo" in outputs[4] and "Rome" in outputs[5]
        assert "Paris" in outputs[8] and "Rome" in outputs[9]  # the second turn remembers the first
        assert "['The capital of Germany is', 'A cat says']" not in everything and " Berlin" in everything
    if path.stem == "research_runs":
        assert "6 of 6 from the journal" in everything and "(6, [' Paris." in everything
        assert "'vllm_notebook': '0.1.0'" in everything and "journal: " in everything
        assert "system=Answer briefly." in everything and "tok/s" in everything
    if path.stem == "adapters_embeddings_scoring":
        assert " meow." in everything and "lora=dog" in everything and "[' woof.', ' meow.']" in everything
        assert "best" in everything and "X = 4 embedding(s) × 128 dimensions" in everything
        assert "ranked against 'What does a dog say?'" in everything and "adapter 'dog2' removed" in everything
    if path.stem == "server":
        assert "server ready in" in everything or "attached to the running server" in everything
        assert " Paris." in everything and "' Berlin.', ' meow.'" in everything
        assert "detached from the server" in everything and "stopped the server" in everything
    if path.stem == "slurm_job":
        assert "submitted job" in everything and ("PENDING" in everything or "RUNNING" in everything)
        assert " Paris." in everything and "cancelled job" in everything and "READY" in everything
    if path.stem == "batch":
        assert "' Paris.'" in everything and "' Berlin.'" in everything and "meow" in everything and "woof" in everything
    if path.stem == "chat":
        assert "Paris" in everything and "woof" in everything and "Berlin" in everything
    if path.stem == "structured_output":
        assert "City(name=" in everything and "'answer':" in everything
    if path.stem == "replicas":
        assert "replicas auto" in everything and "2 replicas" in everything and "' Paris.'" in everything
        assert "[1]" in everything and "[2]" in everything and "unloaded engine 'default'" in everything
    if path.stem == "replicas":
        assert "replicas auto" in everything and "2 replicas" in everything and "' Paris.'" in everything
        assert "[1]" in everything and "[2]" in everything and "unloaded engine 'default'" in everything
    if path.stem == "offline_models":
        assert "vllm-notebook/demo-llama" in everything and " Paris." in everything
        assert "vllm-notebook download someorg/not-downloaded" in everything and "pitfalls found" in everything
