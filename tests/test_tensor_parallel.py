"""Tensor parallel over two devices, in a real kernel and in a server, against raw vLLM with the same TP.

On a host with two or more CUDA GPUs (``scripts/gpu-check --multi``; issue 18) the kernel loads the GPU model
with no parallel flags, so the plan itself must choose TP 2 from the visible GPUs, and the tier adds sleep mode
and the Ray executor on the kernel's own token-protected cluster. Elsewhere it runs in the slow tier on vLLM's
CPU build with ``--tensor-parallel-size 2``: two CPU workers, each bound to half of this machine's cores (vLLM
binds one worker per NUMA node by default, and a small node has one). The kernel, the server, Ctrl-C and
unload then run the same multi-process executor as on GPUs, and are checked the same way: the text equals raw
vLLM's, every worker survives interrupts, nothing is left after an unload. A host with one GPU skips it
(``tests/test_gpu.py`` is that tier). The CPU build cannot run the Ray executor (Ray's tests are in
``test_cluster``), nor sleep mode.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel import Kernel, engine_processes, ray_gone, ray_processes

from vllm_notebook.engine import gpus

PROMPTS = ["The capital of France is", "A dog says", "Once upon a time", "The capital of Japan is"]
TOKENS = 32
USED = gpus.used_mib() or []
GPUS = len(USED)
ON_GPUS = GPUS >= 2
GPU_MODEL = os.environ.get("VLLM_NOTEBOOK_GPU_MODEL", "/tmp/model1b")
SLACK_MIB = 1024  # "back to idle": each GPU within this of what it used before anything was loaded
OUT = Path(os.environ.get("OUT") or "artifacts")
LOAD_TIMEOUT = 500

pytestmark = [
    pytest.mark.skipif(GPUS == 1, reason="one GPU: tensor parallel needs two (tests/test_gpu.py is this host's tier)"),
    pytest.mark.skipif(not ON_GPUS and len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores for two workers"),
    pytest.mark.skipif(ON_GPUS and not Path(GPU_MODEL).exists(), reason=f"no model at {GPU_MODEL}"),
]
on_gpus = pytest.mark.skipif(not ON_GPUS, reason="needs two CUDA GPUs (vLLM's CPU build has no sleep mode, no Ray)")


def _cpu_binding() -> str:
    """Half of the allowed cores for each of the two CPU workers, in vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` form."""
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2
    return "|".join(",".join(map(str, part)) for part in (cores[:half], cores[half:2 * half]))


RAW = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
model, flags, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
ns = parser.parse_args(flags)
llm = LLM(model=model, **{k: v for k, v in vars(ns).items() if v != parser.get_default(k)})
greedy = SamplingParams(temperature=0, max_tokens=tokens)
batch = [o.outputs[0].text for o in llm.generate(prompts, greedy, use_tqdm=False)]
single = llm.generate(prompts[:1], greedy, use_tqdm=False)[0].outputs[0].text
llm.llm_engine.engine_core.shutdown()
print("RAW" + json.dumps({"batch": batch, "single": single}))
"""


@pytest.fixture(scope="module")
def setup(request):
    """(model, our %vllm_load line, raw vLLM's flags, the kernel's extra environment)."""
    if ON_GPUS:  # no parallel flag: the plan must choose TP 2 from the two visible GPUs
        flags = shlex.split(os.environ.get("VLLM_NOTEBOOK_GPU_FLAGS", ""))
        return GPU_MODEL, shlex.join([GPU_MODEL, *flags]), [*flags, "--tensor-parallel-size", "2"], {}
    flags = ["--enforce-eager", "--max-model-len", "2048", "--tensor-parallel-size", "2"]
    demo_path = request.getfixturevalue("demo_path")
    return demo_path, shlex.join([demo_path, *flags]), flags, {"VLLM_CPU_OMP_THREADS_BIND": _cpu_binding()}


@pytest.fixture(scope="module")
def figures():
    data: dict = {"gpus": GPUS, "idle_mib": USED}
    yield data
    if ON_GPUS:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gpu-tp2-figures.json").write_text(json.dumps(data, indent=1))
    print("\ntensor parallel figures:", json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def raw(setup, figures) -> dict:
    """Raw vLLM's greedy texts with TP 2, from a process of its own, before our kernel loads anything."""
    model, _, flags, env = setup
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RAW, model, json.dumps(flags), json.dumps(PROMPTS), str(TOKENS)],
                         capture_output=True, text=True, timeout=LOAD_TIMEOUT, env={**os.environ, **env})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RAW")]
    assert lines, out.stderr[-3000:]
    figures["raw_s"] = round(time.perf_counter() - t, 1)
    _assert_idle(None, "after raw vLLM")
    return json.loads(lines[-1][3:])


@pytest.fixture(scope="module")
def kernel(setup, raw):
    k = Kernel(env=setup[3])
    k.run("%load_ext vllm_notebook")
    yield k
    k.shutdown()


def _assert_idle(kernel_pid: int | None, what: str) -> None:
    """No engine process left under the kernel and every GPU back near its idle use (waits up to 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        left = engine_processes(kernel_pid) if kernel_pid else []
        used = gpus.used_mib() or []
        busy = [f"GPU {i}: {u} MiB (idle {i0})" for i, (u, i0) in enumerate(zip(used, USED)) if u > i0 + SLACK_MIB]
        if not left and not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: processes {[p.pid for p in left]}, {busy}")
        time.sleep(0.25)


def _value(kernel: Kernel, expr: str):
    return json.loads(kernel.run(f"import json as _j; print(_j.dumps({expr}))").strip().splitlines()[-1])


def _greedy(kernel: Kernel, prompts: list[str], name: str = "default") -> list[str]:
    kernel.run(f"_prompts = {prompts!r}\n"
               f"_g = %generate -i _prompts --name {name} --temperature 0 --max-tokens {TOKENS}")
    return _value(kernel, "_g.texts")


def _load(kernel: Kernel, line: str, figures: dict, key: str) -> None:
    t = time.perf_counter()
    kernel.run(f"%vllm_load {line}", timeout=LOAD_TIMEOUT)
    figures[key] = round(time.perf_counter() - t, 1)


# ------------------------------------------------------------------ in the kernel
def test_the_plan_is_tp2_and_the_text_equals_raw(kernel, setup, raw, figures):
    _load(kernel, setup[1], figures, "load_s")
    facts = _value(kernel, "{k: str(v) for k, v in __import__('vllm_notebook').get_engine().facts.items()}")
    assert (facts["tensor_parallel_size"], facts["pipeline_parallel_size"]) == ("2", "1"), facts
    workers = [p for p in engine_processes(kernel.pid) if "Worker" in " ".join(p.cmdline() + [p.name()])]
    assert len(workers) >= 2, [p.cmdline() for p in engine_processes(kernel.pid)]
    assert _greedy(kernel, PROMPTS) == raw["batch"]
    updates = []
    out, error = kernel.collect(kernel.submit(f"%%generate --temperature 0 --max-tokens {TOKENS}\n{PROMPTS[0]}"),
                                on_update=lambda: updates.append(1))
    assert error is None and updates, (error, out[-500:])
    assert _value(kernel, "_.text") == raw["single"]


# Run in the kernel: for each run, the SIGINT handler it found, and whether its Ctrl-C flag was set (diagnosis of
# an interrupt that CI once saw sent 28 ms after submitting, with the stream going on to its end).
PROBE = """
import contextlib, signal
import vllm_notebook.engine.core as _base
_runs, _flag = [], _base._ctrl_c_flag
@contextlib.contextmanager
def _probed():
    seen = {"handler": repr(signal.getsignal(signal.SIGINT)),
            "blocked": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}
    _runs.append(seen)
    with _flag() as flag:
        yield flag
    seen["flag_set"] = flag.is_set()
_base._ctrl_c_flag = _probed
"""


def test_ten_interrupts_keep_every_process_and_the_next_text_is_right(kernel, raw, figures):
    before = sorted(p.pid for p in engine_processes(kernel.pid))
    kernel.run(PROBE)
    stops, late = [], []
    while len(stops) < 10:
        out, error, seconds = kernel.interrupted(
            "%%generate --max-tokens 2000 --ignore-eos --temperature 0\nOnce upon a time")
        assert error is None and seconds is not None, (error, out[-500:])
        sent_after = kernel.interrupt_sent_after
        if "interrupted: aborted 1 request(s)" not in out:
            # In CI one of ten streams sometimes ran all 2,000 tokens (6-7 s). The cause: the scheduler held this
            # process back while the engine used every core, so it read the first update or sent the interrupt only
            # after the stream had ended (reproduced with two busy loops: 30 of 40; Kernel.yield_cpu fixes it: 0 of
            # 40). A trial whose interrupt went out after the stream's end had nothing to interrupt and is repeated
            # (twice at most). An interrupt sent while the stream still ran must stop it.
            took = re.search(r"· ([\d.]+) s · finish", out)
            told = [ln for ln in out.splitlines() if "Exception" in ln or "Interrupt" in ln]
            run = _value(kernel, "_runs[-1]")
            assert took and sent_after >= float(took.group(1)) and len(late) < 2, (sent_after, told, run, out[-500:])
            late.append(round(sent_after, 2))
            continue
        stops.append(seconds)
    figures["interrupts_sent_after_the_stream"] = late
    figures["interrupt_to_idle_s_max"] = round(max(stops), 3)
    assert sorted(p.pid for p in engine_processes(kernel.pid)) == before  # EngineCore and both workers
    assert max(stops) < 2.0, stops
    assert _greedy(kernel, PROMPTS[:1]) == [raw["single"]]


def test_unload_leaves_nothing_three_cycles(kernel, setup, raw, figures):
    for cycle in range(3):
        if cycle:
            _load(kernel, setup[1], figures, f"load_{cycle + 1}_s")
            assert _greedy(kernel, PROMPTS[:1]) == [raw["single"]]
        assert len(engine_processes(kernel.pid)) >= 3  # EngineCore and two workers
        kernel.run("%vllm_unload --all")
        _assert_idle(kernel.pid, f"after unload {cycle + 1}")


@on_gpus
def test_sleep_mode_with_tp2(kernel, setup, raw, figures):
    _load(kernel, f"{setup[1]} --enable-sleep-mode", figures, "sleep_load_s")
    loaded = gpus.used_mib()
    out = kernel.run("%vllm_sleep")
    asleep = gpus.used_mib()
    figures["sleep"] = {"used_loaded_mib": loaded, "used_asleep_mib": asleep, "line": out.strip()}
    assert "asleep (level 1)" in out and all(a < b / 4 for a, b in zip(asleep, loaded)), (out, loaded, asleep)
    out = kernel.run("%vllm_wake")
    figures["sleep"]["wake_line"] = out.strip()
    assert _greedy(kernel, PROMPTS[:1]) == [raw["single"]]
    kernel.run("%vllm_unload --all")
    _assert_idle(kernel.pid, "after unloading the sleep-mode engine")


# ------------------------------------------------------------------ a server
def test_server_with_tp2_restart_reattach_unload(kernel, setup, raw, figures):
    from vllm_notebook import procs
    from vllm_notebook.server.record import MARKER

    _load(kernel, f"{setup[1]} --server", figures, "server_start_s")
    assert _greedy(kernel, PROMPTS) == raw["batch"]
    rec_id = kernel.run("print(__import__('vllm_notebook').get_engine().backend.record.id)").strip()
    members = procs.marked(MARKER, rec_id)
    assert len(members) >= 3, members  # the API server, EngineCore and two workers
    kernel.restart()
    t = time.perf_counter()
    out = kernel.run(f"%load_ext vllm_notebook\n%vllm_load {setup[1]} --server")
    figures["server_reattach_s"] = round(time.perf_counter() - t, 3)
    assert "attached" in out and figures["server_reattach_s"] < 2.0, out
    assert sorted(procs.marked(MARKER, rec_id)) == sorted(members)
    assert _greedy(kernel, PROMPTS[:1]) == [raw["single"]]
    kernel.run("%vllm_unload")
    deadline = time.monotonic() + 30
    while procs.marked(MARKER, rec_id) and time.monotonic() < deadline:
        time.sleep(0.25)
    # Gone, or exited and waiting for init to reap them (a zombie holds no memory): stop() no longer waits for
    # the reaping of processes that are not its children (as test_procs allows for a worker).
    assert not procs.marked(MARKER, rec_id) and not any(procs.alive(p) for p in members)
    _assert_idle(None, "after stopping the server")


# ------------------------------------------------------------------ the Ray executor on our own cluster
@on_gpus
def test_ray_executor_on_our_cluster(kernel, setup, raw, figures):
    assert not ray_processes(), ray_processes()
    out = kernel.run("%vllm_cluster --up", timeout=240)
    assert "1 / 2 (0 in use)" in out, out  # Ray nodes / GPUs
    env = _value(kernel, "{k: __import__('os').environ.get(k) for k in ('RAY_ADDRESS', 'RAY_AUTH_MODE')}")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"], env
    _load(kernel, f"{setup[1]} --distributed-executor-backend ray --name ray", figures, "ray_tp2_load_s")
    facts = _value(kernel, "{k: str(v) for k, v in __import__('vllm_notebook').get_engine('ray').facts.items()}")
    assert facts["tensor_parallel_size"] == "2", facts
    assert _greedy(kernel, PROMPTS, "ray") == raw["batch"]  # the mp engine's text (raw vLLM, TP 2)
    assert "(2 in use)" in kernel.run("%vllm_cluster")
    kernel.run("%vllm_unload --name ray")
    _assert_idle(None, "after unloading the Ray TP 2 engine")
    # Pipeline parallel: the same text as our mp engine with PP 2
    pp2 = "--tensor-parallel-size 1 --pipeline-parallel-size 2"
    _load(kernel, f"{setup[1]} {pp2} --name mp_pp", figures, "mp_pp2_load_s")
    mp = _greedy(kernel, PROMPTS, "mp_pp")
    kernel.run("%vllm_unload --name mp_pp")
    _load(kernel, f"{setup[1]} {pp2} --distributed-executor-backend ray --name ray_pp", figures, "ray_pp2_load_s")
    assert _greedy(kernel, PROMPTS, "ray_pp") == mp
    kernel.run("%vllm_unload --name ray_pp")
    _assert_idle(None, "after unloading the Ray PP 2 engine")
    deadline = time.monotonic() + 30  # Ray reports freed resources a few seconds after its actors end
    while "(0 in use)" not in (out := kernel.run("%vllm_cluster")) and time.monotonic() < deadline:
        time.sleep(1)
    figures["ray_after_unload"] = out.strip()[-300:]
    assert "1 / 2 (0 in use)" in out, out  # the unloads gave the GPUs back to Ray
    kernel.run("%vllm_cluster --down")
    assert not (left := ray_gone()), left
