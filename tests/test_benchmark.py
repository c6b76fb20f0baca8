"""`benchmarks/run.py --smoke`: the one benchmark command runs end to end and writes its table as JSON.

The sizes are small, so the ratios are noisy and are not judged here; the full run's figures are in
the README. What is checked: every row is measured, the work on both sides is the same, and
`%load_ext` imports neither vLLM nor torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_benchmark_smoke_run(tmp_path, demo_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-2500:])
    r = json.loads(out_json.read_text())
    (ROOT / "artifacts").mkdir(exist_ok=True)
    shutil.copy(out_json, ROOT / "artifacts" / "benchmark-smoke.json")
    assert r["load_ext"]["imports_vllm"] is False and r["load_ext"]["imports_torch"] is False
    assert r["load_ext"]["seconds"] < 1.0
    for value in (r["batch"]["ratio"], r["stream"]["magic_ratio"], r["stream"]["panel_ratio"], r["load"]["ratio"],
                  r["concurrency"]["ratio"], r["server"]["reattach_over_cold"]):
        assert value > 0
    assert r["server"]["reattach_median_s"] < 2.0
    assert len(r["memory_mb"]) == 3 and r["memory_last_over_first"] < 1.10
    assert r["journal"]["journal_bytes"] > 0 and len(r["journal"]["on_s"]) == 1
    for row in ("1 batch", "2 stream", "3 load", "4 %load_ext", "5 memory", "6 server", "7 concurrency", "8 journal"):
        assert row in proc.stdout
