"""Shared fixtures: one real vLLM CPU engine on the demo model for the whole session."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NOTEBOOK_JOURNAL", "off")  # the journal tests turn it on, each with a file of its own

ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 512}
LOAD_FLAGS = "--enforce-eager --max-model-len 512"

# The slow tier: tests that need a vLLM engine, a server, a Jupyter kernel, Slurm or a browser. Everything
# else is the fast tier (`pytest -m "not slow and not gpu"`, well under a minute), which CI runs first.
SLOW_FIXTURES = {"demo_path", "engine", "ip", "cell", "server", "kernel", "job", "slurm_kernel", "hf_home"}
SLOW_MODULES = {"test_browser", "test_notebooks", "test_benchmark", "test_kernel", "test_jobs", "test_reliability"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


SESSION = os.environ.setdefault("VLLM_NOTEBOOK_TEST_SESSION", uuid.uuid4().hex)  # inherited by kernels, servers


@pytest.fixture(scope="session", autouse=True)
def _no_servers_left_behind():
    """Servers outlive kernels by design; whatever this test run left running is stopped here.

    Only servers started by this run (their environment carries its marker): the registry is per user,
    and another run, or the user's own servers, may be in it.
    """
    yield
    from vllm_notebook import procs, servers

    for rec in servers.records():
        if rec.here and procs.has_marker(rec.pid, "VLLM_NOTEBOOK_TEST_SESSION", SESSION):
            servers.stop(rec)


@pytest.fixture
def shared_path():
    """A folder every node of the dev cluster sees, as $HOME or a project folder on a real cluster.

    Not ``tmp_path``: that is under /tmp, and each dev-cluster node has a /tmp of its own.
    """
    path = Path(tempfile.mkdtemp(prefix="vnb-test-", dir=os.environ.get("VLLM_NOTEBOOK_SHARED_TMP", "/var/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_path() -> str:
    import vllm_notebook

    return vllm_notebook.demo_model()


@pytest.fixture(scope="session")
def engine(demo_path):
    import vllm_notebook

    eng = vllm_notebook.load(demo_path, name="default", progress=False, **ENGINE_ARGS)
    yield eng
    eng.unload()


@pytest.fixture(scope="session")
def ip(engine):
    """A real IPython shell with the extension loaded and the session engine registered."""
    from IPython.testing.globalipapp import get_ipython, start_ipython

    shell = start_ipython() or get_ipython()  # one global shell: another test may have started it
    shell.run_cell("%load_ext vllm_notebook", store_history=False)
    yield shell
    shell.run_cell("%unload_ext vllm_notebook", store_history=False)


def _cell_runner(shell, capsys, before=None):
    """Run a cell in ``shell``; return (ExecutionResult, printed text). Fails on an unexpected error."""

    def run(code: str, *, expect_error: type | None = None):
        if before is not None:
            before()
        capsys.readouterr()
        result = shell.run_cell(code, store_history=True)
        out = capsys.readouterr()
        text = out.out + out.err
        if expect_error is None:
            if result.error_in_exec or result.error_before_exec:
                raise result.error_in_exec or result.error_before_exec
        else:
            assert isinstance(result.error_in_exec or result.error_before_exec, expect_error), (result, text)
        return result, text

    return run


@pytest.fixture
def cell(ip, engine, capsys):
    """Run a cell on the session engine; return (ExecutionResult, printed text)."""

    def engine_alive():
        if not engine.alive:  # a test killed it; later tests need one
            pytest.fail("the session engine is not alive")

    return _cell_runner(ip, capsys, engine_alive)


@pytest.fixture
def fake_ip(monkeypatch):
    """The global IPython shell with the extension loaded and a fake engine as the only one, for the fast tier
    (``fake_backend.py``); the engines registered before come back afterwards."""
    from fake_backend import fake_engine
    from IPython.testing.globalipapp import get_ipython, start_ipython

    from vllm_notebook.engine import registry

    monkeypatch.setenv("VLLM_NOTEBOOK_JOURNAL", "off")
    shell = start_ipython() or get_ipython()
    shell.run_cell("%load_ext vllm_notebook", store_history=False)
    before = registry.engines()
    for eng in before.values():
        registry.unregister(eng)
    fake = fake_engine("default")
    registry.register(fake)
    shell.user_ns["fake"] = fake
    yield shell
    for eng in registry.engines().values():
        if eng not in before.values():
            eng.unload()
    for eng in before.values():
        registry.register(eng)


@pytest.fixture
def fake_cell(fake_ip, capsys):
    """Run a cell on the fake engine; return (ExecutionResult, printed text)."""
    return _cell_runner(fake_ip, capsys)
