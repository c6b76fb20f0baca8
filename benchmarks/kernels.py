"""Measured where users run: ``%generate`` & co. in one real Jupyter kernel, raw vLLM in another.

    python benchmarks/kernels.py                          # the demo model on this machine
    python benchmarks/kernels.py --model /path/to/model   # e.g. on a GPU node
    python benchmarks/kernels.py --sizes 256,1024 --tokens 64 --trials 9 -- --enforce-eager

Both kernels load the same model with the same engine flags (with a GPU, each also gets
``--gpu-memory-utilization 0.4`` unless given, so both fit). Every row alternates trials between the two
sides, and which goes first alternates too (an even count of trials), so drift hits both alike; with
``--repeat K`` each side's trial is its fastest of K runs in a row (a shared host's interference only slows).
Each trial is timed inside its kernel around the one call a user makes. A trial's ratio is ours / raw tokens/s
(higher is better), but for the load rows ours / raw seconds (lower is better); each row shows the median ratio
and the spread (lowest..highest).

  load, cold      fresh kernels: %load_ext + %vllm_load / import vllm + LLM(...); page cache warmed first,
                  and torch.compile's cache by a load before the clock (a user's every load but the first)
  load, preloaded %vllm_load after %load_ext imported vLLM in the background ($VLLM_NOTEBOOK_PRELOAD=1)
  same line again re-running the %vllm_load line / raw LLM(...) construction alone
  batch N x T     %generate -i prompts / llm.generate(prompts) in the raw kernel
  stream          %%generate of one prompt / raw AsyncLLM.generate on the same engine, deltas printed
  panel           the ipywidgets panel (clicked in the kernel) / the same raw stream
  concurrency     3 panels + a %generate batch at once / the same requests sent raw to the same engine
  server stream   %%generate over --server / the openai client streaming from the same server
  server batch    %generate over --server / one openai completions request with the prompt list
  replicas        %generate -i with --replicas 2 / %generate -i with one engine, on the same GPU memory (the
                  replicas split the one engine's --gpu-memory-utilization; on a GPU the raw engine is unloaded first)
                  or the same cores; batch of --replicas-size, else the largest size (data parallelism's gain,
                  not our cost: ratio > 1 is the point)
  scaling         (--scale R) R replicas on R GPUs / one engine on one GPU (target >= 0.9 x R), and R replicas /
                  one engine of --tensor-parallel-size R on the same R GPUs; batch of the first size. On the
                  CPU build a "GPU" is a core (VLLM_CPU_OMP_THREADS_BIND), and the tensor-parallel row is left out

Results go to ``artifacts/kernels.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import kernel as kernel_driver  # noqa: E402
from kernel import Kernel  # noqa: E402 - the same kernel driver the tests use

PROMPTS = ["The capital of France is", "A dog says", "Once upon a time", "The capital of Japan is",
           "One plus one is", "The sky is", "Slurm schedules", "A notebook runs"]
STREAMS = ["Once upon a time", "The capital of France is", "A dog says"]
#: Pause before each trial. After its last step a vLLM worker keeps polling its queue for a second
#: (``shm_broadcast.SpinCondition``); on a small CPU node both kernels' workers share a core, so without the
#: pause a trial that follows the other side's runs beside that polling, and the order decides the ratio.
SETTLE_S = 1.5
#: Runs per side per trial, the fastest kept (``--repeat``).
REPEAT = 1

OURS_LOAD = """import time as _t
_s = _t.perf_counter()
%load_ext vllm_notebook
%config VllmMagics.journal = False
%vllm_load {line}
print("LOAD", _t.perf_counter() - _s)
"""
RAW_LOAD = """import time as _t
_s = _t.perf_counter()
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
_parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
_ns = _parser.parse_args({flags!r})
_c = _t.perf_counter()
llm = LLM({model!r}, **{{k: v for k, v in vars(_ns).items() if v != _parser.get_default(k)}})
print("LOAD", _t.perf_counter() - _s, _t.perf_counter() - _c)
"""
PRELOADED = """import time as _t
%load_ext vllm_notebook
%config VllmMagics.journal = False
from vllm_notebook.engine import vllm_import as _vi
while _vi.preloading():  # the user reads and types meanwhile
    _t.sleep(0.1)
"""
RERUN = """_s = _t.perf_counter()
%vllm_load {line}
print("LOAD", _t.perf_counter() - _s)
"""
PROMPTS_CELL = "_p = [f'{{q}} ({{i}})' for i, q in enumerate({prompts!r} * {n})][:{size}]\n"
OURS_RUN = """_s = _t.perf_counter()
_g = %generate -i _p --temperature 0 --max-tokens {tokens} --ignore-eos
print("RUN", _t.perf_counter() - _s, _g.metrics["output_tokens"])
"""
RAW_RUN = """_s = _t.perf_counter()
_o = llm.generate(_p, SamplingParams(temperature=0, max_tokens={tokens}, ignore_eos=True), use_tqdm=False)
print("RUN", _t.perf_counter() - _s, sum(len(o.outputs[0].token_ids) for o in _o))
"""
# In our kernel: raw AsyncLLM on the same engine, as a user of vLLM's async API would stream (deltas printed).
RAW_ASYNC = """import asyncio as _aio, time as _t
from vllm import SamplingParams as _SP
from vllm.sampling_params import RequestOutputKind as _K
import vllm_notebook as _vn
_eng = _vn.get_engine()
def _sp(n, stream):
    sp = _SP(temperature=0, max_tokens=n, ignore_eos=True)
    sp.output_kind = _K.CUMULATIVE if stream else _K.FINAL_ONLY
    return sp
async def _raw(prompts, params, show):
    counts = [0] * len(prompts)
    async def one(i):
        seen = 0
        async for out in _eng.backend._llm.generate(prompts[i], params[i], f"raw-{i}-{_t.monotonic_ns()}"):
            text = out.outputs[0].text
            if show and len(text) > seen:
                print(text[seen:], end="", flush=True)
                seen = len(text)
            counts[i] = len(out.outputs[0].token_ids)
    await _aio.gather(*(one(i) for i in range(len(prompts))))
    return sum(counts)
def _raw_run(prompts, params, show=False):
    return _aio.run_coroutine_threadsafe(_raw(prompts, params, show), _eng._loop).result()
from vllm_notebook.ui.panel import PromptPanel as _Panel
def _panels(prompts, n):  # made (and shown) before the clock starts: the user has the panel open already
    ps = [_Panel(_eng, temperature=0.0, max_tokens=n, ignore_eos=True, chat=False) for _ in prompts]
    for p, s in zip(ps, prompts):
        p._box.draft = s
        display(p)
    return ps
def _click(ps):
    for p in ps:
        p.send()
    return ps
"""
STREAM_OURS = """_s = _t.perf_counter()  # what a %%generate cell runs, timed inside the cell
_g = get_ipython().run_cell_magic("generate", "--temperature 0 --max-tokens {tokens} --ignore-eos", {prompt!r})
print("\\nRUN", _t.perf_counter() - _s, _g.metrics["output_tokens"])
"""
STREAM_RAW = """_s = _t.perf_counter()
_n = _raw_run([{prompt!r}], [_sp({tokens}, True)], show=True)
print("\\nRUN", _t.perf_counter() - _s, _n)
"""
PANEL = """_ps = _panels([{prompt!r}], {tokens})
_s = _t.perf_counter()
_click(_ps)[0].wait(600)
print("RUN", _t.perf_counter() - _s, _ps[0].last_generation.metrics["output_tokens"])
"""
CONC_OURS = """_ps = _panels({streams!r}, {tokens})
_s = _t.perf_counter()
_click(_ps)
_g = %generate -i _p --temperature 0 --max-tokens {tokens} --ignore-eos
for _x in _ps:
    _x.wait(600)
print("RUN", _t.perf_counter() - _s, _g.metrics["output_tokens"] + sum(x.last_generation.metrics["output_tokens"] for x in _ps))
"""
CONC_RAW = """_s = _t.perf_counter()
_n = _raw_run({streams!r} + _p, [_sp({tokens}, True)] * 3 + [_sp({tokens}, False)] * len(_p))
print("RUN", _t.perf_counter() - _s, _n)
"""
SERVER_URL = """%vllm_unload
%vllm_load --server {line}
_srv = _vn.get_engine()
print("URL", _srv.backend.url, _srv.backend.record.key_file, _srv.model)
"""
OPENAI = """import time as _t, openai
from pathlib import Path
_c = openai.OpenAI(base_url={url!r} + "/v1", api_key=Path({key!r}).read_text().strip())
_p = [f'{{q}} ({{i}})' for i, q in enumerate({prompts!r} * {n})][:{size}]
"""
SERVER_STREAM_RAW = """_s = _t.perf_counter()
_n = 0
for _ch in _c.completions.create(model={model!r}, prompt={prompt!r}, max_tokens={tokens}, temperature=0,
                                 stream=True, extra_body={{"ignore_eos": True}}):
    print(_ch.choices[0].text, end="", flush=True)
    _n += 1
print("\\nRUN", _t.perf_counter() - _s, {tokens})
"""
SERVER_BATCH_RAW = """_s = _t.perf_counter()
_r = _c.completions.create(model={model!r}, prompt=_p, max_tokens={tokens}, temperature=0,
                           extra_body={{"ignore_eos": True}})
print("RUN", _t.perf_counter() - _s, _r.usage.completion_tokens)
"""


def _numbers(out: str, tag: str) -> list[float]:
    line = [ln for ln in out.splitlines() if ln.startswith(tag + " ")][-1]
    return [float(x) for x in line.split()[1:]]


def _words(out: str, tag: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(tag + " ")][-1].split()[1:]


class _Rows(dict):
    """The table's rows; each new row is saved at once."""

    def __init__(self, saved):
        super().__init__()
        self._saved = saved

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key}: {value['ratio_median']:.3f} ({value['ratio_min']:.3f}..{value['ratio_max']:.3f})", flush=True)
        self._saved()


def _save(results: dict, path: str) -> None:
    """Write what is measured so far (a run cut short by a time limit keeps its finished rows)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def _paired(ours: tuple, raw: tuple, trials: int, warm: bool = True) -> dict:
    """Alternate ``(kernel, code)`` of both sides ``trials`` times (rounded up to an even count, so each side goes
    first as often as the other); each trial's ratio of tokens/s. With ``REPEAT`` > 1 a side's trial is its fastest
    of that many runs in a row: interference from the rest of a shared host only ever slows a run, so the fastest
    is the estimate least disturbed by it (as ``timeit`` advises), on both sides alike."""
    if warm:
        for k, code in (ours, raw):
            k.run(code, timeout=900)
    rows = []
    for t in range(trials + trials % 2):
        sides = [("ours", *ours), ("raw", *raw)]
        seen = {}
        cpu = {}
        for name, k, code in (sides if t % 2 == 0 else sides[::-1]):
            time.sleep(SETTLE_S)
            before = _cpu(k)
            runs = [_numbers(k.run(code, timeout=900), "RUN") for _ in range(REPEAT)]
            seen[name] = min(runs)  # (seconds, tokens): the fastest
            cpu[name] = [(b - a) / REPEAT for a, b in zip(before, _cpu(k))]
        (s_o, n_o), (s_r, n_r) = seen["ours"], seen["raw"]
        rows.append({"ours_s": s_o, "raw_s": s_r, "ours_tokens": n_o, "raw_tokens": n_r,
                     "ratio": (n_o / s_o) / (n_r / s_r),
                     "ours_cpu_front": cpu["ours"][0], "ours_cpu_engine": cpu["ours"][1],
                     "raw_cpu_front": cpu["raw"][0], "raw_cpu_engine": cpu["raw"][1]})
    return _summary(rows)


def _scaling(out: dict, model: str, flags: list[str], env: dict, r: int, run: str, size: int, a) -> None:
    """Issue 34's rows: R replicas on R GPUs against one engine on one of them, and against one engine with
    tensor parallelism over the same R (GPUs only: vLLM's CPU build has no tensor parallelism across cores
    worth comparing). Each side in a kernel of its own that sees only its devices."""
    gpu = "VLLM_CPU_KVCACHE_SPACE" not in env
    if gpu:
        ids = [i.strip() for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip()] or \
            subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.split()
        see = lambda n: {**env, "CUDA_VISIBLE_DEVICES": ",".join(ids[:n])}  # noqa: E731
    else:
        ids = [str(c) for c in sorted(os.sched_getaffinity(0))]
        see = lambda n: {**env, "VLLM_CPU_OMP_THREADS_BIND": ",".join(ids[:n])}  # noqa: E731
    if len(ids) < r:
        raise SystemExit(f"--scale {r} needs {r} {'GPUs' if gpu else 'cores'}; this machine has {len(ids)}")
    kernels: dict[str, Kernel] = {}

    def up(name: str, side_env: dict, extra: list[str]) -> Kernel:
        kernels[name] = Kernel(env=side_env)
        kernels[name].run(OURS_LOAD.format(line=shlex.join([model, *flags, *extra])), timeout=900)
        return kernels[name]

    try:  # two sides loaded at a time (each GPU then holds two engines' --gpu-memory-utilization, not three)
        replicas = up("replicas", see(r), ["--replicas", str(r)])
        one = up("one", see(1), [])
        what = "GPUs" if gpu else "cores"
        out[f"replicas {r} on {r} {what} vs 1 engine on 1, batch {size} x {a.tokens}"] = _paired(
            (replicas, run), (one, run), a.trials)
        if gpu:
            kernels.pop("one").shutdown()
            tp = up("tp", see(r), ["--tensor-parallel-size", str(r)])
            out[f"replicas {r} vs TP {r} on {r} GPUs, batch {size} x {a.tokens}"] = _paired(
                (replicas, run), (tp, run), a.trials)
    finally:
        for k in kernels.values():
            k.shutdown()


def _cpu(k: Kernel) -> tuple[float, float]:
    """CPU-seconds so far of the kernel process (the front end) and of its engine processes (its children;
    a server's engine is not one). Wall time on a small node is noisy; CPU-seconds show who did the work."""
    def used(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    proc = psutil.Process(k.pid)
    return used(proc), sum(used(c) for c in proc.children(recursive=True))


def _summary(rows: list[dict]) -> dict:
    ratios = [r["ratio"] for r in rows]
    out = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "trials": rows}
    if "ours_tokens" in rows[0]:
        out["ours_tok_s_median"] = statistics.median(r["ours_tokens"] / r["ours_s"] for r in rows)
        out["raw_tok_s_median"] = statistics.median(r["raw_tokens"] / r["raw_s"] for r in rows)
        for key in ("ours_cpu_front", "ours_cpu_engine", "raw_cpu_front", "raw_cpu_engine"):
            out[key + "_median"] = statistics.median(r[key] for r in rows)
    else:
        out["ours_s_median"] = statistics.median(r["ours_s"] for r in rows)
        out["raw_s_median"] = statistics.median(r["raw_s"] for r in rows)
    return out


def _bandwidth_bound(model: str, results: dict) -> dict | None:
    """One stream's ceiling on this card: each decode step reads every weight once, so tokens/s is at most the
    memory bandwidth over the weights' bytes (KV cache and activations only lower it). None without a GPU."""
    from vllm_notebook.engine import gpus

    cards, size = gpus.cards(), gpus.weight_bytes(model)
    results["card"] = cards[0] if cards else None
    if not cards or not size or not cards[0]["bandwidth_gb_s"]:
        return None
    bound = {"card": cards[0]["name"], "bandwidth_gb_s": cards[0]["bandwidth_gb_s"], "weight_bytes": size,
             "tok_s": cards[0]["bandwidth_gb_s"] * 1e9 / size}
    results["bandwidth_bound"] = bound
    return bound


def _load(model: str, flags: list[str], env: dict, pairs: int, timed: bool = True,
          raw_engine: bool = True) -> tuple[dict, Kernel, Kernel]:
    """Fresh kernels load the model, in alternating order; the last pair is kept for the other rows.
    Not ``timed`` (no load row wanted): one pair, without the compile-cache warm-up and the preloaded kernel,
    and the raw kernel loads no engine unless ``raw_engine`` (the batch rows need it; the stream, panel and
    concurrency rows compare with raw ``AsyncLLM`` in our kernel, and the server rows start a raw kernel of their own).

    Rows (ours / raw seconds: lower is better): a cold load; a load after ``%load_ext`` imported vLLM in the
    background (``$VLLM_NOTEBOOK_PRELOAD=1``, while the user writes the next cell) against raw import+construct;
    re-running the same ``%vllm_load`` line against raw's construct alone (what re-running ``LLM(...)`` costs).
    """
    subprocess.run([sys.executable, "-c", "import vllm"], check=True, capture_output=True)  # warm the page cache
    if timed and "--enforce-eager" not in flags:  # torch.compile's cache: else the first side to load pays for compiling
        warm = Kernel(env=env)
        warm.run(RAW_LOAD.format(model=model, flags=flags), timeout=900)
        warm.shutdown()
    line = shlex.join([model, *flags])
    rows: dict[str, list] = {"cold": [], "preloaded": [], "rerun": []}
    kept = None
    for t in range(pairs if timed else 1):
        for k in kept or ():
            k.shutdown()
        if timed:
            pre = Kernel(env={**env, "VLLM_NOTEBOOK_PRELOAD": "1"})
            pre.run(PRELOADED, timeout=900)
            preloaded = _numbers(pre.run(RERUN.format(line=line), timeout=900), "LOAD")[0]
            pre.shutdown()
        ours, raw = Kernel(env=env), Kernel(env=env)
        seconds = {}
        sides = [("ours", ours, OURS_LOAD.format(line=line)), ("raw", raw, RAW_LOAD.format(model=model, flags=flags))]
        for name, k, code in (sides if t % 2 == 0 else sides[::-1]):
            if timed or raw_engine or name == "ours":
                seconds[name] = _numbers(k.run(code, timeout=900), "LOAD")
        kept = (ours, raw)
        if not timed:
            return {}, *kept
        (cold,), (raw_all, raw_construct) = seconds["ours"], seconds["raw"]
        rerun = _numbers(ours.run(RERUN.format(line=line), timeout=900), "LOAD")[0]
        rows["cold"].append({"ours_s": cold, "raw_s": raw_all, "ratio": cold / raw_all})
        rows["preloaded"].append({"ours_s": preloaded, "raw_s": raw_all, "ratio": preloaded / raw_all})
        rows["rerun"].append({"ours_s": rerun, "raw_s": raw_construct, "ratio": rerun / raw_construct})
        print(f"load pair {t + 1}: cold {cold:.1f} s / raw {raw_all:.1f} s, preloaded {preloaded:.1f} s, "
              f"same line again {rerun:.3f} s / raw construct {raw_construct:.1f} s", flush=True)
    return {k: _summary(v) for k, v in rows.items()}, *kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the demo model)")
    ap.add_argument("--sizes", default="256,1024", help="batch sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt (ignore_eos)")
    ap.add_argument("--stream-tokens", type=int, default=256, help="tokens of the streamed prompt")
    ap.add_argument("--trials", type=int, default=7, help="paired trials per row (rounded up to an even count)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per side in a trial, the fastest kept (3 on a noisy shared GPU host)")
    ap.add_argument("--load-pairs", type=int, default=2, help="fresh-kernel load pairs (order alternates)")
    ap.add_argument("--rows", default="load,batch,stream,panel,concurrency,server",
                    help="which rows, comma-separated")
    ap.add_argument("--replicas-size", type=int, default=None,
                    help="the replicas row's batch (default: the largest of --sizes)")
    ap.add_argument("--replicas-trials", type=int, default=None, help="the replicas row's trials (default: --trials)")
    ap.add_argument("--scale", type=int, default=2, help="the scaling rows' R: replicas on R GPUs (or cores)")
    ap.add_argument("--json", default="artifacts/kernels.json")
    ap.add_argument("--kernel-nice", type=int, default=None,
                    help="the kernels' session nice as they start (default: the tests' 10; 0 leaves them as a "
                         "user's kernel starts, so ours takes nice 10 itself on vLLM's CPU build)")
    ap.add_argument("flags", nargs="*", help="engine flags, after --")
    a = ap.parse_args()
    global REPEAT
    REPEAT = max(1, a.repeat)
    a.trials += a.trials % 2  # each side first as often as the other (``_paired`` rounds up too)
    if a.kernel_nice is not None:
        kernel_driver.YIELD_NICE = a.kernel_nice
    if a.model:
        model = a.model
    else:
        import vllm_notebook

        model = vllm_notebook.demo_model()
    flags = a.flags or (["--enforce-eager", "--max-model-len", "512"] if not a.model else [])
    if shutil.which("nvidia-smi") and not any(f.startswith("--gpu-memory-utilization") for f in flags):
        flags = [*flags, "--gpu-memory-utilization", "0.4"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"} if not shutil.which("nvidia-smi") else {}
    wanted = set(a.rows.split(","))
    results: dict = {"model": model, "flags": flags, "tokens": a.tokens, "trials": a.trials,
                     "repeat": a.repeat, "rows": {}}
    rows = results["rows"] = _Rows(lambda: _save(results, a.json))
    if "scaling" in wanted:  # first, in kernels of its own (no other engine holding the GPUs' memory)
        size = int(a.sizes.split(",")[0])
        cell = PROMPTS_CELL.format(prompts=PROMPTS, n=size // len(PROMPTS) + 1, size=size)
        _scaling(rows, model, flags, env, a.scale, cell + OURS_RUN.format(tokens=a.tokens), size, a)
        wanted.discard("scaling")
    if not wanted:
        _report(model, flags, a, results)
        return
    load, ours, raw = _load(model, flags, env, a.load_pairs, timed="load" in wanted, raw_engine="batch" in wanted)
    if "load" in wanted:
        rows["load, cold"] = load["cold"]
        rows["load, vLLM preloaded"] = load["preloaded"]
        rows["load, same line again"] = load["rerun"]
    stream_prompt, n_stream = "Once upon a time", a.stream_tokens
    conc = int(a.sizes.split(",")[0])
    try:
        if "batch" in wanted:
            for size in [int(s) for s in a.sizes.split(",")]:
                cell = PROMPTS_CELL.format(prompts=PROMPTS, n=size // len(PROMPTS) + 1, size=size)
                rows[f"batch {size} x {a.tokens}"] = _paired((ours, cell + OURS_RUN.format(tokens=a.tokens)),
                                                            (raw, cell + RAW_RUN.format(tokens=a.tokens)), a.trials)
        ours.run(RAW_ASYNC)
        fill = dict(prompt=stream_prompt, tokens=n_stream)
        raw_stream = (ours, STREAM_RAW.format(**fill))
        if "stream" in wanted:
            rows[f"stream 1 x {n_stream}"] = _paired((ours, STREAM_OURS.format(**fill)), raw_stream, a.trials)
        if "panel" in wanted:
            rows[f"panel 1 x {n_stream}"] = _paired((ours, PANEL.format(**fill)), raw_stream, a.trials)
        if "concurrency" in wanted:
            ours.run(PROMPTS_CELL.format(prompts=PROMPTS, n=conc // len(PROMPTS) + 1, size=conc))
            fill_c = dict(streams=STREAMS, tokens=a.tokens)
            rows[f"3 panels + batch {conc}"] = _paired((ours, CONC_OURS.format(**fill_c)),
                                                       (ours, CONC_RAW.format(**fill_c)), a.trials)
        if "replicas" in wanted:
            size = a.replicas_size or max(int(s) for s in a.sizes.split(","))
            if "VLLM_CPU_KVCACHE_SPACE" not in env:  # a GPU: the raw engine's memory goes to the replicas
                raw.shutdown()
                raw = Kernel(env=env)
            cell = PROMPTS_CELL.format(prompts=PROMPTS, n=size // len(PROMPTS) + 1, size=size)
            # The one engine on the same cores as the two replicas: vLLM's CPU build would keep one core for the
            # front end ("auto" binding), which the replicas (one core each, bound by us) do not.
            cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
            one = Kernel(env={**env, "VLLM_CPU_OMP_THREADS_BIND": cores}) if "VLLM_CPU_KVCACHE_SPACE" in env else ours
            two = Kernel(env=env)
            try:
                if one is not ours:
                    one.run(OURS_LOAD.format(line=shlex.join([model, *flags])), timeout=900)
                two.run(OURS_LOAD.format(line=shlex.join([model, *flags, "--replicas", "2"])), timeout=900)
                rows[f"replicas 2 vs 1, batch {size} x {a.tokens}"] = _paired(
                    (two, cell + OURS_RUN.format(tokens=a.tokens)), (one, cell + OURS_RUN.format(tokens=a.tokens)),
                    a.replicas_trials or a.trials)
            finally:
                two.shutdown()
                if one is not ours:
                    one.shutdown()
        if "server" in wanted:
            raw.shutdown()
            raw = Kernel(env=env)
            url, key, served = _words(ours.run(SERVER_URL.format(line=shlex.join([model, *flags])), timeout=900),
                                      "URL")
            size = int(a.sizes.split(",")[0])
            raw.run(OPENAI.format(url=url, key=key, prompts=PROMPTS, n=size // len(PROMPTS) + 1, size=size))
            ours.run(PROMPTS_CELL.format(prompts=PROMPTS, n=size // len(PROMPTS) + 1, size=size))
            rows[f"server stream 1 x {n_stream}"] = _paired(
                (ours, STREAM_OURS.format(**fill)), (raw, SERVER_STREAM_RAW.format(model=served, **fill)), a.trials)
            rows[f"server batch {size} x {a.tokens}"] = _paired(
                (ours, OURS_RUN.format(tokens=a.tokens)),
                (raw, SERVER_BATCH_RAW.format(model=served, tokens=a.tokens)), a.trials)
            ours.run("%vllm_unload")
    finally:
        ours.shutdown()
        raw.shutdown()
    _report(model, flags, a, results)


def _report(model: str, flags: list[str], a, results: dict) -> None:
    """The table of rows, the bandwidth bound of a stream row, CPU-seconds; the JSON saved."""
    rows = results["rows"]
    print(f"\nreal Jupyter kernels, {model} {' '.join(flags)}; {a.trials} paired trials per row"
          + (f", each side's fastest of {a.repeat} runs a trial" if a.repeat > 1 else ""))
    print(f"{'row':<28}{'ours / raw':>11}{'spread':>16}{'ours':>14}{'raw':>14}")
    for name, row in rows.items():
        spread = f"{row['ratio_min']:.3f}..{row['ratio_max']:.3f}"
        if "ours_tok_s_median" in row:
            figures = f"{row['ours_tok_s_median']:>10,.0f} t/s{row['raw_tok_s_median']:>10,.0f} t/s"
        else:
            figures = f"{row['ours_s_median']:>13.2f}s{row['raw_s_median']:>13.2f}s"
        print(f"{name:<28}{row['ratio_median']:>11.3f}{spread:>16}{figures}")
    bound = _bandwidth_bound(model, results)
    for name, row in rows.items():
        if bound and name.startswith("stream") and "ours_tok_s_median" in row:
            print(f"\n{name} against the memory-bandwidth bound ({bound['card']}: {bound['bandwidth_gb_s']:,} GB/s over "
                  f"{bound['weight_bytes'] / 1e9:.2f} GB of weights = {bound['tok_s']:,.0f} tok/s a step): raw "
                  f"{row['raw_tok_s_median'] / bound['tok_s']:.1%}, ours {row['ours_tok_s_median'] / bound['tok_s']:.1%}")
            row["raw_of_bound"] = row["raw_tok_s_median"] / bound["tok_s"]
            row["ours_of_bound"] = row["ours_tok_s_median"] / bound["tok_s"]
    print("\nCPU-seconds per trial (medians), front end = the kernel process, engine = its child processes:")
    for name, row in rows.items():
        if "ours_cpu_front_median" in row:
            print(f"{name:<28} ours {row['ours_cpu_front_median']:.2f} + {row['ours_cpu_engine_median']:.2f}"
                  f"   raw {row['raw_cpu_front_median']:.2f} + {row['raw_cpu_engine_median']:.2f}")
    _save(results, a.json)


if __name__ == "__main__":
    main()
