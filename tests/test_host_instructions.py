"""benchmarks/host_instructions.py: reading callgrind's dumps, per-call counts, the child's
counted windows, and (where valgrind is installed) the counting itself on a child without
torch. The script's own run (torch under valgrind, ≥ 1 min) is left to benchmarking."""

from __future__ import annotations

import shutil
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


def test_child_counts_each_provider_between_the_shims_calls(monkeypatch):
    """The child (in this process, the shim recorded): warm-up calls, then one counted
    window per provider, in order."""
    import ctypes

    import bench_host

    events, calls = [], []

    class Shim:
        def cg_start(self):
            events.append("start")

        def cg_stop(self):
            events.append(("stop", len(calls)))

    real = bench_host.Provider.infer
    monkeypatch.setattr(ctypes, "CDLL", lambda path: Shim())
    monkeypatch.setattr(bench_host.Provider, "infer", lambda p: calls.append(p) or real(p))
    H.child("shim.so", ["timm", "dtl"], "infer", 2, False)
    assert events == ["start", ("stop", 5), "start", ("stop", 10)]  # 3 warm-up + 2 counted


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the callgrind shim")
def test_valgrind_counts_only_between_the_shims_calls(tmp_path):
    """The shim, valgrind's options and the dumps' order on a child without torch (under
    valgrind torch's import alone takes ~30 s): each window's count follows its work."""
    shim = H.build_shim(tmp_path)
    child = tmp_path / "child.py"
    child.write_text(
        "import ctypes, sys\n"
        "cg = ctypes.CDLL(sys.argv[1])\n"
        "sum(range(10**6))\n"  # before any window: not counted
        "for n in (10**3, 10**5):\n"
        "    cg.cg_start(); sum(range(n)); cg.cg_stop()\n"
    )
    small, big = H.run_counted([str(child), str(shim)], tmp_path / "cg", 2)
    assert 0 < small["Ir"] < 10**6 and 10 * small["Ir"] < big["Ir"] < 10**8
    with pytest.raises(SystemExit, match="expected 3 callgrind dumps, found 2"):
        H.run_counted([str(child), str(shim)], tmp_path / "again", 3)
