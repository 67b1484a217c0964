"""Speed and temporary memory of the fused side op ``y + mix(T·Uᵀ)`` on a GPU (a worker of
``gpu_check.py``; alone: ``python benchmarks/gpu_kernels.py --out DIR``).

Providers: ``eager`` (the pure-PyTorch reference), ``compile`` (``torch.compile`` of it),
``cuda`` (our CUDA C++) and ``triton`` (our Triton); modes ``fwd`` (forward under no_grad)
and ``full`` (forward + backward: ``torch.autograd.grad`` for y, T, U and w); DTL (k=0) and
DTL+ (k=3, 5) at the ViT-B/16 training shape (B=32, N=197, d=768, K=24) and Swin-B stage 3
(B=32, 14×14, d=512, K=72, k=5), each in both dtype mixes: all-bfloat16, and autocast's
float32 ``y`` (and gradient, conv weight) with bfloat16 taps and ups (dtype column
``float32+bfloat16``), the mix training feeds.

How it is timed: 100 calls are captured in one CUDA graph (launch overhead out of the
picture) and the graph is replayed 5 times (CUDA events; median per call). The calls cycle
over enough distinct input sets that their bytes exceed twice the L2 cache, so every call
reads its inputs from device memory ("L2 flushed"). A provider whose calls cannot be
captured is timed as 100 back-to-back calls between two events instead (column
``method``). The plain device copy of ``y`` is timed the same way in the same run, into
as many destinations as there are input sets (its writes, too, go to device memory).

Bytes a call must move (one formula, :func:`op_bytes`, each tensor in its own dtype):
forward y, T in, out; backward G, T in, ∂T out (the gradients of U and w are tiny). GB/s =
those bytes / time; ``x_copy`` = that over the GB/s of a copy of ``y`` (``1 / x_copy``: how
far the call is from its lower bound, the time those bytes take at the copy's rate).
``temp`` (:func:`temp_bytes`) = the scratch memory of the forward (``fwd`` rows) or of the
backward alone (``full`` rows); ``temp_x_y`` that over ``y``'s bytes and ``temp_x_limit``
over the limit max(4 MB, 0.25 × bytes of y) (``triton_plan.TEMP_FLOOR`` / ``TEMP_SHARE``).

``kernel_profile.csv``: torch.profiler's breakdown of our fused fwd+bwd (``cuda``, ``triton``)
into its kernels, µs and launches per op (the shape column ends in ``| kernel``): where the
backward's time goes.

``--dry-run``: tiny shapes on the CPU (eager and the C++ kernels, wall clock).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, op_bytes, quantiles, side_kernel  # noqa: E402
from kernel_configs import configs, dtype_label, model_label, shape_label  # noqa: E402

from dtl_kernels.ops import reference  # noqa: E402
from dtl_kernels.ops.triton_plan import TEMP_FLOOR, TEMP_SHARE  # noqa: E402

CALLS, REPLAYS = 100, 5


# -- providers -------------------------------------------------------------------------
def providers(device: str, dry_run: bool, want: list[str]) -> dict:
    """name -> side_add-like callable (y, taps, ups, beta, w, grid, prefix)."""
    out = {"eager": reference.side_add}
    if "compile" in want and not dry_run:
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit"):  # one entry per config
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        out["compile"] = torch.compile(reference.side_add, dynamic=False)
    from dtl_kernels.ops import _ext, compiled_side

    # our compiled kernels: the CUDA C++ ones on a GPU, the C++ CPU ones in a dry run
    compiled = "cpu" if device == "cpu" else "cuda"
    built = _ext.cuda_built() if compiled == "cuda" else _ext.cpu_built()
    if "cuda" in want and built and compiled_side.available(compiled):
        out[compiled] = side_kernel(compiled)
    if "triton" in want and device == "cuda" and _ext.triton_importable():
        out["triton"] = side_kernel("triton")
    want = set(want) | {"cpu"}
    return {k: v for k, v in out.items() if k in want}


# -- inputs ------------------------------------------------------------------------------
class Inputs:
    """``sets`` independent (y, taps, G) triples (plus shared U, w) of one config: y, G and
    w in ``dtype``, taps and U in ``side`` (autocast's mix) or ``dtype``."""

    def __init__(self, b, prefix, grid, d, k_cols, ksize, dtype, device, sets, side=None):
        n = prefix + grid[0] * grid[1]
        gen = torch.Generator(device=device).manual_seed(0)

        def rnd(*s, scale=1.0, dt=dtype):
            return (torch.randn(*s, generator=gen, device=device) * scale).to(dt)

        side = side or dtype
        self.ys = [rnd(b, n, d) for _ in range(sets)]
        self.taps = [rnd(b, n, k_cols, scale=0.3, dt=side) for _ in range(sets)]
        self.gs = [rnd(b, n, d) for _ in range(sets)]
        self.ups = rnd(d, k_cols, scale=0.3 / math.sqrt(k_cols / 6), dt=side)
        self.w = rnd(d, 1, ksize, ksize, scale=1 / ksize) if ksize else None
        self.grid = grid if ksize else None
        self.prefix = prefix
        self.sets = sets

    def leaves(self, y, t) -> list[torch.Tensor]:
        """Fresh autograd leaves: y, taps, ups and (DTL+) w."""
        params = [self.ups] + ([self.w] if self.w is not None else [])
        return [x.detach().requires_grad_() for x in [y, t, *params]]

    def forward(self, fn, leaves):
        w = leaves[3] if self.w is not None else None
        return fn(*leaves[:3], 100.0, w, self.grid, self.prefix)

    def call(self, fn, i: int, mode: str):
        y, t, g = self.ys[i % self.sets], self.taps[i % self.sets], self.gs[i % self.sets]
        if mode == "fwd":
            with torch.no_grad():
                return fn(y, t, self.ups, 100.0, self.w, self.grid, self.prefix)
        leaves = self.leaves(y, t)
        return torch.autograd.grad(self.forward(fn, leaves), leaves, g)


# -- timing ------------------------------------------------------------------------------
def time_calls(call, device: str, calls: int = CALLS, replays: int = REPLAYS):
    """((median, p20, p80) µs per call, method)."""
    if device != "cuda":
        samples = []
        for i in range(3 + replays):
            t0 = time.perf_counter()
            call(i)
            if i >= 3:
                samples.append((time.perf_counter() - t0) * 1e6)
        return quantiles(samples), "wall"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                call(i)
        run, method = graph.replay, "cuda_graph"
    except Exception as exc:  # noqa: BLE001 — a provider that cannot be captured
        print(f"    (no CUDA graph: {type(exc).__name__}: {str(exc)[:120]}; timing a loop)")
        torch.cuda.synchronize()

        def run():
            for i in range(calls):
                call(i)

        method = "loop"
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return quantiles(samples), method


def _new_bytes(tensors, before: set[int]) -> int:
    """Bytes of the storages among ``tensors`` that did not exist before (by data pointer)."""
    seen = {}
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in before:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def temp_bytes(inp: Inputs, fn, mode: str, device: str) -> int | None:
    """Scratch memory of the op: the peak above what was live, minus what the op returns.

    ``fwd``: one forward under no_grad. ``full``: the BACKWARD only (the forward's output
    and what autograd saved are live before it), so the number is the backward's own
    temporaries — the partial sums a fused kernel allocates, or the intermediates of the
    eager formula."""
    if device != "cuda":
        return None
    y, t, g = inp.ys[0], inp.taps[0], inp.gs[0]
    before = {x.untyped_storage().data_ptr() for x in (y, t, g, inp.ups) if x is not None}
    if mode == "fwd":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = fn(y, t, inp.ups, 100.0, inp.w, inp.grid, inp.prefix)
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base - _new_bytes([out], before))
    leaves = inp.leaves(y, t)
    out = inp.forward(fn, leaves)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(out, leaves, g)
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base - _new_bytes(grads, before))


def kernel_breakdown(call, device: str, reps: int = 10, top: int = 8) -> list[tuple]:
    """Where the time of one op goes: [(kernel, launches per op, µs per op)], the ``top``
    costliest device kernels (CPU ops in a dry run) of ``reps`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device == "cuda"
    call(0)  # compiled and cached before the profiled calls
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for i in range(reps):
            call(i)
        if gpu:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = (
            getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
            if gpu
            else e.self_cpu_time_total
        )
        if us > 0:  # short names: no return type, template or argument list
            name = e.key.removeprefix("void ").split("<")[0].split("(")[0]
            rows.append((name[-60:], e.count / reps, us / reps))
    return sorted(rows, key=lambda r: -r[2])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--providers", nargs="+", default=["eager", "compile", "cuda", "triton"])
    ap.add_argument(
        "--warm-only",
        action="store_true",
        help="run each compiled provider once per config (fills the compile caches)",
    )
    args = ap.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device visible", file=sys.stderr)
        return 2
    want = args.providers
    if args.warm_only:
        want = [p for p in want if p in ("compile", "triton")]
    provs = providers(device, args.dry_run, want)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    res = Results("kernels", device=device)
    prof = Results("kernel_profile", device=device)  # shape column: "<shape> | <kernel>"
    copy_gbs_of: dict = {}
    for label, b, prefix, grid, d, k_cols, ksize, dt_name, side_name in configs(args.dry_run):
        dtype, side = getattr(torch, dt_name), getattr(torch, side_name)
        rows = b * (prefix + grid[0] * grid[1])
        elem = torch.empty((), dtype=dtype).element_size()
        side_elem = torch.empty((), dtype=side).element_size()
        set_bytes = 2 * rows * d * elem + rows * k_cols * side_elem
        sets = max(2, math.ceil(2 * l2 / set_bytes)) if l2 else 2
        inp = Inputs(b, prefix, grid, d, k_cols, ksize, dtype, device, sets, side)
        model = model_label(ksize)
        shape = shape_label(label, b, prefix, grid, d, k_cols)
        y_bytes = inp.ys[0].nbytes
        temp_limit = max(TEMP_FLOOR, TEMP_SHARE * y_bytes)
        dt_label = dtype_label(dt_name, side_name)
        if args.warm_only:
            for fn in provs.values():
                for mode in ("fwd", "full"):
                    inp.call(fn, 0, mode)
            torch.cuda.synchronize()
            print(f"warmed {shape} {model} {dt_label}", flush=True)
            continue
        if (shape, dtype) not in copy_gbs_of:  # the copy baseline, once per shape and dtype
            # one destination per input set: one written again and again stays in L2, and
            # the copy would look faster than device memory allows (the op's x_copy lower)
            dsts = [torch.empty_like(y) for y in inp.ys]
            us, _ = time_calls(lambda i, d=dsts, ys=inp.ys: d[i % len(d)].copy_(ys[i % len(ys)]),
                               device)  # fmt: skip
            copy_gbs_of[shape, dtype] = 2 * inp.ys[0].nbytes / (us[0] * 1e-6) / 1e9
            res.add("copy", "copy", "-", b, dtype, shape, us, "us")
            res.add("copy", "copy", "-", b, dtype, shape, copy_gbs_of[shape, dtype], "GB/s")
            del dsts
        copy_gbs = copy_gbs_of[shape, dtype]
        times = {}
        for mode in ("fwd", "full"):
            nbytes = op_bytes(rows, d, k_cols, mode, elem, side_elem)
            for name, fn in provs.items():
                t0 = time.perf_counter()

                def call(i, fn=fn, inp=inp, mode=mode):
                    return inp.call(fn, i, mode)

                try:
                    us, method = time_calls(call, device)
                    temp = temp_bytes(inp, fn, mode, device)
                except Exception as exc:  # noqa: BLE001 — reported, the others still run
                    print(f"  {name} {model} {mode} {dtype}: {type(exc).__name__}: {exc}")
                    continue
                times[name, mode] = us[0]
                gbs = nbytes / (us[0] * 1e-6) / 1e9

                def add(value, unit, row=(name, mode, model, b, dt_label, shape)):
                    res.add(*row, value, unit)

                add(us, "us")
                add(gbs, "GB/s")
                add(gbs / copy_gbs, "x_copy")
                add(method, "method")
                if temp is not None:
                    add(temp / 2**20, "temp_MB")
                    add(temp / y_bytes, "temp_x_y")
                    add(temp / temp_limit, "temp_x_limit")
                print(
                    f"  {shape} {model:7s} {dt_label:16s} {mode:4s} {name:7s} "
                    f"{us[0]:9.1f} us  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.2f}x copy  "
                    f"({method}, {time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            for name in provs:
                for ref in ("eager", "compile"):
                    if name != ref and (name, mode) in times and (ref, mode) in times:
                        ratio = times[ref, mode] / times[name, mode]
                        res.add(name, mode, model, b, dt_label, shape, ratio, f"speedup_vs_{ref}")
        for name, fn in provs.items():
            if name in ("cuda", "triton", "cpu"):  # our kernels, fwd + bwd: who costs what
                try:
                    parts = kernel_breakdown(
                        lambda i, fn=fn, inp=inp: inp.call(fn, i, "full"), device
                    )
                except Exception as exc:  # noqa: BLE001 — a diagnostic only
                    print(f"  (no profile of {name}: {type(exc).__name__}: {exc})")
                    continue
                for kernel, launches, us in parts:
                    prof.add(name, "full", model, b, dt_label, f"{shape} | {kernel}", us, "us")
                    prof.add(name, "full", model, b, dt_label, f"{shape} | {kernel}", launches,
                             "launches")  # fmt: skip
                print(
                    f"  profile {name} {model} {dt_label}: "
                    + ", ".join(f"{k} {us:.1f}us" for k, _, us in parts[:6]),
                    flush=True,
                )
        del inp
        if device == "cuda":
            torch.cuda.empty_cache()
        if not args.warm_only:  # saved per config: a stage cut off keeps what it measured
            res.write("kernels", directory=args.out, show=False)
    if not args.warm_only:
        res.write("kernels", directory=args.out)
        prof.write("kernel_profile", directory=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
