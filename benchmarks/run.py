"""What vllm-notebook costs over raw vLLM, in one command. Prints a table of ratios and writes it as JSON.

    python benchmarks/run.py                   # the demo model on this machine (CPU)
    python benchmarks/run.py --smoke           # a quick run with small sizes (CI runs this)
    python benchmarks/run.py --model meta-llama/Llama-3.1-8B-Instruct -- --max-model-len 4096   # a GPU node

The magics run in a real IPython shell (the server row: in a real Jupyter kernel), never by calling
internals. Raw baselines use vLLM directly with the same engine settings:
  1 batch        output tokens/s of a >=256-prompt batch: %generate / raw LLM.generate          (>= 0.97)
  2 streaming    one streamed prompt through %%generate and through the panel / raw AsyncLLM.generate
                 on the same engine: tokens/s ratio (>= 0.95), TTFT overhead (< 20 ms), display redraws/s
                 while streaming (<= 20)
  3 load         %vllm_load wall time / raw LLM(...) construction, medians                      (<= 1.05)
  4 %load_ext    time in a fresh interpreter (< 0.3 s), and whether it imported vLLM (must not)
  5 memory       RSS (vLLM imported) before the first load and after each of 5 load/unload cycles (within 10%)
  6 server       %vllm_load --server after a kernel restart (reattach) / cold server start
  7 concurrency  3 panels + one %generate batch at once: aggregate tokens/s / the same requests sent raw (>= 0.95)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
PROMPTS = ["The capital of France is", "A dog says", "Once upon a time", "The capital of Japan is",
           "One plus one is", "The sky is", "Slurm schedules", "A notebook runs"]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def engine_kwargs(flags: list[str]) -> dict:
    """The same engine flags, as keyword arguments for raw vLLM (vLLM's own parser)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(flags)
    return {k: v for k, v in vars(ns).items() if v != parser.get_default(k)}


def load_ext_cost() -> dict:
    code = ("import sys, time\nfrom IPython.testing.globalipapp import start_ipython\nip = start_ipython()\n"
            "t = time.perf_counter()\nip.run_cell('%load_ext vllm_notebook')\n"
            "print(time.perf_counter() - t, 'vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": float(out[-3]), "imports_vllm": out[-2] == "True", "imports_torch": out[-1] == "True"}


class Shell:
    """A real IPython shell with the extension loaded; cells raise on error; terminal output swallowed."""

    def __init__(self):
        from IPython.testing.globalipapp import start_ipython

        self.ip = start_ipython()
        self("%load_ext vllm_notebook")
        self("%config VllmMagics.journal = False")  # every row sends its prompts; row 8 measures the journal

    def __call__(self, code: str):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            r = self.ip.run_cell(code, store_history=False)
        if not r.success:
            raise RuntimeError(f"cell failed: {code!r}: {r.error_in_exec or r.error_before_exec}")
        return r.result


def _raw_llm(model: str, kwargs: dict):
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    return llm, time.perf_counter() - t0


def _stop_raw(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# ------------------------------------------------------------------ raw AsyncLLM on the engine's own loop
def _on_loop(engine, coro):
    return asyncio.run_coroutine_threadsafe(coro, engine._loop).result()


async def _raw_requests(llm, prompts: list[str], params_list: list, tag: str) -> tuple[list[float | None], int, float]:
    """Send requests straight to AsyncLLM; per request the time to first token; total tokens; wall time."""
    t0 = time.perf_counter()
    firsts: list[float | None] = [None] * len(prompts)
    counts = [0] * len(prompts)

    async def one(i: int) -> None:
        async for out in llm.generate(prompts[i], params_list[i], f"raw-{tag}-{i}-{time.monotonic_ns()}"):
            if firsts[i] is None:
                firsts[i] = time.perf_counter() - t0
            counts[i] = len(out.outputs[0].token_ids)

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return firsts, sum(counts), time.perf_counter() - t0


def _sampling(max_tokens: int, stream: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sp.output_kind = RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY
    return sp


# ------------------------------------------------------------------ measurements
def measure_stream(sh: Shell, engine, max_tokens: int, trials: int) -> dict:
    """One streamed prompt: %%generate (timed from the cell's start) vs the panel vs raw AsyncLLM."""
    from vllm_notebook.ui import display
    from vllm_notebook.ui.panel import PromptPanel

    prompt = "Once upon a time"
    cell = f"%%generate --temperature 0 --max-tokens {max_tokens} --ignore-eos\n{prompt}"
    first: list[float] = []
    shown_at: list[float] = []  # when the cell's text was redrawn while streaming
    original = display.TextStream.update

    def timed_update(self, text):
        if not first:
            first.append(time.perf_counter())
        before = self.updates
        original(self, text)
        if self.updates > before:
            shown_at.append(time.perf_counter())

    rows = {"raw": [], "magic": [], "panel": []}
    for _ in range(trials):
        firsts, n, wall = _on_loop(engine, _raw_requests(engine.backend._llm, [prompt], [_sampling(max_tokens, True)], "s"))
        rows["raw"].append({"ttft_s": firsts[0], "tokens_per_s": n / wall})

        first.clear()
        shown_at.clear()
        display.TextStream.update = timed_update
        try:
            t0 = time.perf_counter()
            gen = sh(cell)
            wall = time.perf_counter() - t0
        finally:
            display.TextStream.update = original
        rows["magic"].append({"ttft_s": first[0] - t0, "tokens_per_s": gen.metrics["output_tokens"] / wall,
                              "updates_per_s": _rate(shown_at)})

        panel = PromptPanel(engine, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, chat=False)
        panel._box.draft = prompt
        shown: list[float] = []
        show = panel._show_stream

        def timed_show(show=show, shown=shown):
            shown.append(time.perf_counter())
            show()

        panel._show_stream = timed_show
        t0 = time.perf_counter()
        panel.send()
        panel.wait(600)
        wall = time.perf_counter() - t0
        g = panel.last_generation
        rows["panel"].append({"ttft_s": shown[0] - t0, "tokens_per_s": g.metrics["output_tokens"] / wall,
                              "updates_per_s": _rate(shown)})

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[side])

    return {
        "trials": rows, "max_tokens": max_tokens,
        "raw_ttft_ms": med("raw", "ttft_s") * 1000, "raw_tokens_per_s": med("raw", "tokens_per_s"),
        "magic_ttft_ms": med("magic", "ttft_s") * 1000, "magic_tokens_per_s": med("magic", "tokens_per_s"),
        "panel_ttft_ms": med("panel", "ttft_s") * 1000, "panel_tokens_per_s": med("panel", "tokens_per_s"),
        "magic_ratio": med("magic", "tokens_per_s") / med("raw", "tokens_per_s"),
        "panel_ratio": med("panel", "tokens_per_s") / med("raw", "tokens_per_s"),
        "magic_ttft_overhead_ms": (med("magic", "ttft_s") - med("raw", "ttft_s")) * 1000,
        "panel_ttft_overhead_ms": (med("panel", "ttft_s") - med("raw", "ttft_s")) * 1000,
        "panel_updates_per_s": med("panel", "updates_per_s"),
        "magic_updates_per_s": med("magic", "updates_per_s"),
    }


def _rate(times: list[float]) -> float:
    """Redraws per second while text streamed in: intervals between redraws (the throttle's rate)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def measure_concurrency(sh: Shell, engine, n_batch: int, max_tokens: int, trials: int) -> dict:
    """3 panels streaming and one %generate batch at once, against the same requests sent raw."""
    from vllm_notebook.ui.panel import PromptPanel

    streams = ["Once upon a time", "The capital of France is", "A dog says"]
    batch = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(n_batch)]
    sh.ip.user_ns["conc_batch"] = batch
    ours, raw = [], []
    for _ in range(trials):
        params = [_sampling(max_tokens, True)] * 3 + [_sampling(max_tokens, False)] * n_batch
        _, n, wall = _on_loop(engine, _raw_requests(engine.backend._llm, streams + batch, params, "c"))
        raw.append(n / wall)

        panels = [PromptPanel(engine, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, chat=False) for _ in streams]
        t0 = time.perf_counter()
        for p, s in zip(panels, streams):
            p.send(s)
        gen = sh(f"%generate -i conc_batch --temperature 0 --max-tokens {max_tokens} --ignore-eos")
        for p in panels:
            p.wait(600)
        wall = time.perf_counter() - t0
        tokens = gen.metrics["output_tokens"] + sum(p.last_generation.metrics["output_tokens"] for p in panels)
        assert tokens == n, (tokens, n)  # the same work on both sides
        ours.append(tokens / wall)
    return {"requests": 3 + n_batch, "max_tokens": max_tokens, "raw_tokens_per_s": raw, "our_tokens_per_s": ours,
            "ratio": statistics.median(ours) / statistics.median(raw)}


def measure_batch(sh: Shell, llm, prompts: list[str], max_tokens: int, trials: int) -> dict:
    """Both engines loaded (an idle engine uses no CPU), trials alternating: drift hits both alike."""
    sp = _sampling(max_tokens, False)
    sh.ip.user_ns.update(bench_prompts=prompts, bench_warm=prompts[:8])
    flags = f"--temperature 0 --max-tokens {max_tokens} --ignore-eos"
    llm.generate(prompts[:8], sp, use_tqdm=False)
    sh(f"%generate -i bench_warm {flags}")
    raw, ours = [], []
    for _ in range(trials):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        raw.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        gen = sh(f"%generate -i bench_prompts {flags}")
        ours.append(gen.metrics["output_tokens"] / (time.perf_counter() - t0))
    return {"prompts": len(prompts), "max_tokens": max_tokens, "raw_tokens_per_s": raw, "our_tokens_per_s": ours,
            "ratio": statistics.median(ours) / statistics.median(raw)}


def measure_journal(sh: Shell, prompts: list[str], max_tokens: int, trials: int) -> dict:
    """The same batch with the journal writing every result (``--fresh``: all sent) and with it off, interleaved."""
    import tempfile

    flags = f"--temperature 0 --max-tokens {max_tokens} --ignore-eos"
    with tempfile.TemporaryDirectory() as tmp:
        sh(f"%config VllmMagics.journal_path = {str(Path(tmp) / 'bench.vllm-journal.jsonl')!r}")
        sh("%config VllmMagics.journal = True")
        on, off = [], []
        for _ in range(trials):
            t0 = time.perf_counter()
            sh(f"%generate -i bench_prompts {flags} --fresh")
            on.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sh(f"%generate -i bench_prompts {flags} --no-journal")
            off.append(time.perf_counter() - t0)
        size = (Path(tmp) / "bench.vllm-journal.jsonl").stat().st_size
        sh("%config VllmMagics.journal = False")
        sh("%config VllmMagics.journal_path = ''")
    return {"prompts": len(prompts), "max_tokens": max_tokens, "on_s": on, "off_s": off, "journal_bytes": size,
            "overhead": statistics.median(on) / statistics.median(off) - 1}


# ------------------------------------------------------------------ the command
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the demo model)")
    ap.add_argument("--smoke", action="store_true", help="small sizes, one trial: checks that everything runs")
    ap.add_argument("--json", default="artifacts/benchmark.json", help="write the results here")
    ap.add_argument("--no-server", action="store_true", help="skip the server-mode row")
    ap.add_argument("--trials", type=int, help="timed trials of each throughput row (default 7; 1 with --smoke)")
    ap.add_argument("--cycles", type=int, help="load/unload cycles and raw loads (default 5 and 3)")
    ap.add_argument("flags", nargs="*", help="engine flags, after --")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm_notebook

    model = a.model or vllm_notebook.demo_model()
    flags = a.flags or (["--enforce-eager", "--max-model-len", "512"] if not a.model else [])
    size = dict(prompts=32, max_tokens=16, trials=1, cycles=2, stream_tokens=64, conc=16, conc_tokens=16,
                conc_trials=1, raw_loads=1, restarts=1) \
        if a.smoke else dict(prompts=256, max_tokens=64, trials=7, cycles=5, stream_tokens=256, conc=64,
                             conc_tokens=128, conc_trials=5, raw_loads=3, restarts=3)
    if a.trials:
        size.update(trials=a.trials, conc_trials=a.trials)
    if a.cycles:
        size.update(cycles=a.cycles, raw_loads=a.cycles)
    line = shlex.join([model, *flags])
    t_start = time.perf_counter()

    ext = load_ext_cost()
    kwargs = engine_kwargs(flags)  # imports vLLM: both sides' load times then exclude the import
    kwargs.setdefault("disable_log_stats", True)
    sh = Shell()
    memory, our_loads = [round(rss_mb())], []
    for _ in range(size["cycles"]):
        t0 = time.perf_counter()
        sh(f"%vllm_load {line}")
        our_loads.append(time.perf_counter() - t0)
        sh("%vllm_unload --all")
        gc.collect()
        memory.append(round(rss_mb()))
    raw_loads = []
    for i in range(size["raw_loads"]):
        llm, seconds = _raw_llm(model, kwargs)
        raw_loads.append(seconds)
        if i < size["raw_loads"] - 1:
            _stop_raw(llm)
    t0 = time.perf_counter()
    engine = sh(f"%vllm_load {line}")
    our_loads.append(time.perf_counter() - t0)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(size["prompts"])]
    batch = measure_batch(sh, llm, prompts, size["max_tokens"], size["trials"])
    _stop_raw(llm)
    journal = measure_journal(sh, prompts, size["max_tokens"], size["trials"])
    stream = measure_stream(sh, engine, size["stream_tokens"], max(1, size["trials"] // 2))
    conc = measure_concurrency(sh, engine, size["conc"], size["conc_tokens"], size["conc_trials"])
    sh("%vllm_unload --all")

    server = None
    if not a.no_server:
        sys.path.insert(0, str(HERE))
        import reattach

        server = reattach.measure(model, flags, repeats=size["restarts"], in_kernel=False)

    load = {"our_s": our_loads, "raw_s": raw_loads,
            "ratio": statistics.median(our_loads) / statistics.median(raw_loads)}
    result = {"model": model, "flags": flags, "smoke": a.smoke, "batch": batch, "stream": stream, "load": load,
              "load_ext": ext, "memory_mb": memory, "memory_last_over_first": memory[-1] / memory[1],
              "server": server, "concurrency": conc, "journal": journal, "seconds": time.perf_counter() - t_start}
    print_table(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
        print(f"\nwritten to {a.json}")


def print_table(r: dict) -> None:
    b, s, c, ld, e = r["batch"], r["stream"], r["concurrency"], r["load"], r["load_ext"]
    rows = [
        ("1 batch tokens/s: %generate / LLM.generate", f"{b['ratio']:.3f}",
         f"{statistics.median(b['our_tokens_per_s']):.0f} vs {statistics.median(b['raw_tokens_per_s']):.0f} tok/s, "
         f"{b['prompts']} prompts x {b['max_tokens']} tokens", ">= 0.97"),
        ("2 stream tokens/s: %%generate / AsyncLLM", f"{s['magic_ratio']:.3f}",
         f"{s['magic_tokens_per_s']:.0f} vs {s['raw_tokens_per_s']:.0f} tok/s, {s['max_tokens']} tokens", ">= 0.95"),
        ("  stream tokens/s: panel / AsyncLLM", f"{s['panel_ratio']:.3f}", f"{s['panel_tokens_per_s']:.0f} tok/s",
         ">= 0.95"),
        ("  TTFT overhead: %%generate, panel", f"{s['magic_ttft_overhead_ms']:+.1f} ms",
         f"{s['panel_ttft_overhead_ms']:+.1f} ms (raw TTFT {s['raw_ttft_ms']:.1f} ms)", "< 20 ms"),
        ("  display redraws per second: %%generate, panel", f"{s['magic_updates_per_s']:.1f}",
         f"{s['panel_updates_per_s']:.1f}", "<= 20"),
        ("3 load: %vllm_load / LLM(...)", f"{ld['ratio']:.3f}",
         f"{statistics.median(ld['our_s']):.1f} vs {statistics.median(ld['raw_s']):.1f} s", "<= 1.05"),
        ("4 %load_ext", f"{e['seconds'] * 1000:.0f} ms", f"imports vLLM: {e['imports_vllm']}, torch: {e['imports_torch']}",
         "< 300 ms, no vLLM"),
        ("5 memory: RSS before, after each unload", f"{r['memory_last_over_first']:.3f}",
         " / ".join(map(str, r["memory_mb"])) + " MB", "within 10%"),
    ]
    if r["server"]:
        v = r["server"]
        rows.append(("6 server: reattach / cold start", f"{v['reattach_over_cold']:.4f}",
                     f"{v['reattach_median_s']:.3f} vs {v['cold_server_s']:.1f} s", "reattach < 2 s"))
    rows.append(("7 concurrency: 3 panels + batch / raw", f"{c['ratio']:.3f}",
                 f"{statistics.median(c['our_tokens_per_s']):.0f} vs {statistics.median(c['raw_tokens_per_s']):.0f} "
                 f"tok/s, {c['requests']} requests x {c['max_tokens']} tokens", ">= 0.95"))
    j = r["journal"]
    rows.append(("8 journal: batch time with / without - 1", f"{100 * j['overhead']:+.1f}%",
                 f"{statistics.median(j['on_s']):.3f} vs {statistics.median(j['off_s']):.3f} s, {j['prompts']} prompts "
                 f"x {j['max_tokens']} tokens, {j['journal_bytes'] / 2**10:.0f} KiB written", "< 2%"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    kind = "smoke run (small sizes: the ratios are noisy)" if r["smoke"] else "full run"
    print(f"\nvllm-notebook vs raw vLLM on {r['model']} ({kind}, {r['seconds']:.0f} s)")
    for row in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
