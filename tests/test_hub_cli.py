"""Models on offline nodes and the `vllm-notebook` CLI, run as a user runs them (subprocesses, kernels).

The Hugging Face cache is a real one in a temporary HF_HOME, written in the
library's layout and read back by ``huggingface_hub.scan_cache_dir``. The Hub is
unreachable on purpose (HF_ENDPOINT points at a closed port), except in the
download test, which serves a model from a local stand-in for the Hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from kernel import Kernel

from conftest import LOAD_FLAGS

CLI = [sys.executable, "-m", "vllm_notebook.cli"]
CLOSED = "http://127.0.0.1:9"  # nothing listens there: the Hub is unreachable
REPO = "vllm-notebook/demo-llama"


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, demo_path):
    home = tmp_path_factory.mktemp("hf-home")
    out = cli("demo-model", "--hf-id", REPO, env={"HF_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert "/snapshots/" in out.stdout
    return home


def test_cache_layout_is_the_librarys(hf_home):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_home / "hub")
    assert not info.warnings, info.warnings
    [repo] = [r for r in info.repos if r.repo_id == REPO]
    [rev] = list(repo.revisions)
    assert rev.refs == frozenset({"main"}) and "config.json" in {f.file_name for f in rev.files}


def test_models_lists_cached_models(hf_home):
    out = cli("models", env={"HF_HOME": str(hf_home)})
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith(REPO)][0]
    assert "main" in line and "LlamaForCausalLM" in line and "supported" in line and "NOT" not in line
    assert "MB" in line or "KB" in line


def test_offline_load_from_the_cache_and_fast_failure(hf_home):
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": CLOSED, "HF_HUB_OFFLINE": ""}
    k = Kernel(env=env)
    try:
        out = k.run(f"%load_ext vllm_notebook\n%vllm_load {REPO} {LOAD_FLAGS}", timeout=300)
        assert "ready in" in out and REPO in out
        out = k.run("%%generate --max-tokens 8 --temperature 0\nThe capital of France is")
        assert " Paris." in out
        out = k.run("print(__import__('vllm_notebook').get_engine().model)\n%vllm_models")
        assert REPO in out
        t0 = time.monotonic()
        out, error = k.collect(k.submit("%vllm_load someorg/missing-model"), timeout=60)
        assert time.monotonic() - t0 < 10
        assert error["ename"] == "ModelNotFoundError" and len(error["traceback"]) == 1, error
        assert "vllm-notebook download someorg/missing-model" in error["evalue"] and "unreachable" in error["evalue"]
        out = k.run("%%generate --max-tokens 8 --temperature 0\nThe capital of France is")
        assert " Paris." in out  # the loaded engine is untouched
        out = k.run("%vllm_doctor --no-hub")
        assert "Hugging Face" in out and str(hf_home) in out and "pitfalls found" in out
        k.run("%vllm_unload")
        out = k.run(f"%vllm_load {REPO} --server {LOAD_FLAGS}", timeout=300)  # a server, offline alike
        assert "server ready in" in out
        assert " Paris." in k.run("%%generate --max-tokens 8 --temperature 0\nThe capital of France is")
        assert REPO in k.run("print(__import__('vllm_notebook').get_engine().model)")
        assert "stopped the server" in k.run("%vllm_unload")
    finally:
        k.shutdown()


def test_download_selects_files_and_fills_the_cache(tmp_path, demo_path):
    from localhub import LocalHub

    extra = {"pytorch_model.bin": b"duplicate weights", "original/consolidated.pth": b"x", "model.onnx": b"y"}
    hub = LocalHub.of_folder("someorg/tiny", demo_path, extra)
    try:
        env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": ""}
        out = cli("download", "someorg/tiny", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "%vllm_load someorg/tiny" in out.stdout
        fetched = {r.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if r.startswith("GET /someorg/tiny/resolve")}
        assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
        assert not fetched & {"pytorch_model.bin", "original/consolidated.pth", "model.onnx"}
        out = cli("models", env=env)
        assert "someorg/tiny" in out.stdout and "main" in out.stdout
        from vllm_notebook.models import resolve as models

        os.environ["HF_HOME"] = str(tmp_path)
        try:  # resolution finds it in the cache without asking the Hub
            hub.requests.clear()
            assert models.resolve("someorg/tiny").endswith(hub.commit)
            assert not hub.requests
        finally:
            del os.environ["HF_HOME"]
    finally:
        hub.close()


def test_resolution_honours_cache_locations_and_revisions(tmp_path, demo_path, monkeypatch):
    from vllm_notebook.models import resolve as models
    from vllm_notebook.errors import ModelNotFoundError
    from vllm_notebook.models.hub import install_folder

    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snap = install_folder(demo_path, "org/a", download_dir=str(tmp_path / "dl"))
    commit = snap.rsplit("/", 1)[1]
    assert models.resolve("org/a", download_dir=str(tmp_path / "dl")) == snap
    assert models.resolve("org/a", revision=commit, download_dir=str(tmp_path / "dl")) == snap
    with pytest.raises(ModelNotFoundError, match="--revision v2"):
        models.resolve("org/a", revision="v2", download_dir=str(tmp_path / "dl"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "dl"))
    assert models.resolve("org/a") == snap
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set; on a login node"):
        models.resolve("org/b")
    assert time.monotonic() - t0 < 1


def test_gated_model_says_a_token_is_needed(tmp_path, monkeypatch):
    from localhub import LocalHub

    from vllm_notebook.models import resolve as models
    from vllm_notebook.errors import ModelNotFoundError

    hub = LocalHub("someorg/gated", {"config.json": b"{}"})
    hub.gated.add("someorg/gated")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import (conftest set it)
    try:
        with pytest.raises(ModelNotFoundError, match="gated: it needs a Hugging Face token.*hf auth login"):
            models.resolve("someorg/gated")
        out = cli("download", "someorg/gated", env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path)})
        assert out.returncode == 2 and "gated" in out.stderr and "HF_TOKEN" in out.stderr
    finally:
        hub.close()


def test_download_fails_fast_with_one_line(tmp_path):
    t0 = time.monotonic()
    out = cli("download", "someorg/model", env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": CLOSED, "HF_HUB_OFFLINE": ""})
    assert out.returncode == 2 and time.monotonic() - t0 < 10
    assert out.stderr.count("\n") == 1 and "cannot reach the Hugging Face Hub" in out.stderr
    out = cli("download", "someorg/model", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "HF_HUB_OFFLINE" in out.stderr and "Traceback" not in out.stderr


def test_select_files_keeps_one_kind_of_weights():
    from vllm_notebook.models.hub import select_files

    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "original/consolidated.00.pth",
             "onnx/model.onnx", "flax_model.msgpack", "tf_model.h5"]
    assert select_files(names) == sorted(["config.json", "generation_config.json", "tokenizer.json",
                                          "tokenizer_config.json", "README.md", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
    assert "pytorch_model.bin" in select_files(["config.json", "pytorch_model.bin"])


def test_doctor_reports_pitfalls_with_fixes(tmp_path):
    out = cli("doctor", env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": CLOSED, "HF_HUB_OFFLINE": ""})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for section in ("software", "devices", "Slurm allocation", "Ray", "Hugging Face"):
        assert f"\n{section}\n" in f"\n{text}"
    assert "vLLM 0.32" in " ".join(text.split()) and "CPU build" in text
    assert "Hub is unreachable" in text and "fix: export HF_HUB_OFFLINE=1" in text
    assert cli("doctor", "--strict", env={"HF_ENDPOINT": CLOSED, "HF_HUB_OFFLINE": ""}).returncode == 1


def test_kernel_install_carries_the_environment(tmp_path):
    out = cli("kernel", "install", "--name", "vnb-test", "--prefix", str(tmp_path), "--env", "VNB_MARK=here",
              "--offline", env={"HF_HOME": "/some/where"})
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/vnb-test/kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and "vllm-notebook" in spec["display_name"]
    assert spec["env"]["VNB_MARK"] == "here" and spec["env"]["HF_HUB_OFFLINE"] == "1"
    assert spec["env"]["HF_HOME"] == "/some/where"
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"], capture_output=True,
                            text=True, env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share/jupyter")})
    assert "vnb-test" in json.loads(listed.stdout)["kernelspecs"]
    os.environ["JUPYTER_PATH"] = str(tmp_path / "share/jupyter")
    try:
        k = Kernel("vnb-test")
        try:
            assert k.run("import os; print(os.environ['VNB_MARK'], os.environ['HF_HUB_OFFLINE'])").split() == ["here", "1"]
        finally:
            k.shutdown()
    finally:
        del os.environ["JUPYTER_PATH"]
    # Issue 13, item 7: a kernel other users run gets none of the installer's personal paths.
    out = cli("kernel", "install", "--name", "vnb-shared", "--prefix", str(tmp_path), "--shared",
              env={"HF_HOME": "/home/alice/hf", "LD_LIBRARY_PATH": "/home/alice/lib"})
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/vnb-shared/kernel.json").read_text())
    assert "/home/alice" not in json.dumps(spec) and spec["env"]["PATH"] == f"{sys.prefix}/bin:${{PATH}}"
    os.environ["JUPYTER_PATH"] = str(tmp_path / "share/jupyter")
    try:
        k = Kernel("vnb-shared")
        try:  # jupyter_client fills ${PATH} from the environment of whoever starts the kernel
            path = k.run("import os; print(os.environ['PATH'])").strip().split(":")
            assert path[0] == f"{sys.prefix}/bin" and path[1:] == os.environ["PATH"].split(":")
        finally:
            k.shutdown()
    finally:
        del os.environ["JUPYTER_PATH"]
    bad = cli("kernel", "install", "--name", "x", "--prefix", str(tmp_path), "--env", "HF_TOKEN=hf_abc")
    assert bad.returncode == 2 and "secret" in bad.stderr and "hf_abc" not in bad.stderr


def test_sbatch_template_text():
    out = cli("sbatch-template", "--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00", "--account", "def-lab",
              "-o", "-")
    assert out.returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --gres=gpu:4", "#SBATCH --time=1:00:00", "#SBATCH --account=def-lab",
                 "export HF_HUB_OFFLINE=1", "vllm-notebook jupyter"):
        assert line in out.stdout
    out = cli("sbatch-template", "--server", "org/model --max-model-len 4096", "-o", "-")
    assert "vllm-notebook serve org/model --max-model-len 4096" in out.stdout


def test_serve_command_runs_until_stopped(demo_path):
    import signal

    import vllm_notebook

    proc = subprocess.Popen([*CLI, "serve", demo_path, *LOAD_FLAGS.split(), "--max-num-seqs", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "in a notebook:" in line:
                break
        attach = lines[-1].split("%vllm_load --attach ")[1].split()
        url, key_file = attach[0], attach[2]
        eng = vllm_notebook.attach(url, api_key_file=key_file, name="served", progress=False)
        assert eng.generate("The capital of France is", max_tokens=8, temperature=0).text == " Paris."
        rec = [r for r in vllm_notebook.servers.records() if r.url == url][0]
        eng.unload()  # only detaches: we attached by URL
        assert rec.alive()
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert "server stopped" in rest, "".join(lines) + rest
    assert not rec.alive()


@pytest.mark.slow  # imports vLLM for its parser
def test_serve_help_prints_usage(demo_path):
    out = cli("serve", "--help")
    assert out.returncode == 0 and "usage: vllm-notebook serve" in out.stdout, out.stderr[-2000:]
    out = cli("serve", demo_path, "--help")  # after the model: every flag of vllm serve, and ours
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--api-key-file" in out.stdout and "--max-model-len" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.slow  # starts a kernel
def test_run_executes_a_notebook_in_a_kernel_on_ipc_and_leaves_nothing(tmp_path):
    """`vllm-notebook run` (what scripts/quickstart.sh calls) starts its kernel on Unix sockets in the user's private
    folder, as `vllm-notebook jupyter` does: on TCP any user of the node could read what the cells print. It prints
    no live widget (a progress bar's text would be its first state, 0%)."""
    import nbformat

    from vllm_notebook import private

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from ipykernel.kernelapp import IPKernelApp\n_app = IPKernelApp.instance()\n"
        "print('TRANSPORT', _app.transport, _app.connection_file)"),
        nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='probe-bar'):\n    pass")])
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    out = cli("run", str(path), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("TRANSPORT"))
    _, transport, connection = line.split()
    folder = private.runtime_dir()
    assert transport == "ipc" and os.path.dirname(connection) == str(folder), line
    assert "without encryption" not in out.stderr  # Jupyter's warning about a TCP kernel
    assert "probe-bar" not in out.stdout, out.stdout  # a progress widget's text is its first state: "0%"
    stem = os.path.basename(connection).removesuffix(".json")
    assert not [p for p in os.listdir(folder) if p == f"{stem}.json" or p.startswith(f"{stem}-ipc-")]  # all removed
