"""Where a batch's time goes on our path, against raw vLLM on the same engine, in one real Jupyter kernel.

    python benchmarks/batch_profile.py --model /path/to/model [--size 256] [--tokens 128] [--trials 9] [-- FLAGS]

``benchmarks/kernels.py`` compares ``%generate -i`` in one kernel with raw ``LLM.generate`` in another. When that
ratio is short of 1 for a batch that takes a fraction of a second (256 x 128 on an H100: ~0.3 s), fixed costs
show, and this script says which: in one kernel with one engine loaded (``%vllm_load``), interleaved trials of

  magic       ``%generate -i prompts`` (what kernels.py times: parsing, the run, the result object, the display)
  api         ``engine.generate(prompts)`` (no magic, no display)
  async raw   vLLM's ``AsyncLLM.generate`` on the same engine, every request gathered (FINAL_ONLY outputs)

and then one cProfile of each of ``magic`` and ``api`` (the kernel's thread and our event loop's thread both;
the top functions by own and by cumulative time). Ratios are raw / ours seconds (higher is better: 1 = no cost), medians with
the spread over the trials. Results go to ``artifacts/batch_profile.json``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel import Kernel  # noqa: E402 - the same kernel driver the tests use

SETUP = """import time as _t, asyncio as _aio, cProfile as _cp, pstats as _ps, io as _io, threading as _th
%load_ext vllm_notebook
%config VllmMagics.journal = False
_llm = %vllm_load {line}
from vllm import SamplingParams as _SP
from vllm.sampling_params import RequestOutputKind as _K
_p = [f"Prompt number {{i}} says" for i in range({size})]
def _params():
    sp = _SP(temperature=0, max_tokens={tokens}, ignore_eos=True)
    sp.output_kind = _K.FINAL_ONLY
    return sp
async def _raw(prompts):
    n = [0]
    async def one(i):
        async for out in _llm.backend._llm.generate(prompts[i], _params(), f"raw-{{i}}-{{_t.monotonic_ns()}}"):
            n[0] += len(out.outputs[0].token_ids) if out.finished else 0
    await _aio.gather(*(one(i) for i in range(len(prompts))))
    return n[0]
def _raw_run():
    return _aio.run_coroutine_threadsafe(_raw(_p), _llm._loop).result()
"""
MAGIC = """_s = _t.perf_counter()
_g = %generate -i _p --temperature 0 --max-tokens {tokens} --ignore-eos
print("RUN", _t.perf_counter() - _s, _g.metrics["output_tokens"])
"""
API = """_s = _t.perf_counter()
_g = _llm.generate(_p, temperature=0, max_tokens={tokens}, ignore_eos=True)
print("RUN", _t.perf_counter() - _s, _g.metrics["output_tokens"])
"""
RAW = """_s = _t.perf_counter()
_n = _raw_run()
print("RUN", _t.perf_counter() - _s, _n)
"""
# cProfile of one call in the kernel's thread and, through the loop's own profiler, our event loop's thread.
PROFILE = """_loop_prof = _cp.Profile()
_llm._loop.call_soon_threadsafe(_loop_prof.enable)
_t.sleep(0.05)
_prof = _cp.Profile()
_prof.enable()
{call}
_prof.disable()
_done = _th.Event()
def _off():
    _loop_prof.disable(); _done.set()
_llm._loop.call_soon_threadsafe(_off)
_done.wait(5)
for _name, _pr in (("kernel thread", _prof), ("event loop thread", _loop_prof)):
    for _key in ("tottime", "cumulative"):
        _b = _io.StringIO()
        _ps.Stats(_pr, stream=_b).sort_stats(_key).print_stats(22)
        print("PROFILE", _name, "by", _key)
        print(_b.getvalue())
"""


def _seconds(out: str) -> tuple[float, int]:
    line = [ln for ln in out.splitlines() if ln.startswith("RUN")][-1].split()
    return float(line[1]), int(line[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--json", default="artifacts/batch_profile.json")
    ap.add_argument("flags", nargs="*", help="engine flags, after --")
    a = ap.parse_args()
    flags = list(a.flags)  # one engine here: vLLM's default memory share
    k = Kernel()
    try:
        k.run(SETUP.format(line=shlex.join([a.model, *flags]), size=a.size, tokens=a.tokens), timeout=600)
        cells = {"magic": MAGIC.format(tokens=a.tokens), "api": API.format(tokens=a.tokens), "async raw": RAW}
        for code in cells.values():  # warm-up: the first batch of each shape captures and allocates
            k.run(code, timeout=300)
        times: dict[str, list[float]] = {name: [] for name in cells}
        tokens: dict[str, int] = {}
        names = list(cells)
        for trial in range(a.trials):
            order = names[trial % len(names):] + names[:trial % len(names)]  # who goes first rotates
            for name in order:
                seconds, n = _seconds(k.run(cells[name], timeout=300))
                times[name].append(seconds)
                tokens[name] = n
        from vllm_notebook.engine import gpus

        result = {"model": a.model, "flags": flags, "size": a.size, "tokens": a.tokens, "trials": a.trials,
                  "card": (gpus.cards() or [None])[0], "seconds": times, "output_tokens": tokens}
        print(f"{a.size} prompts x {a.tokens} tokens, {a.trials} trials (seconds: median, lowest..highest)")
        for name in names:
            t = times[name]
            print(f"  {name:10s} {statistics.median(t):.4f} s ({min(t):.4f}..{max(t):.4f})")
        for name in ("magic", "api"):
            ratios = [r / o for r, o in zip(times["async raw"], times[name])]
            result[f"{name}_ratio"] = {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}
            print(f"  async raw / {name}: {statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})")
        for name, call in (("magic", cells["magic"]), ("api", cells["api"])):
            out = k.run(PROFILE.format(call=call), timeout=300)
            result[f"profile_{name}"] = out[out.find("PROFILE"):]
            print(f"\n===== cProfile: {name}\n{result[f'profile_{name}']}")
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    finally:
        k.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
