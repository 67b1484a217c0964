"""One DTL training step on the CPU in bf16 autocast against the same step in fp32.

This CPU (AVX-512-BF16, AMX) runs bf16 matrix work fast; the question is how much of a
whole DTL step (frozen backbone forward, side network, fused side op, backward of the tail)
that buys. Both precisions run in the same process on the same model, alternating step by
step, so load on a shared machine hits both alike. Target (issue 12): bf16 step ≤ 0.5× the
fp32 step.

    python benchmarks/bench_bf16_step.py [--models ...] [--batch 16] [--reps 6]

Writes ``benchmarks/results/bf16_step.csv`` (median and p20/p80 ms per step, the ratio).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, quantiles  # noqa: E402

from dtl_kernels import create_model  # noqa: E402

TARGET = 0.5


def step_fn(model, x, y, opt, bf16: bool):
    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--models", nargs="+", default=["vit_base_patch16_224", "vit_small_patch14_dinov2"]
    )
    ap.add_argument("--methods", nargs="+", default=["dtl", "dtl+"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    res = Results("bf16_step")
    lines = []
    for name in args.models:
        for method in args.methods:
            torch.manual_seed(0)
            model = create_model(name, method=method, num_classes=10, img_size=args.img).train()
            opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
            x = torch.randn(args.batch, 3, args.img, args.img)
            y = torch.randint(0, 10, (args.batch,))
            steps = {p: step_fn(model, x, y, opt, p == "bf16") for p in ("fp32", "bf16")}
            times = {"fp32": [], "bf16": []}
            for i in range(args.reps + 1):  # the first round warms up (not timed)
                for prec in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
                    t0 = time.perf_counter()
                    steps[prec]()
                    if i:
                        times[prec].append((time.perf_counter() - t0) * 1e3)
            shape = f"{args.img}px"
            stats = {p: quantiles(t) for p, t in times.items()}
            for prec, q in stats.items():
                res.add(prec, "train_step", f"{name}:{method}", args.batch, prec, shape, q, "ms")
            ratio = stats["bf16"][0] / stats["fp32"][0]
            res.add(
                "bf16/fp32", "train_step", f"{name}:{method}", args.batch, "-", shape, ratio, "x"
            )
            verdict = "PASS" if ratio <= TARGET else f"MISS (off by {ratio / TARGET:.2f}x)"
            lines.append(
                f"{name} {method} b{args.batch}: fp32 {stats['fp32'][0]:.0f} ms, bf16 "
                f"{stats['bf16'][0]:.0f} ms per step -> {ratio:.3f}x "
                f"(target <= {TARGET}): {verdict}"
            )
            print(lines[-1], flush=True)
    res.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
