"""Server mode: attaching to a running server after a kernel restart, versus loading cold.

    python benchmarks/reattach.py                     # the demo model on this machine
    python benchmarks/reattach.py --model meta-llama/Llama-3.1-8B-Instruct -- --max-model-len 4096

Runs the magics in a real Jupyter kernel (jupyter_client), timing inside the cell:
  cold      %load_ext + %vllm_load MODEL --server FLAGS in a fresh kernel (starts the server)
  reattach  the same cell after a kernel restart (finds and attaches to that server)
  in-kernel %load_ext + %vllm_load MODEL FLAGS in a fresh kernel (the in-process engine), for scale
and prints reattach / cold and reattach / in-kernel. The server is stopped at the end.
benchmarks/run.py runs ``measure`` as its server row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics

from jupyter_client.manager import KernelManager

TIMED = ("import time as _t\n_t0 = _t.perf_counter()\n%load_ext vllm_notebook\n{load}\n"
         "print('SECONDS', _t.perf_counter() - _t0)")


def run(kc, code: str, timeout: float = 900) -> str:
    """Execute ``code`` (jupyter_client's ``execute_interactive``) and return the text it showed."""
    out: list[str] = []

    def hook(msg) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("display_data", "update_display_data", "execute_result"):
            out.append(content["data"].get("text/plain", "") + "\n")

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)["content"]
    if reply["status"] == "error":
        raise RuntimeError(f"{reply['ename']}: {reply['evalue']}")
    return "".join(out)


def seconds(out: str) -> float:
    return float(re.search(r"SECONDS ([\d.]+)", out).group(1))


def kernel() -> tuple[KernelManager, object]:
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def measure(model: str, flags: list[str], repeats: int = 3, in_kernel: bool = True) -> dict:
    """Cold server start, then ``repeats`` kernel restarts each followed by a reattach; seconds and ratios."""
    from vllm_notebook import servers

    line = shlex.join([model, *flags])
    running = servers.find(model, servers.normalize(flags))
    if running is not None:  # a cold start must start one
        servers.stop(running)
    km, kc = kernel()
    try:
        out = run(kc, TIMED.format(load=f"%vllm_load {line} --server"))
        assert "server ready in" in out, out
        cold = seconds(out)
        reattach = []
        for _ in range(repeats):
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=60)
            out = run(kc, TIMED.format(load=f"%vllm_load {line} --server"))
            assert "attached to the running server" in out, out
            reattach.append(seconds(out))
    finally:
        run(kc, "%vllm_unload")
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    result = {"cold_server_s": cold, "reattach_s": sorted(reattach)}
    result["reattach_median_s"] = statistics.median(reattach)
    result["reattach_over_cold"] = result["reattach_median_s"] / cold
    if in_kernel:
        km, kc = kernel()
        try:
            result["in_kernel_load_s"] = seconds(run(kc, TIMED.format(load=f"%vllm_load {line}")))
            run(kc, "%vllm_unload")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
        result["reattach_over_in_kernel"] = result["reattach_median_s"] / result["in_kernel_load_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the demo model)")
    ap.add_argument("--repeats", type=int, default=3, help="kernel restarts to time (the median is reported)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("flags", nargs="*", help="engine flags, after --")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.model is None:
        import vllm_notebook

        a.model = vllm_notebook.demo_model()
    flags = a.flags or ["--enforce-eager", "--max-model-len", "512"]
    r = measure(a.model, flags, a.repeats)
    print(f"server mode, {a.model}")
    print(f"  cold start (%vllm_load --server)      {r['cold_server_s']:8.2f} s")
    print(f"  in-kernel load (%vllm_load)           {r['in_kernel_load_s']:8.2f} s")
    print(f"  reattach after kernel restart         {r['reattach_median_s']:8.3f} s  (median of {a.repeats}: "
          f"{', '.join(f'{s:.3f}' for s in r['reattach_s'])})")
    print(f"  ratio reattach / cold server start    {r['reattach_over_cold']:8.4f}")
    print(f"  ratio reattach / in-kernel load       {r['reattach_over_in_kernel']:8.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "flags": flags, **r}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except TimeoutError:
        raise SystemExit("the kernel stopped answering") from None
