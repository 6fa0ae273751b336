"""The GPU benchmark script runs on this CPU machine as its own smoke test: it prints the
device header and a measured row for each requested measurement (no time is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

from repo_paths import REPO

SCRIPT = REPO / "Testing" / "Benchmarks" / "benchmark_gpu.py"


def test_benchmark_gpu_prints_a_table_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--rows", "embed,train", "--precisions", "fp32", "--nets", "lite",
         "--size", "64", "64", "32", "--patch", "16", "32", "32", "--train-steps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: CPU") and "torch 2." in lines[0]
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["embed lite fp32", "train lite"]
    for r in rows:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["peak_bytes"] > 0
    assert "64x64x32 CT at 0.7x0.7x1.0 mm" in rows[0]["detail"]
