"""benchmarks/host_instructions.py: reading callgrind's dumps, per-call counts, and (where
valgrind is installed) one counted inference call."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import host_instructions as H  # noqa: E402

DUMP = """# callgrind format
version: 1
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
fn=(1) main
0 10 2 1 0 0 0 0 0 0
summary: 1000 200 100 30 20 10 3 2 1
totals: 1000 200 100 30 20 10 3 2 1
"""


def test_dump_totals_and_per_call_counts():
    counts = H.parse_dump(DUMP)
    assert counts["Ir"] == 1000 and counts["I1mr"] == 30 and counts["DLmw"] == 1
    c = H.per_call(counts, 10)
    assert c["Ir"] == 100 and c["L1m"] == 6 and c["LLm"] == 0.6
    assert c["cycles_est"] == pytest.approx(100 + 10 * 6 + 100 * 0.6)


@pytest.mark.parametrize("text", ["", "events: Ir D1mr\n", "events: Ir D1mr\nsummary: 5\n"])
def test_a_file_that_is_not_a_dump_is_refused(text):
    with pytest.raises(ValueError, match="not a callgrind dump"):
        H.parse_dump(text)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the callgrind shim")
def test_counts_one_inference_call(tmp_path):
    """The whole path once (≈ 1 min): a shim, valgrind, one dump per provider."""
    subprocess.run(
        [sys.executable, str(BENCH / "host_instructions.py"), "--providers", "timm",
         "--calls", "infer", "--precisions", "float32", "--reps", "1",
         "--results", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    with open(tmp_path / "host_instructions.csv", newline="") as f:
        ir = [r for r in csv.DictReader(f) if r["mode"] == "infer_Ir"]
    assert len(ir) == 1 and int(ir[0]["median"]) > 10**6  # a ViT forward: millions
