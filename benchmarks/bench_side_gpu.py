"""Fused side op ``y + mix(T·Uᵀ)`` on a GPU: CUDA C++ and Triton (ours) vs the eager
reference and ``torch.compile`` of it; forward and forward+backward, DTL and DTL+ (k=3, 5).

ViT-B/16 shapes: rows = batch·197, d = 768, K = 24 (the last adapted block with r = 2).
Times are CUDA-event medians; GB/s is the traffic the op must move (forward: y, T in,
out; backward: G, T in, ∂T out) over time, next to a device copy measured in the same run.
Without a GPU it says so and exits 0.

Run: ``python benchmarks/bench_side_gpu.py [--batch 32] [--dtype bfloat16] [--reps 50]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, quantiles  # noqa: E402


def cuda_time(fn, warmup: int = 5, reps: int = 50) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return quantiles(samples)


def op_bytes(rows: int, d: int, kc: int, mode: str, elem: int) -> int:
    fwd = (2 * rows * d + rows * kc) * elem
    bwd = (rows * d + 2 * rows * kc) * elem
    return fwd if mode == "fwd" else fwd + bwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--taps", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_side_gpu: no CUDA GPU visible, nothing to measure (skipped)")
        return

    from dtl_kernels.ops import _ext, reference, triton_side

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    b, d, kc, grid, prefix = args.batch, args.width, args.taps, (14, 14), 1
    n = prefix + grid[0] * grid[1]
    rows = b * n
    res = Results("side_gpu")
    res.env["machine"] = torch.cuda.get_device_name()
    shape = f"rows={rows},d={d},K={kc}"

    src = torch.randn(rows, d, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = cuda_time(lambda: dst.copy_(src), reps=args.reps)
    res.add("copy", "copy", "-", b, dtype, f"rows={rows},d={d}", copy_ms, "ms")
    res.add(
        "copy",
        "copy",
        "-",
        b,
        dtype,
        f"rows={rows},d={d}",
        2 * src.numel() * src.element_size() / (copy_ms[0] * 1e-3) / 1e9,
        "GB/s",
    )

    y = torch.randn(b, n, d, device="cuda", dtype=dtype)
    taps = torch.randn(b, n, kc, device="cuda", dtype=dtype)
    ups = (torch.randn(d, kc, device="cuda") * 0.02).to(dtype)
    g = torch.randn_like(y)

    providers = {"torch": reference.side_add}
    if not args.no_compile:
        providers["torch_compile"] = torch.compile(reference.side_add)
    if triton_side.available():
        providers["triton"] = triton_side.side_add
    if _ext.cuda_built():
        from dtl_kernels.ops import compiled_side

        if compiled_side.available("cuda"):
            providers["cuda"] = compiled_side.side_add

    for k in (0, 3, 5):
        w = (torch.randn(d, 1, k, k, device="cuda") / k).to(dtype) if k else None
        model = "DTL" if k == 0 else f"DTL+k{k}"
        for name, fn in providers.items():
            leaves = [t.detach().requires_grad_() for t in (y, taps, ups)]
            wl = w.detach().requires_grad_() if w is not None else None
            gr = grid if k else None

            def fwd(fn=fn, leaves=leaves, wl=wl, gr=gr):
                with torch.no_grad():
                    return fn(*leaves, 100.0, wl, gr, prefix)

            def full(fn=fn, leaves=leaves, wl=wl, gr=gr):
                fn(*leaves, 100.0, wl, gr, prefix).backward(g)

            for mode, f in (("fwd", fwd), ("full", full)):
                try:
                    ms = cuda_time(f, reps=args.reps)
                except Exception as exc:  # a provider that fails is reported, not fatal
                    print(f"{name} {model} {mode}: {type(exc).__name__}: {exc}")
                    continue
                res.add(name, mode, model, b, dtype, shape, ms, "ms")
                gbs = op_bytes(rows, d, kc, mode, y.element_size()) / (ms[0] * 1e-3) / 1e9
                res.add(name, mode, model, b, dtype, shape, gbs, "GB/s")
    res.write()


if __name__ == "__main__":
    main()
