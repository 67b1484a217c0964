"""benchmarks/host_instructions.py: reading callgrind's dumps, per-call counts, the child's
counted windows, and (where valgrind is installed) the counting itself on a child without
torch. The script's own run (torch under valgrind, ≥ 1 min) is left to benchmarking."""

from __future__ import annotations

import csv
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


def test_child_counts_each_provider_between_the_shims_calls(monkeypatch, one_thread):
    """The child (in this process, the shim recorded): three warm-up calls, then one
    counted window of ``reps`` calls per provider, in the order given (the child sets one
    thread, as ``one_thread`` does, which restores the count)."""
    import ctypes

    import bench_host

    events, calls = [], []

    class Shim:
        def cg_start(self):
            events.append(("start", len(calls)))

        def cg_stop(self):
            events.append(("stop", len(calls)))

    real_cdll, real_infer = ctypes.CDLL, bench_host.Provider.infer
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *a, **k: Shim() if path == "shim.so"
                        else real_cdll(path, *a, **k))  # fmt: skip
    monkeypatch.setattr(
        bench_host.Provider, "infer", lambda p: calls.append(p.name) or real_infer(p)
    )
    H.child("shim.so", ["timm", "dtl"], "infer", 2, False)
    assert events == [("start", 3), ("stop", 5), ("start", 8), ("stop", 10)]
    assert calls == ["timm"] * 5 + ["dtl"] * 5


def test_child_records_the_triton_providers_launches(monkeypatch, one_thread):
    """With a ``triton*`` provider the child runs every provider inside
    ``bench_host.triton_launches_recorded`` (as ``bench_host.measure`` does; without it a
    Triton model on CPU tensors is refused), and without one it does not."""
    import contextlib
    import ctypes

    import bench_host
    import torch

    log = []

    @contextlib.contextmanager
    def recorded():
        log.append("enter")
        yield
        log.append("exit")

    class FakeProvider:  # the calls only: no model is built
        def __init__(self, name, amp):
            self.name, self.model = name, torch.nn.Identity()

        def infer(self):
            log.append(self.name)

    class Shim:
        def cg_start(self):
            log.append("start")

        def cg_stop(self):
            log.append("stop")

    monkeypatch.setattr(bench_host, "triton_launches_recorded", recorded)
    monkeypatch.setattr(bench_host, "Provider", FakeProvider)
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *a, **k: Shim())
    H.child("shim.so", ["timm", "triton_dtl"], "infer", 1, False)
    window = ["timm"] * 3 + ["start", "timm", "stop"]
    assert log == ["enter", *window, *[w.replace("timm", "triton_dtl") for w in window],
                   "exit"]  # fmt: skip
    log.clear()
    H.child("shim.so", ["timm"], "infer", 1, False)
    assert log == window


def test_main_runs_the_child_it_asks_for_and_writes_its_counts(tmp_path, monkeypatch):
    """``main`` → ``measure``'s child command line → the child's own argument parsing, and
    the CSV; valgrind and the shim stubbed (each dump: the totals of 2 calls)."""
    runs, children = [], []

    def run_counted(child, out, dumps):
        runs.append(child)
        return [{"Ir": 2000 * (i + 1), "I1mr": 20, "D1mr": 4, "D1mw": 2} for i in range(dumps)]

    which = H.shutil.which
    monkeypatch.setattr(
        H.shutil, "which", lambda n: "/usr/bin/valgrind" if n == "valgrind" else which(n)
    )
    monkeypatch.setattr(H, "build_shim", lambda work: work / "libcgctl.so")
    monkeypatch.setattr(H, "run_counted", run_counted)
    monkeypatch.setattr(H, "child", lambda *a: children.append(a))
    monkeypatch.setattr(sys, "argv", ["host_instructions.py", "--providers", "dtl", "--calls",
                        "infer", "--precisions", "bf16-autocast", "--reps", "2", "--results",
                        str(tmp_path)])  # fmt: skip
    assert H.main() == 0
    assert len(runs) == 1 and runs[0][0] == H.__file__
    monkeypatch.setattr(sys, "argv", runs[0])  # what valgrind would start
    assert H.main() == 0
    ((shim, providers, call, reps, amp),) = children
    assert shim.endswith("libcgctl.so") and providers == ["timm", "dtl"]  # timm: the base
    assert (call, reps, amp) == ("infer", 2, True)
    with open(tmp_path / "host_instructions.csv", newline="") as f:
        ir = {
            r["provider"]: float(r["median"]) for r in csv.DictReader(f) if r["mode"] == "infer_Ir"
        }
    assert ir == {"timm": 1000, "dtl": 2000}  # per call


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
