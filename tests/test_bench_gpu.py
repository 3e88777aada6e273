"""bench/gpu.py (issue 27) runs end to end on CPU with a tiny shape, so it is ready when a GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_shape(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--shape", "tiny", "--requests", "3",
                           "--variant", "both", "--device", "cpu", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    head, runs, summary = lines[0], lines[1:-1], lines[-1]
    assert head["shape"] == "tiny" and head["device"] == "cpu"
    assert [(r["variant"].split("-")[0], r["stats"]) for r in runs] == [("closed", "cold"), ("closed", "warm"),
                                                                        ("multi", "cold"), ("multi", "warm")]
    for r in runs:
        assert r["requests"] == 3 and r["requests_per_s"] > 0 and set(r["stages_s"]) >= {"targets", "statistics"}
    cold, warm = runs[0]["stages_s"]["statistics"], runs[1]["stages_s"]["statistics"]
    assert warm < cold  # the warm run read the statistics the cold one sampled
    assert summary["runs"] == 4 and not list(tmp_path.iterdir())  # its temporary folder is gone
