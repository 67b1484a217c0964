"""benchmarks/bench_predict.py runs where the GPU session will run it: no elpv or weights
packages (``--synthetic``), a results folder of its own; every provider gives a row."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_run_writes_a_row_per_provider_and_measure(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_predict.py"), "--synthetic",
           "--images", "4", "--batch-size", "2", "--reps", "1", "--models", "effnet-lite0",
           "--providers", "eager", "eager+workers", "bf16", "--results", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "bench_predict_synthetic.csv").open()))
    got = {(r["provider"], r["mode"], r["dtype"]) for r in rows}
    assert got == {(p, m, "bf16-autocast" if p == "bf16" else "float32")
                   for p in ("eager", "eager+workers", "bf16")
                   for m in ("images_per_s", "first_pass_s")}  # fmt: skip
    assert all(float(r["median"]) > 0 and r["shape"].startswith("noise 300x300") for r in rows)
