"""Batches measured where users run them: ``%generate`` in one real Jupyter kernel, raw ``LLM.generate`` in another.

    python benchmarks/kernels.py                          # the demo model on this machine
    python benchmarks/kernels.py --model /path/to/model   # e.g. on a GPU node
    python benchmarks/kernels.py --sizes 256,1024 --tokens 64 --trials 9 -- --enforce-eager

Both kernels load the same model with the same engine flags (with a GPU, each also gets
``--gpu-memory-utilization 0.4`` unless given, so both fit). Then, for each batch size, trials alternate
between the kernels, and which one goes first alternates too, so drift hits both alike. Each trial is
timed inside its kernel around the one call a user makes. A trial's ratio is ours / raw output tokens/s;
the table shows the median ratio and the spread (lowest and highest) over the paired trials. The load row
is a fresh kernel's ``%load_ext`` + ``%vllm_load`` against a fresh kernel's ``import vllm`` + ``LLM(...)``.
Results go to ``artifacts/kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel import Kernel  # noqa: E402 - the same kernel driver the tests use

PROMPTS = ["The capital of France is", "A dog says", "Once upon a time", "The capital of Japan is",
           "One plus one is", "The sky is", "Slurm schedules", "A notebook runs"]

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
llm = LLM({model!r}, **{{k: v for k, v in vars(_ns).items() if v != _parser.get_default(k)}})
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


def _numbers(out: str, tag: str) -> list[float]:
    line = [ln for ln in out.splitlines() if ln.startswith(tag + " ")][-1]
    return [float(x) for x in line.split()[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the demo model)")
    ap.add_argument("--sizes", default="256,1024", help="batch sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt (ignore_eos)")
    ap.add_argument("--trials", type=int, default=7, help="paired trials per size")
    ap.add_argument("--json", default="artifacts/kernels.json")
    ap.add_argument("flags", nargs="*", help="engine flags, after --")
    a = ap.parse_args()
    if a.model:
        model = a.model
    else:
        import vllm_notebook

        model = vllm_notebook.demo_model()
    flags = a.flags or (["--enforce-eager", "--max-model-len", "512"] if not a.model else [])
    if shutil.which("nvidia-smi") and not any(f.startswith("--gpu-memory-utilization") for f in flags):
        flags = [*flags, "--gpu-memory-utilization", "0.4"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"} if not shutil.which("nvidia-smi") else {}
    results: dict = {"model": model, "flags": flags, "tokens": a.tokens, "trials": a.trials, "rows": {}}
    ours, raw = Kernel(env=env), Kernel(env=env)
    try:
        load_ours = _numbers(ours.run(OURS_LOAD.format(line=shlex.join([model, *flags])), timeout=900), "LOAD")[0]
        load_raw = _numbers(raw.run(RAW_LOAD.format(model=model, flags=flags), timeout=900), "LOAD")[0]
        results["rows"]["load"] = {"ours_s": load_ours, "raw_s": load_raw, "ratio": load_ours / load_raw}
        for size in [int(s) for s in a.sizes.split(",")]:
            cell = PROMPTS_CELL.format(prompts=PROMPTS, n=size // len(PROMPTS) + 1, size=size)
            for k in (ours, raw):
                k.run(cell)
            ours.run(cell + OURS_RUN.format(tokens=a.tokens), timeout=900)  # warm-up, both sides
            raw.run(cell + RAW_RUN.format(tokens=a.tokens), timeout=900)
            trials = []
            for t in range(a.trials):
                order = [("ours", ours, OURS_RUN), ("raw", raw, RAW_RUN)]
                seconds = {}
                for name, k, code in (order if t % 2 == 0 else order[::-1]):
                    s, n = _numbers(k.run(code.format(tokens=a.tokens), timeout=900), "RUN")
                    seconds[name] = (s, n)
                (s_ours, n_ours), (s_raw, n_raw) = seconds["ours"], seconds["raw"]
                trials.append({"ours_s": s_ours, "raw_s": s_raw, "ours_tokens": n_ours, "raw_tokens": n_raw,
                               "ratio": (n_ours / s_ours) / (n_raw / s_raw)})
            ratios = [t["ratio"] for t in trials]
            results["rows"][f"batch {size} x {a.tokens}"] = {
                "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ours_tok_s_median": statistics.median(t["ours_tokens"] / t["ours_s"] for t in trials),
                "raw_tok_s_median": statistics.median(t["raw_tokens"] / t["raw_s"] for t in trials),
                "trials": trials}
    finally:
        ours.shutdown()
        raw.shutdown()
    print(f"\nreal Jupyter kernels, {model} {' '.join(flags)}")
    print(f"{'row':<24}{'ours / raw':>12}{'spread':>18}{'ours tok/s':>14}{'raw tok/s':>14}")
    for name, row in results["rows"].items():
        if name == "load":
            print(f"{'load (import+construct)':<24}{row['ratio']:>12.3f}{'':>18}"
                  f"{row['ours_s']:>13.1f}s{row['raw_s']:>13.1f}s")
        else:
            spread = f"{row['ratio_min']:.3f}..{row['ratio_max']:.3f}"
            print(f"{name:<24}{row['ratio_median']:>12.3f}{spread:>18}"
                  f"{row['ours_tok_s_median']:>14,.0f}{row['raw_tok_s_median']:>14,.0f}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
