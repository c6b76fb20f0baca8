"""Safe beside another user (issue 28), the pieces that need no engine: the private runtime folder and what it
refuses, the sweep of what killed engines leave, the journal's owner checks, IPC kernels, secrets typed on a line.

Real files, processes and shared memory; a folder or file "of another user" is made by root and given to
``nobody`` (those tests need root, as CI has). The attacks themselves, by a second real account against a real
engine and kernel, are in ``test_shared_node.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_notebook import private
from vllm_notebook.errors import SecretOnLineError, UnsafePathError

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes files of another user (needs root)")


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A runtime folder of this test's own (the environment ``protect_process`` changes is restored after)."""
    import tempfile

    monkeypatch.setenv(private.RUNTIME_ENV, str(tmp_path / "run"))
    for var in ("TMPDIR", "VLLM_RPC_BASE_PATH", "VLLM_NOTEBOOK_TMPDIR", *private.CACHES):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path / "run"
    tempfile.tempdir = None


# ------------------------------------------------------------------ the runtime folder
def test_the_runtime_folder_is_private_and_everything_temporary_goes_there(runtime):
    import tempfile

    root = private.protect_process()
    assert root == runtime and os.stat(root).st_mode & 0o777 == 0o700
    assert tempfile.gettempdir() == str(root) == os.environ["TMPDIR"] == os.environ["VLLM_RPC_BASE_PATH"]
    for var, sub in private.CACHES.items():
        assert os.environ[var] == str(root / sub) and os.stat(root / sub).st_mode & 0o777 == 0o700
    os.chmod(root, 0o755)  # ours but opened (a umask 002 node): closed again
    private.runtime_dir()
    assert os.stat(root).st_mode & 0o777 == 0o700


def test_without_a_choice_it_is_per_user_in_the_temp_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(private.RUNTIME_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("VLLM_NOTEBOOK_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert private.runtime_dir() == tmp_path / f"vllm-notebook-{os.geteuid()}"
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert private.runtime_dir() == xdg / "vllm-notebook"


@as_root
def test_a_runtime_folder_another_user_made_first_is_refused_in_one_line(tmp_path, monkeypatch):
    planted = tmp_path / "vllm-notebook-0"
    planted.mkdir(mode=0o777)
    os.chown(planted, NOBODY, NOBODY)
    monkeypatch.delenv(private.RUNTIME_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("VLLM_NOTEBOOK_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(UnsafePathError, match=r"belongs to user 'nobody', not you: .*set VLLM_NOTEBOOK_RUNTIME_DIR"):
        private.runtime_dir()
    planted.rmdir()
    planted.symlink_to(tmp_path)  # a link to somewhere the attacker can read
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        private.runtime_dir()


@as_root
def test_a_chosen_inductor_cache_of_another_user_is_refused(runtime, tmp_path, monkeypatch):
    """Issue 28, attack 1: /tmp/torchinductor_$USER made 0777 by someone else; torch runs what it compiles there."""
    theirs = tmp_path / "torchinductor_alice"
    theirs.mkdir(mode=0o777)
    os.chmod(theirs, 0o777)
    os.chown(theirs, NOBODY, NOBODY)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    with pytest.raises(UnsafePathError, match=r"TORCHINDUCTOR_CACHE_DIR is .* belongs to user 'nobody': torch would "
                                              r"run code compiled there; unset TORCHINDUCTOR_CACHE_DIR"):
        private.protect_process()
    os.chown(theirs, 0, 0)  # the user's own, but open to everyone
    with pytest.raises(UnsafePathError, match="others can write to .* chmod 700"):
        private.environment()
    os.chmod(theirs, 0o700)
    assert private.environment()["TORCHINDUCTOR_CACHE_DIR"] == str(theirs)


def test_an_engine_folder_is_swept_once_its_process_is_gone(runtime):
    private.runtime_dir()
    code = "import vllm_notebook.private as p; print(p.engine_dir('kernel', 'e'))"
    child = subprocess.run([sys.executable, "-c", code],
                           capture_output=True, text=True, check=True)
    left = Path(child.stdout.strip())
    (left / "vllm_dist_x").write_text("rendezvous")
    mine = private.engine_dir("kernel", "mine")
    server = runtime / "server-node-8000-abc"  # a server's outlives the kernel that started it: forget() removes it
    server.mkdir()
    private.sweep(runtime)
    assert not left.exists() and mine.exists() and server.exists()


def test_the_watchdog_removes_a_killed_kernels_engine_folder_and_its_shared_memory(runtime):
    """A kernel SIGKILLed with an engine: its sockets, rendezvous files and /dev/shm segments go with it."""
    code = textwrap.dedent("""
        import os, sys, time
        from multiprocessing import shared_memory
        from vllm_notebook import private, procs
        since = time.time()
        folder = private.engine_dir("kernel", "doomed")
        (folder / "vllm_dist_0123").write_text("x")
        procs.remove_at_exit(folder, since)
        seg = shared_memory.SharedMemory(create=True, size=1 << 20)
        from multiprocessing import resource_tracker
        resource_tracker.unregister(seg._name, "shared_memory")  # as in an engine killed with its tracker
        print(folder, seg.name, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    folder, seg = proc.stdout.readline().split()
    assert Path(folder).exists() and Path(f"/dev/shm/{seg}").exists()
    kept = _segment()  # another engine's, still mapped: never touched
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while (Path(folder).exists() or Path(f"/dev/shm/{seg}").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(folder).exists(), "the killed kernel's engine folder is left"
        assert not Path(f"/dev/shm/{seg}").exists(), "the killed kernel's shared memory is left"
        assert Path(f"/dev/shm/{kept.name}").exists()
    finally:
        kept.close()
        kept.unlink()


def _segment():
    from multiprocessing import shared_memory

    return shared_memory.SharedMemory(create=True, size=4096)


def test_shared_memory_a_dead_engine_left_is_removed_and_a_live_ones_kept():
    since = time.time()
    code = ("from multiprocessing import shared_memory, resource_tracker; import os\n"
            "s = shared_memory.SharedMemory(create=True, size=65536)\n"
            "resource_tracker.unregister(s._name, 'shared_memory'); print(s.name, flush=True); os._exit(0)")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    live = _segment()
    try:
        assert Path(f"/dev/shm/{dead}").exists()
        removed = private.sweep_shm(since)
        assert dead in removed and live.name not in removed
        assert not Path(f"/dev/shm/{dead}").exists() and Path(f"/dev/shm/{live.name}").exists()
        assert private.sweep_shm(time.time() + 5) == []  # made before `since`: never ours to judge
    finally:
        live.close()
        live.unlink()


def test_a_live_semaphore_is_kept_and_a_dead_processs_is_removed():
    """A POSIX semaphore is mapped under glibc's temporary name, not its own: found by inode. (Found by CI's
    benchmark: the sweep after one unload removed the next engine's semaphore, and that engine could not start.)"""
    import multiprocessing as mp

    since = time.time()
    code = ("import multiprocessing as mp, os; from multiprocessing import resource_tracker\n"
            "lock = mp.get_context('spawn').Lock(); name = lock._semlock.name\n"
            "resource_tracker.unregister(name, 'semaphore'); print(name, flush=True); os._exit(0)")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    live = mp.get_context("spawn").Lock()
    live_file = Path(f"/dev/shm/sem.{live._semlock.name.lstrip('/')}")
    assert live_file.exists() and Path(f"/dev/shm/sem.{dead.lstrip('/')}").exists()
    removed = private.sweep_shm(since)
    assert f"sem.{dead.lstrip('/')}" in removed and live_file.exists()
    with live:  # still works
        pass


# ------------------------------------------------------------------ the journal
@as_root
@pytest.mark.parametrize("how", ["another user's", "group-writable", "a link"])
def test_a_journal_another_user_could_read_or_forge_is_not_used(tmp_path, monkeypatch, capsys, how):
    """Issue 28, attack 3: a journal made first by another user received the results and fed forged ones back."""
    from vllm_notebook.engine import journal

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "shared" / "nb.vllm-journal.jsonl"
    path.parent.mkdir()
    forged = [{"kind": "run", "run": "r", "model": "m", "revision": None, "flags": {}, "sampling": {"temperature": 0}},
              {"kind": "result", "run": "r", "key": "k", "prompt": "p",
               "outputs": [{"text": " FORGED", "token_ids": [1], "finish_reason": "length"}]}]
    if how == "a link":
        target = tmp_path / "elsewhere.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in forged))
        path.symlink_to(target)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in forged))
        os.chmod(path, 0o666 if how == "another user's" else 0o620)
        if how == "another user's":
            os.chown(path, NOBODY, NOBODY)
    before = path.read_bytes()
    journal.configure(enabled=True, path=str(path))
    try:
        book = journal.current()
        said = capsys.readouterr().out
        assert book.path != path and book.path.parent == tmp_path / "cache" / "journals"
        assert said.count("\n") == 1 and f"the results journal {path}" in said and f"results go to {book.path}" in said
        book.append({"kind": "run", "run": "mine"})
        assert book.lookup(["k"]) == {} and path.read_bytes() == before  # nothing read, nothing appended
        assert os.stat(book.path).st_mode & 0o777 == 0o600
        journal.current()
        assert capsys.readouterr().out == ""  # said once
        direct = journal.Journal(str(path))  # even named directly, it is refused
        for call in (lambda: direct.append({"kind": "run"}), lambda: direct.lookup(["k"]), direct.records):
            with pytest.raises(Exception, match="neither read nor appended|symbolic links"):
                call()
    finally:
        journal.reset()


def test_a_result_counts_only_with_a_matching_run_record(tmp_path):
    from vllm_notebook.engine import journal

    book = journal.at(tmp_path / "j.jsonl")
    run = {"model": "m", "revision": None, "flags": {"max_model_len": 512}, "sampling": {"temperature": 0}}
    book.append({"kind": "run", "run": "r1", **run})
    book.append({"kind": "result", "run": "r1", "key": "a", "outputs": []})
    book.append({"kind": "result", "run": "nowhere", "key": "b", "outputs": []})  # no run record
    book.append({"kind": "run", "run": "r2", **run, "model": "other"})
    book.append({"kind": "result", "run": "r2", "key": "c", "outputs": []})  # a run of another model
    assert set(book.lookup(["a", "b", "c"], run=run)) == {"a"}
    assert set(book.lookup(["a", "b", "c"])) == {"a", "b", "c"}
    assert os.stat(book.path).st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ kernels on IPC, job scripts
def test_jupyter_and_the_job_scripts_keep_kernels_and_files_private(tmp_path, monkeypatch, capsys):
    from vllm_notebook import cli
    from vllm_notebook.cluster import notebook_job as jobs
    from vllm_notebook.backends import slurm_job

    monkeypatch.setenv("VLLM_NOTEBOOK_CACHE", str(tmp_path / "cache"))
    assert cli.main(["jupyter", "--dry-run", "--port", "8999"]) == 0
    assert "--KernelManager.transport=ipc" in capsys.readouterr().out
    script = jobs.sbatch_template()
    assert "umask 077" in script and "--KernelManager" not in script  # `vllm-notebook jupyter` sets it
    rec = slurm_job.JobRecord(id="x", name="x", model="m", flags=[], options=[])
    text = slurm_job.script_text(rec, job_name="x")
    assert all(line in text for line in slurm_job.PRIVATE_LINES)
    assert text.index("umask 077") < text.index("exec ")


def test_kernel_install_configures_ipc_and_keeps_other_settings(tmp_path, monkeypatch):
    from vllm_notebook.cluster import notebook_job as jobs

    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter"))
    (tmp_path / "jupyter").mkdir()
    (tmp_path / "jupyter" / "jupyter_server_config.json").write_text('{"ServerApp": {"port": 9999}}')
    path = jobs.configure_ipc_kernels()
    assert json.loads(path.read_text()) == {"ServerApp": {"port": 9999}, "KernelManager": {"transport": "ipc"}}
    assert json.loads(jobs.configure_ipc_kernels(str(tmp_path / "env")).read_text()) == \
        {"KernelManager": {"transport": "ipc"}}


# ------------------------------------------------------------------ secrets typed on a line
@pytest.mark.parametrize("line", ["M --hf-token hf_TypedSecret123", "M --server --api-key=TypedSecret123"])
def test_a_refused_secret_is_removed_from_ipythons_history(line):
    from IPython.testing.globalipapp import get_ipython, start_ipython

    shell = start_ipython() or get_ipython()  # one global shell per process
    shell.run_cell("%load_ext vllm_notebook", store_history=False)
    hm = shell.history_manager
    try:
        result = shell.run_cell(f"%vllm_load {line}", store_history=True)
        assert isinstance(result.error_in_exec, SecretOnLineError)
        said = str(result.error_in_exec)
        assert "removed from IPython's history" in said and "revoke it" in said
        hm.writeout_cache()
        shell.run_cell("pass", store_history=True)  # the next cell moves this one into _i
        rows = list(hm.db.execute("SELECT source, source_raw FROM history"))
        shown = (shell.user_ns.get("_i"), shell.user_ns.get("_ii"))
        stored = [*hm.input_hist_raw, *hm.input_hist_parsed, *(v for v in shown if v),
                  *(s for row in rows for s in row)]
        assert any("<secret removed>" in s for s in stored)
        assert not any("TypedSecret123" in s for s in stored)
    finally:
        shell.run_cell("%unload_ext vllm_notebook", store_history=False)


def test_the_engine_folder_is_never_this_processs_temp_folder(runtime):
    """Found by the benchmark: a tempfile call in the kernel while an engine started cached the engine's folder
    as the kernel's temp folder, and once the engine was unloaded every TemporaryDirectory() failed."""
    import tempfile

    root = private.protect_process()
    folder = private.engine_dir("kernel", "e")
    with private.engine_environment(folder):
        assert os.environ["TMPDIR"] == str(folder) and tempfile.gettempdir() == str(root)
    private.remove(folder)
    with tempfile.TemporaryDirectory() as tmp:
        assert tmp.startswith(str(root))
