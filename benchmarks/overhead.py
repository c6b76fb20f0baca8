"""What vllm-notebook costs over raw vLLM, on the same engine settings.

    python benchmarks/overhead.py                       # the demo model on this machine
    python benchmarks/overhead.py --model meta-llama/Llama-3.1-8B-Instruct -- --max-model-len 4096

Prints (and writes as JSON with --json):
  batch   output tokens/s of a >=256-prompt batch through %generate / raw LLM.generate   (target >= 0.95),
          both engines loaded, trials alternating, ratio of the medians
  load    %vllm_load wall time / raw LLM(...) construction time                          (target <= 1.10)
  ext     %load_ext vllm_notebook time in a fresh interpreter, and whether it imported vLLM
  memory  kernel RSS after each of 3 %vllm_load / %vllm_unload cycles
The magics run through a real IPython shell, not by calling internals.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time

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


def main_measure(model: str, flags: list[str], prompts: list[str], max_tokens: int, trials: int) -> dict:
    """Both engines stay loaded (idle engines use no CPU) and the trials alternate, so drifts
    of the machine hit both sides alike; the ratio is of the medians."""
    import statistics

    from IPython.testing.globalipapp import start_ipython
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(flags)
    kwargs.setdefault("disable_log_stats", True)
    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    raw_load = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    ip = start_ipython()

    def run(code: str):
        r = ip.run_cell(code, store_history=False)
        if not r.success:
            raise RuntimeError(f"cell failed: {code!r}: {r.error_in_exec or r.error_before_exec}")
        return r.result

    run("%load_ext vllm_notebook")
    line = f"{shlex.quote(model)} {' '.join(shlex.quote(f) for f in flags)}"
    memory = [round(rss_mb())]
    t0 = time.perf_counter()
    run(f"%vllm_load {line}")
    our_load = time.perf_counter() - t0
    ip.user_ns.update(prompts=prompts, warm=prompts[:8])
    gen_flags = f"--temperature 0 --max-tokens {max_tokens} --ignore-eos"
    llm.generate(prompts[:8], sp, use_tqdm=False)
    run(f"%generate -i warm {gen_flags}")
    raw_tps, our_tps = [], []
    for _ in range(trials):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        raw_tps.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        gen = run(f"%generate -i prompts {gen_flags}")
        our_tps.append(gen.metrics["output_tokens"] / (time.perf_counter() - t0))
    llm.llm_engine.engine_core.shutdown()
    del llm, outs
    gc.collect()

    run("%vllm_unload --all")
    gc.collect()
    memory.append(round(rss_mb()))
    for _ in range(2):
        run(f"%vllm_load {line}")
        run("%vllm_unload --all")
        gc.collect()
        memory.append(round(rss_mb()))
    return {
        "raw": {"load_s": raw_load, "tokens_per_s": raw_tps, "median": statistics.median(raw_tps)},
        "magics": {"load_s": our_load, "tokens_per_s": our_tps, "median": statistics.median(our_tps)},
        "rss_mb_before_and_after_each_cycle": memory,
    }


def load_ext_cost() -> dict:
    code = ("import sys, time\nfrom IPython.testing.globalipapp import start_ipython\nip = start_ipython()\n"
            "t = time.perf_counter()\nip.run_cell('%load_ext vllm_notebook')\n"
            "print(time.perf_counter() - t, 'vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": float(out[-3]), "imports_vllm": out[-2] == "True", "imports_torch": out[-1] == "True"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model id or folder (default: the demo model)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("flags", nargs="*", help="engine flags after --, e.g. -- --max-model-len 4096")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm_notebook

    model = args.model or vllm_notebook.demo_model()
    flags = args.flags or (["--enforce-eager", "--max-model-len", "512"] if not args.model else [])
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(args.prompts)]

    ext = load_ext_cost()
    m = main_measure(model, flags, prompts, args.max_tokens, args.trials)
    raw, ours, mem = m["raw"], m["magics"], m["rss_mb_before_and_after_each_cycle"]
    result = {
        "model": model, "flags": flags, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "batch_throughput_ratio": ours["median"] / raw["median"],
        "load_time_ratio": ours["load_s"] / raw["load_s"],
        "raw": raw, "magics": ours, "load_ext": ext,
        "memory_third_vs_first_unload": mem[3] / mem[1],
    }
    print(f"\nvllm-notebook overhead on {model}")
    print(f"  batch   %generate / LLM.generate tokens/s : {result['batch_throughput_ratio']:.3f}"
          f"   (medians {ours['median']:.0f} vs {raw['median']:.0f} tok/s over {args.trials} alternating trials, "
          f"{args.prompts} prompts x {args.max_tokens} tokens)   target >= 0.95")
    print(f"  load    %vllm_load / LLM(...) seconds      : {result['load_time_ratio']:.3f}"
          f"   ({ours['load_s']:.1f} vs {raw['load_s']:.1f} s)   target <= 1.10")
    print(f"  ext     %load_ext                          : {ext['seconds'] * 1000:.0f} ms, imports vLLM: {ext['imports_vllm']}, torch: {ext['imports_torch']}")
    print(f"  memory  kernel RSS MB before / after unloads 1-3: {mem}   third/first = {result['memory_third_vs_first_unload']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
