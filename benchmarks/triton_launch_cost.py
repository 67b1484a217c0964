"""Host time of the Triton side op's launchers with and without Triton's JIT per launch.

No GPU needed: Triton's driver is replaced by a recorder (``triton_fake_driver.py``), so
``kernel[grid](...)`` does everything up to ``cuLaunchKernel`` -- binding, specialisation,
cache lookup, the launcher's Python -- and compiles for sm_90 for real on the first call.
Per case, the launchers ``side_fwd`` / ``side_bwd`` (what one add-back's forward and
backward run on a GPU, less the driver's launch itself) are timed two ways, interleaved
round-robin in one process: ``jit`` (every launch through ``JITFunction.run``, as before
``dtl_kernels.ops.triton_launch``) and ``direct`` (the compiled kernel called with the same
arguments after the first launch). One thread, the thread's CPU time, medians and
quartiles; the output states the machine's load.

    python benchmarks/triton_launch_cost.py [--reps 2000] [--out benchmarks/results]

Writes ``triton_launch_cost-triton<version>.csv`` / ``.md``. Run it with the GPU machine's
Triton too: ``PYTHONPATH=build/triton-3.6.0:. python benchmarks/triton_launch_cost.py``
(``make codegen-check`` installs that Triton there).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, code_columns, machine  # noqa: E402
from triton_fake_driver import fake_cuda_driver  # noqa: E402

# (name, y dtype, taps / ups dtype, conv k, grid, prefix): ViT-B/16's structure at the host
# benchmark's size (bench_host.py: width 32, 32 px → 2×2 patches + the class token), K = 4
CASES = [
    ("DTL fp32", torch.float32, torch.float32, 0, (0, 0), 0),
    ("DTL autocast mix", torch.float32, torch.bfloat16, 0, (0, 0), 0),
    ("DTL+ k3 autocast mix", torch.float32, torch.bfloat16, 3, (2, 2), 1),
]


def _inputs(y_dtype, side_dtype, k, grid, prefix):
    n = prefix + grid[0] * grid[1] if k else 5
    y = torch.randn(1, n, 32, dtype=y_dtype)
    taps = torch.randn(1, n, 4, dtype=side_dtype)
    ups = torch.randn(32, 4, dtype=side_dtype)
    w = torch.randn(32, 1, k, k, dtype=y_dtype) if k else None
    return y, taps, ups, w


def measure(reps: int) -> list[dict]:
    import triton

    from dtl_kernels.ops import triton_launch
    from dtl_kernels.ops import triton_side as ts

    if not triton_launch.ENABLED:
        raise SystemExit(f"direct launches are off (Triton {triton.__version__} or the env)")
    torch.set_num_threads(1)
    rows = []
    with fake_cuda_driver(keep_calls=False):
        for name, y_dtype, side_dtype, k, grid, prefix in CASES:
            y, taps, ups, w = _inputs(y_dtype, side_dtype, k, grid, prefix)
            args = (y, taps, ups, w, *grid, prefix, 100.0)
            calls = {
                "forward": lambda a=args: ts.side_fwd(*a),
                "backward": lambda a=args: ts.side_bwd(*a),
            }
            samples = {(c, m): [] for c in calls for m in ("jit", "direct")}
            for _ in range(2):  # compile, then fill the direct cache
                for call in calls.values():
                    call()
            for _ in range(reps):
                for (c, mode), out in samples.items():
                    triton_launch.ENABLED = mode == "direct"
                    t0 = time.thread_time_ns()
                    calls[c]()
                    out.append((time.thread_time_ns() - t0) / 1e3)
            triton_launch.ENABLED = True
            for (c, mode), out in samples.items():
                q = statistics.quantiles(out, n=4)
                rows.append(dict(case=name, call=c, mode=mode, median_us=round(q[1], 2),
                                 p25_us=round(q[0], 2), p75_us=round(q[2], 2)))  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("triton_launch_cost: Triton is not installed: nothing to measure")
        return
    from dtl_kernels.ops import triton_launch

    if not triton_launch.ENABLED:  # a Triton not checked, or DTL_KERNELS_TRITON_DIRECT=0
        print(f"triton_launch_cost: direct launches are off here (Triton {triton.__version__})")
        return
    load = os.getloadavg()[0]
    rows = measure(a.reps)
    load_after = os.getloadavg()[0]
    env = dict(machine=machine(),
               load=f"{load:.2f}->{load_after:.2f}", **code_columns())  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    from dtl_kernels._io import atomic_write

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
            w.writeheader()
            w.writerows({**r, **env} for r in rows)

    stem = f"triton_launch_cost-triton{triton.__version__}"
    atomic_write(a.out / f"{stem}.csv", write_csv)
    md = [
        f"Triton {triton.__version__}, {machine()}, load {env['load']}, {a.reps} rounds, "
        "thread CPU time per call (µs, median [p25, p75]); launch recorded, not made.",
        "",
        "| case | call | through Triton's JIT | direct | saved |",
        "|---|---|---|---|---|",
    ]
    by = {(r["case"], r["call"], r["mode"]): r for r in rows}
    for name, *_ in CASES:
        for c in ("forward", "backward"):
            j, d = by[(name, c, "jit")], by[(name, c, "direct")]
            md.append(f"| {name} | {c} | {j['median_us']} [{j['p25_us']}, {j['p75_us']}] | "
                      f"{d['median_us']} [{d['p25_us']}, {d['p75_us']}] | "
                      f"{j['median_us'] - d['median_us']:.1f} |")  # fmt: skip
    text = "\n".join(md) + "\n"
    atomic_write(a.out / f"{stem}.md", lambda tmp: Path(tmp).write_text(text))
    print("\n".join(md))


if __name__ == "__main__":
    main()
