"""Host overhead as instruction counts: ``bench_host.py``'s providers under Valgrind's
callgrind, so that a change of a few percent can be told from noise on a shared machine.

``bench_host.py`` times the host work of a DTL forward and step; on a loaded 2-core machine
its medians move by ±5 % from run to run, more than most single changes to the host path
are worth. This script counts instead: each provider's calls run under callgrind
(``--cache-sim=yes``) with collection switched on only around the measured calls, through
Valgrind's client requests (a three-line C helper, compiled here with ``cc``). Per call it
reports the instructions executed (``Ir``), the simulated first-level instruction and data
cache misses (``I1mr``, ``D1mr + D1mw``), last-level misses (``LLmr``) and a cycle estimate,
``Ir + 10·L1 misses + 100·LL misses`` (callgrind's usual weights), and each as a ratio to
plain timm's.

The counts are nearly deterministic for a given build, Python and torch
(``PYTHONHASHSEED=0`` is set): repeated runs agree to ~0.1 %, and to ~0.3 % when the set of
providers in the process changes (allocation history), against ±5 % for times. They are
not times: the real CPU overlaps misses, predicts branches and has larger caches than the
simulation. On the development machine the side network's share of the time came out
about twice its share of the counts (fused DTL inference: 1.13× timm's time, 1.07× its
instructions): use the counts to tell whether a change removed work, the times for what
it is worth. Valgrind has no
AVX-512, so the compiled ops run their AVX2 variant here.

Needs ``valgrind`` and a C compiler; ~6 min per precision for the default providers. Writes
``benchmarks/results/host_instructions.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALLS = ("infer", "step")
PRECISIONS = {"float32": False, "bf16-autocast": True}  # name → under bf16 autocast
SHAPE = "ViT-B/16 blocks, d=32, 32 px, batch 1"  # bench_host.py's tiny model
SHIM = """
#include <valgrind/callgrind.h>
void cg_start(void) {
  CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT;
}
void cg_stop(void) {
  CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION;
}
"""
#: callgrind's event names → this script's columns
EVENTS = {"Ir": "Ir", "I1mr": "I1mr", "D1mr": "D1mr", "D1mw": "D1mw", "ILmr": "ILmr",
          "DLmr": "DLmr", "DLmw": "DLmw"}  # fmt: skip


def parse_dump(text: str) -> dict[str, int]:
    """The totals of one callgrind dump: ``{event: count}`` from its ``events:`` and
    ``summary:`` lines (``ValueError`` when either is missing)."""
    events = summary = None
    for line in text.splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            summary = [int(v) for v in line.split()[1:]]
    if events is None or summary is None or len(events) != len(summary):
        raise ValueError("not a callgrind dump: no matching events: / summary: lines")
    return dict(zip(events, summary, strict=True))


def per_call(counts: dict[str, int], calls: int) -> dict[str, float]:
    """Counts per call, the L1 misses summed, and callgrind's cycle estimate."""
    c = {k: counts.get(k, 0) / calls for k in EVENTS}
    c["L1m"] = c["I1mr"] + c["D1mr"] + c["D1mw"]
    c["LLm"] = c["ILmr"] + c["DLmr"] + c["DLmw"]
    c["cycles_est"] = c["Ir"] + 10 * c["L1m"] + 100 * c["LLm"]
    return c


# -- the child: runs under valgrind ------------------------------------------------------------
def child(shim: str, providers: list[str], call: str, reps: int, amp: bool) -> None:
    import ctypes

    import torch

    sys.path.insert(0, str(HERE))
    import bench_host

    torch.set_num_threads(1)
    cg = ctypes.CDLL(shim)
    # the Triton providers' launches recorded, as bench_host.measure runs them
    recorded = any(name.startswith("triton") for name in providers)
    with bench_host.triton_launches_recorded() if recorded else contextlib.nullcontext():
        for name in providers:  # one dump per provider, in this order
            p = bench_host.Provider(name, amp)
            p.model.train(call != "infer")
            fn = getattr(p, call)
            for _ in range(3):  # warm-up: first-call set-up (plans, optimizer state) not counted
                fn()
            cg.cg_start()
            for _ in range(reps):
                fn()
            cg.cg_stop()


# -- the parent --------------------------------------------------------------------------------
def build_shim(directory: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("host_instructions.py needs a C compiler (cc) for the callgrind shim")
    src, lib = directory / "cgctl.c", directory / "libcgctl.so"
    src.write_text(SHIM)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def run_counted(child: list[str], out: Path, dumps: int) -> list[dict[str, int]]:
    """Run ``python *child`` under callgrind, collection off until the child's shim turns it
    on; the totals of each dump the child made, in the order it made them (``dumps`` of
    them, else ``SystemExit``)."""
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
        "--cache-sim=yes", f"--callgrind-out-file={out}", sys.executable, *child,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"valgrind failed ({run.returncode}):\n{run.stderr[-3000:]}")
    found = sorted(out.parent.glob(f"{out.name}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    if len(found) != dumps:
        raise SystemExit(f"expected {dumps} callgrind dumps, found {len(found)}")
    return [parse_dump(d.read_text()) for d in found]


def measure(providers: list[str], call: str, reps: int, amp: bool, work: Path) -> list[dict]:
    """Per provider, the per-call counts of ``call`` (``infer`` or ``step``)."""
    shim = build_shim(work)
    child = [__file__, "--child", str(shim), "--call", call, "--reps", str(reps),
             "--providers", *providers] + (["--amp"] if amp else [])  # fmt: skip
    dumps = run_counted(child, work / f"cg.{call}.{int(amp)}", len(providers))
    return [per_call(counts, reps) for counts in dumps]


def main() -> int:
    sys.path.insert(0, str(HERE))
    from bench_host import PROVIDERS

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--providers", nargs="+", default=["timm", "linear", "tail_floor",
                    "dtl_ref", "dtl", "dtl+", "full"], choices=PROVIDERS)  # fmt: skip
    ap.add_argument("--calls", nargs="+", default=list(CALLS), choices=CALLS)
    ap.add_argument("--reps", type=int, default=5, help="counted calls per provider (5)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)  # the child's
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--call", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.providers, args.call, args.reps, args.amp)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("host_instructions.py needs valgrind (apt install valgrind)")
    if "timm" not in args.providers:
        args.providers.insert(0, "timm")  # the ratios' base
    from common import Results

    res = Results("host_instructions")
    cpu = res.env["machine"].split(";")[0]
    res.env["machine"] = f"{cpu}; 1 threads; under valgrind (AVX2 variant, simulated caches)"
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, call in ((d, c) for d in args.precisions for c in args.calls):
            amp = PRECISIONS[dtype]
            rows = measure(args.providers, call, args.reps, amp, Path(tmp))
            base = rows[args.providers.index("timm")]
            print(f"\n{call} ({dtype}, per call; × timm):")
            for name, c in zip(args.providers, rows, strict=True):
                print(f"  {name:12s} Ir {c['Ir'] / 1e6:7.3f} M ({c['Ir'] / base['Ir']:.3f})  "
                      f"L1 misses {c['L1m'] / 1e3:7.1f} k ({c['L1m'] / base['L1m']:.3f})  "
                      f"cycles est. {c['cycles_est'] / 1e6:7.3f} M "
                      f"({c['cycles_est'] / base['cycles_est']:.3f})")  # fmt: skip
                for key in ("Ir", "L1m", "LLm", "cycles_est"):
                    res.add(name, f"{call}_{key}", "tiny-vit12", 1, dtype, SHAPE, round(c[key]),
                            "count")  # fmt: skip
    res.write(directory=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
