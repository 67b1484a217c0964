"""Fused side op ``y + mix(T·Uᵀ)`` on CPU: ours (compiled C++) vs the eager reference vs
``torch.compile`` of the reference, forward and forward+backward, DTL and DTL+ (k=3), in
three dtype mixes: autocast's float32 y with bf16 taps / ups (first: what bf16 autocast
training feeds), all float32, all bf16.

ViT-B/16 shapes: rows = 32·197, d = 768, r = 2 at the last adapted block (K = 12·2 = 24).
Effective bandwidth = bytes the op must move / time, next to a plain copy measured in the
same run. The providers run in turn, round after round (a shared machine's load changes
hit them alike). Run: ``python benchmarks/bench_side_op.py [--batch 32] [--reps 15]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, interleaved, op_bytes, side_kernel, time_fn  # noqa: E402

from dtl_kernels.ops import compiled_side, reference  # noqa: E402

#: label → (dtype of y, out, G and the conv; dtype of the taps and ups). The first is what
#: bf16 autocast training feeds (timm keeps the residual stream float32, a matmul's taps
#: come out bf16): the headline row.
PRECISIONS = {
    "float32+bfloat16": (torch.float32, torch.bfloat16),
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--taps", type=int, default=24, help="K = (blocks tapped so far) · r")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--results", type=Path, default=None, help="CSV folder (default: results/)")
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=list(PRECISIONS),
        choices=list(PRECISIONS),
        help="dtype mixes (default: all; autocast's float32+bfloat16 first, the headline)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not compiled_side.available("cpu"):
        sys.exit("the CPU extension is not built: run `make build`")
    cpu_kernel = side_kernel("cpu")

    torch.manual_seed(0)
    b, n, d, kc = args.batch, args.tokens, args.width, args.taps
    rows, grid, prefix = b * n, (14, 14), 1
    dtype = torch.float32
    res = Results("side_op")
    csv_name = "side_op" if not args.threads else f"side_op_t{args.threads}"
    shape = f"rows={rows},d={d},K={kc}"

    # copies between rotating buffers, 4 × 39 MB in all: one pair copied again and again
    # stays partly in a 32 MB L3 and reads faster than memory (0.32 ms vs 0.6–1.1 ms on an
    # AMD EPYC); the clone below reads them in turn too
    pairs = itertools.cycle([(torch.randn(rows, d), torch.empty(rows, d)) for _ in range(4)])

    def copy() -> None:
        src, dst = next(pairs)
        dst.copy_(src)

    src = torch.randn(rows, d)
    copy_ms = time_fn(copy, warmup=4, reps=args.reps * 3)  # (every pair touched first)
    copy_gbs = 2 * src.numel() * 4 / (copy_ms[0] * 1e-3) / 1e9
    res.add("copy", "copy", "-", b, dtype, f"rows={rows},d={d}", copy_ms, "ms")
    res.add("copy", "copy", "-", b, dtype, f"rows={rows},d={d}", copy_gbs, "GB/s")
    # A copy into a fresh tensor (what any op returning a new tensor pays: the first touch
    # of newly allocated pages), for comparison.
    clone_ms = time_fn(lambda: next(pairs)[0].clone(), warmup=4, reps=args.reps * 3)
    clone_gbs = 2 * src.numel() * 4 / (clone_ms[0] * 1e-3) / 1e9
    res.add("clone", "copy", "-", b, dtype, f"rows={rows},d={d}", clone_ms, "ms")
    res.add("clone", "copy", "-", b, dtype, f"rows={rows},d={d}", clone_gbs, "GB/s")

    y32 = torch.randn(b, n, d)
    taps32 = torch.randn(b, n, kc)
    ups32 = torch.randn(d, kc) * 0.02
    grad32 = torch.randn(b, n, d)
    summary = []
    for label in args.precisions:
        y_dtype, side_dtype = PRECISIONS[label]
        y, grad = y32.to(y_dtype), grad32.to(y_dtype)
        taps, ups = taps32.to(side_dtype), ups32.to(side_dtype)
        elems = (y.element_size(), taps.element_size())
        summary.append(f"{label} (y {str(y_dtype)[6:]}, taps / ups {str(side_dtype)[6:]}):")
        for k in (0, 3):
            model = "dtl" if k == 0 else f"dtl+k{k}"
            conv = (torch.randn(d, 1, k, k) / k).to(y_dtype) if k else None
            g = grid if k else None

            def ref_fn(y, t, u, w, g=g):
                return reference.side_add(y, t, u, 100.0, w, g, prefix)

            def ours_fn(y, t, u, w, g=g):
                return cpu_kernel(y, t, u, 100.0, w, g, prefix)

            providers = {"ours": ours_fn, "torch": ref_fn}
            if not args.no_compile:  # (dynamo's cache keys on the code: one per case)
                torch._dynamo.reset()
                providers["torch_compile"] = torch.compile(ref_fn, fullgraph=True)
            calls = {}
            for name, fn in providers.items():
                leaves = [t.clone().requires_grad_() for t in (y, taps, ups)]
                w = conv.clone().requires_grad_() if k else None

                def fwd(fn=fn, conv=conv, y=y, taps=taps, ups=ups):
                    with torch.no_grad():
                        return fn(y, taps, ups, conv)

                def full(fn=fn, leaves=leaves, w=w, grad=grad):
                    # the gradients returned, as a block's backward hands them on: no leaf
                    # .grad to fill (a copy of ∂y, 19 MB, that training never makes)
                    out = fn(*leaves, w)
                    torch.autograd.grad(out, [t for t in (*leaves, w) if t is not None], grad)

                calls[(name, "fwd")], calls[(name, "full")] = fwd, full
            times = {}
            for mode in ("fwd", "full"):
                # the providers in turn, round after round: a change of the machine's load
                # (a shared host's neighbours) hits them alike
                stats = interleaved({nm: calls[(nm, mode)] for nm in providers}, args.reps)
                for name in providers:
                    times[(name, mode)] = stats[name][0]
                    res.add(name, mode, model, b, label, shape, stats[name], "ms")
                    gbs = op_bytes(rows, d, kc, mode, *elems) / (stats[name][0] * 1e-3) / 1e9
                    res.add(name, mode, model, b, label, shape, gbs, "GB/s")
                    res.add(name, mode, model, b, label, shape, gbs / copy_gbs, "x_copy_bw")
            for mode in ("fwd", "full"):
                ours = times[("ours", mode)]
                line = f"  {model:8s} {mode:4s}: ours {ours:.2f} ms; "
                line += f"{times[('torch', mode)] / ours:.1f}x vs eager"
                if ("torch_compile", mode) in times:
                    line += f", {times[('torch_compile', mode)] / ours:.1f}x vs compile"
                gbs = op_bytes(rows, d, kc, mode, *elems) / (ours * 1e-3) / 1e9
                line += f"; {gbs:.1f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy "
                line += f"({copy_gbs:.1f} GB/s), {100 * gbs / clone_gbs:.0f}% of clone "
                line += f"({clone_gbs:.1f} GB/s)"
                summary.append(line)
    res.write(csv_name, directory=args.results)
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
