"""Faults and bad input: nothing a user does wrong, and no engine death, costs a kernel or a traceback.

Elsewhere in the suite, and part of the same promise:
- test_magics.py: 27 bad inputs to the magics, each one line, the engine answering after each;
- test_kernel.py: 10 kernel interrupts mid-stream; no engine process left after kernel shutdown, or
  after the kernel is SIGKILLed;
- test_server.py: a server without the key or with a wrong one answers 401; a SIGKILLed server is
  reported in one line and replaced by %vllm_load;
- test_cluster.py: a Ray client without the cluster's token is refused; no Ray or srun process left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from kernel import Kernel

from conftest import LOAD_FLAGS

GREEDY = {"temperature": 0.0, "max_tokens": 16}
ANSWERS = {"The capital of France is": " Paris.", "The capital of Germany is": " Berlin.", "A dog says": " woof.",
           "A cow says": " moo.", "The capital of Italy is": " Rome.", "A cat says": " meow.",
           "The capital of Japan is": " Tokyo.", "Two plus two is": " four."}


def _one_line(text: str) -> bool:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


# ------------------------------------------------------------------ the Python API
def _api_cases(engine, tmp_path):
    import vllm_notebook
    from vllm_notebook.engine.sampling import parse_schema

    unreadable = tmp_path / "schema-dir"
    unreadable.mkdir()
    return [
        ("load() without a model", lambda: vllm_notebook.load(None), "needs a model"),
        ("load() unknown engine argument",  # a model that exists: a missing one is told first, before vLLM loads
         lambda: vllm_notebook.load(engine.facts.get("path") or engine.backend.args.model, max_model_lenn=5),
         "did you mean 'max_model_len'"),
        ("load() a folder that is not a model", lambda: vllm_notebook.load(str(tmp_path)), "holds no config.json"),
        ("load() an impossible plan", lambda: vllm_notebook.load(engine.facts.get("path") or engine.backend.args.model,
                                                                 tensor_parallel_size=3, dry_run=True),
         "does not divide"),
        ("load() host without server", lambda: vllm_notebook.load("x", host="0.0.0.0"), "server=True"),
        ("generate() wrong prompt type", lambda: engine.generate(12345), "prompts must be a str, a list of str"),
        ("generate() temperature as text", lambda: engine.generate("x", temperature="hot"),
         "temperature must be a number, not 'hot'"),
        ("generate() negative max_tokens", lambda: engine.generate("x", max_tokens=-3), "max_tokens"),
        ("generate() huge logprobs", lambda: engine.generate("x", logprobs=10**6), "logprobs"),
        ("generate() n of zero", lambda: engine.generate("x", n=0), "n must be at least 1"),
        ("generate() unknown sampling field", lambda: engine.generate("x", temprature=1), "unknown sampling"),
        ("generate() past max_model_len", lambda: engine.generate("word " * 2000), "max-model-len"),
        ("generate() malformed regex", lambda: engine.generate("x", regex="(["), 'invalid regex "(["'),
        ("sleep() level 3", lambda: engine.sleep(3), "sleep level must be 1"),
        ("sleep() without --enable-sleep-mode", lambda: engine.sleep(), "--enable-sleep-mode"),
        ("wake() an awake engine", lambda: engine.wake(), "awake already"),
        ("load() --enable-sleep-mode on the CPU build",
         lambda: vllm_notebook.load(engine.backend.args.model, name="sleepy", progress=False, enforce_eager=True,
                                    max_model_len=512, enable_sleep_mode=True), "Sleep mode is not supported"),
        ("parse_schema() unreadable file", lambda: parse_schema(str(unreadable)), "cannot read"),
        ("get_engine() unknown name", lambda: vllm_notebook.get_engine("nope"), "no engine named 'nope'"),
        ("panel() unknown engine", lambda: vllm_notebook.panel("nope")._engine(), "no engine named 'nope'"),
        ("attach() nothing listening", lambda: vllm_notebook.attach("127.0.0.1:9", progress=False),
         "cannot reach a vLLM server"),
        ("attach() unreadable key file", lambda: vllm_notebook.attach("127.0.0.1:9", api_key_file="/nonexistent"),
         "cannot read the API key file"),
    ]


def test_bad_api_input_is_one_line_and_the_engine_answers(engine, tmp_path):
    from vllm_notebook.errors import VllmNotebookError

    cases = _api_cases(engine, tmp_path)
    assert len(cases) >= 15
    for name, call, match in cases:
        try:
            call()
        except VllmNotebookError as exc:
            err = exc
        else:
            pytest.fail(f"{name}: no error")
        assert "\n" not in str(err), (name, str(err))
        assert match in str(err), (name, str(err))
        assert "".join(err._render_traceback_()).count("\n") <= 1, name
        assert engine.generate("The capital of France is", **GREEDY).text == " Paris.", name


# ------------------------------------------------------------------ the CLI
CLI_CASES = [
    (["frobnicate"], "invalid choice"),
    (["download"], "the following arguments are required: model"),
    (["download", "not a repo id"], "is not a Hugging Face model id (ORG/NAME)"),
    (["sbatch-template", "--nodes", "two"], "invalid int value"),
    (["kernel", "install", "--env", "NOEQUALS"], "--env takes KEY=VALUE"),
    (["kernel", "install", "--prefix", "/tmp/x", "--env", "VLLM_API_KEY=s3cret"], "is a secret"),
    (["run", "/no/such/notebook.ipynb"], "no such notebook"),
    (["doctor", "--bogus"], "unrecognized arguments: --bogus"),
    (["jupyter", "--port", "-5"], "--port must be between 1 and 65535, not -5"),
]


@pytest.mark.parametrize("argv,match", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_cli_input_is_one_line(argv, match):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}
    out = subprocess.run([sys.executable, "-m", "vllm_notebook.cli", *argv], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode != 0, out.stdout
    assert _one_line(out.stderr), out.stderr
    assert match in out.stderr and "s3cret" not in out.stderr


# ------------------------------------------------------------------ 64 requests at once
def test_64_concurrent_requests_from_threads_and_panels(engine):
    from vllm_notebook.ui.panel import PromptPanel

    items = list(ANSWERS.items()) * 8  # 64
    thread_items, panel_items = items[:56], items[56:]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(thread_items) + 1)

    def work(i: int, prompt: str) -> None:
        try:
            start.wait(30)
            results[i] = engine.generate(prompt, **GREEDY).text
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, p)) for i, (p, _) in enumerate(thread_items)]
    for t in threads:
        t.start()
    panels = [PromptPanel(engine, temperature=0.0, max_tokens=16, chat=False) for _ in panel_items]
    start.wait(30)
    for p, (prompt, _) in zip(panels, panel_items):
        p.send(prompt)
    for t in threads:
        t.join(120)
    for p in panels:
        p.wait(120)
    assert not errors, errors[:3]
    assert [results[i] for i in range(len(thread_items))] == [want for _, want in thread_items]
    assert [p.text for p in panels] == [want for _, want in panel_items]
    assert all(p.status == "idle" and not p.error for p in panels)


# ------------------------------------------------------------------ the engine core SIGKILLed mid-generation
def test_engine_core_killed_is_detected_fast_and_load_recovers(demo_path):
    k = Kernel()
    try:
        # 2048: the run below is long enough to be killed mid-stream even where the engine runs 500 tokens/s
        k.run(f"%load_ext vllm_notebook\n%vllm_load {demo_path} --enforce-eager --max-model-len 2048", timeout=300)
        cores = [p for p in psutil.Process(k.pid).children(recursive=True) if "EngineCor" in p.name()
                 or "EngineCore" in " ".join(p.cmdline())]
        assert cores, [p.name() for p in psutil.Process(k.pid).children(recursive=True)]
        killed: list[float] = []

        def kill():
            killed.append(time.monotonic())
            for p in cores:
                p.kill()

        msg_id = k.submit("%%generate --max-tokens 2000 --ignore-eos --temperature 0\nOnce upon a time")
        out, error = k.collect(msg_id, timeout=60, on_update=kill)
        detected = time.monotonic() - killed[0]
        print(f"engine core SIGKILLed: the cell failed {detected:.2f} s later")
        assert detected < 2.0
        assert error is not None and error["ename"] == "EngineDiedError", error
        assert len(error["traceback"]) == 1 and "%vllm_load again" in error["evalue"]
        out = k.run("%vllm_status")
        assert "dead" in out
        out = k.run(f"%vllm_load {demo_path} {LOAD_FLAGS}", timeout=300)  # no kernel restart
        assert "ready in" in out
        out = k.run("%%generate --max-tokens 8 --temperature 0\nThe capital of France is")
        assert " Paris." in out
    finally:
        k.shutdown()
