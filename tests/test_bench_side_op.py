"""``benchmarks/bench_side_op.py`` runs end to end (tiny shapes, no compile) and writes a
row per provider, mode, model and dtype mix (the timings themselves are not checked)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from dtl_kernels.ops import compiled_side

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not compiled_side.available("cpu"), reason="the CPU extension is not built (make build)"
)


def test_every_mix_provider_and_mode_gets_its_rows(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_side_op.py"), "--batch", "1",
           "--width", "32", "--taps", "4", "--reps", "1", "--no-compile", "--threads", "1",
           "--results", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "side_op_t1.csv")))
    timed = {(r["provider"], r["mode"], r["model"], r["dtype"]) for r in rows if r["unit"] == "ms"}
    for mix in ("float32+bfloat16", "float32", "bfloat16"):
        for model in ("dtl", "dtl+k3"):
            for mode in ("fwd", "full"):
                assert {("ours", mode, model, mix), ("torch", mode, model, mix)} <= timed
    assert "float32+bfloat16 (y float32, taps / ups bfloat16):" in out.stdout
