"""The CPU kernels' instruction-set variants side by side: the fused side op (forward, and
forward + backward) at the ViT-B/16 shape in fp32 and bf16, once per variant this CPU runs
(``DTL_KERNELS_CPU_VARIANT`` caps the import; each variant in its own process).

Run: ``python benchmarks/bench_cpu_variants.py [--batch 32] [--threads 0]`` →
``benchmarks/results/cpu_variants.csv``. Times are medians of alternating runs in one
process per variant; compare variants measured in the same invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Results  # noqa: E402

CAPS = ("avx512", "avx2", "default")

CHILD = """
import json, sys, torch
sys.path.insert(0, {here!r})
from common import time_fn
from dtl_kernels.ops import _ext, side
torch.set_num_threads({threads} or torch.get_num_threads())
b, n, d, kw = {batch}, 197, 768, 24
out = {{"variant": _ext.CPU_VARIANT, "rows": []}}
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(b, n, d, generator=g).to(dtype)
    taps = (torch.randn(b, n, kw, generator=g) * 0.3).to(dtype)
    ups = torch.randn(d, kw, generator=g) * 0.05
    grad = torch.randn(b, n, d, generator=g).to(dtype)
    for k in (0, 3):
        w = torch.randn(d, 1, k, k, generator=g) / k if k else None
        def fwd():
            with torch.no_grad():
                side.side_add(y, taps, ups, 100.0, w, (14, 14), 1, backend="cpu")
        leaves = [t.detach().requires_grad_() for t in (taps, ups)] + (
            [w.detach().requires_grad_()] if k else [])
        def full():
            o = side.side_add(y, leaves[0], leaves[1], 100.0, leaves[2] if k else None,
                              (14, 14), 1, backend="cpu")
            torch.autograd.grad(o, leaves, grad)
        for mode, fn in (("fwd", fwd), ("full", full)):
            out["rows"].append(dict(dtype=str(dtype)[6:], k=k, mode=mode,
                                    stats=time_fn(fn, warmup=2, reps={reps})))
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    res = Results("cpu_variants")
    seen = set()
    for cap in CAPS:
        code = CHILD.format(here=str(HERE), threads=args.threads, batch=args.batch, reps=args.reps)
        env = dict(os.environ, DTL_KERNELS_CPU_VARIANT=cap)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        if data["variant"] in seen:  # this CPU cannot run the capped-to variant
            continue
        seen.add(data["variant"])
        for r in data["rows"]:
            model = "dtl" if r["k"] == 0 else f"dtl+k{r['k']}"
            res.add(data["variant"], r["mode"], model, args.batch, r["dtype"],
                    f"{args.batch}x197x768 K24", tuple(r["stats"]), "ms")  # fmt: skip
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
