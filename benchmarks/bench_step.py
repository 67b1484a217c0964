"""Step and inference time of DTL beside its alternatives, measured so that 10 % differences
resolve (``make gpu-check``'s ``e2e`` stage; ``--dry-run`` on the CPU for CI).

Protocol (the same on every device):

* every provider is built once, on the device, and the providers run **interleaved
  round-robin**: each round calls every provider once, in turn, ``--reps`` (≥ 30) rounds
  after ``--warmup`` rounds, so a clock or load change hits them alike;
* per provider: **median and IQR** of the wall time of one call (CUDA events around it on a
  GPU), and on a GPU the **GPU-busy time**: the summed duration of the CUDA kernels of one
  call, from the profiler over ``--profile-reps`` further calls. Wall ≫ busy means the
  host is the bottleneck;
* training: one step = forward + cross-entropy + backward + AdamW (``dtl_kernels.optim``,
  as dtl-train), ``--amp`` autocast (bf16 on a GPU); providers full / linear / lora (PEFT
  r = 8 on every ``qkv``, when ``peft`` is there) / dtl_ref (the eager published
  formulation) / dtl / dtl+ (k = 3 ViT, 5 Swin);
* inference: eval forward under ``torch.no_grad`` at each ``--infer-batches``, plain timm /
  dtl / dtl+ (and ``dtl_cuda``, DTL on the CUDA C++ kernels, where they run: ``auto`` puts
  Triton first, whose launches cost Python per add-back; and ``dtl_jit``, ``dtl`` with
  every Triton launch through Triton's JIT, on a GPU), eager and (on a GPU) replayed
  from a captured CUDA graph, which removes the host from the measurement; one
  ``torch.compile(mode="reduce-overhead")`` DTL point shows the compiled path.

Rows (``--out``.csv, the columns of ``common.COLUMNS``): ``step_ms`` / ``step_busy_ms``,
``infer_ms`` / ``infer_graph_ms`` / ``infer_busy_ms`` / ``infer_compiled_ms`` (median, p25,
p75 in the p20 / p80 columns' place), ``step_x_full`` … ratios of medians of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results  # noqa: E402

from dtl_kernels import create_model  # noqa: E402
from dtl_kernels.ops import triton_launch  # noqa: E402
from dtl_kernels.optim import adamw  # noqa: E402

NUM_CLASSES = 10
TRAIN = ("full", "linear", "lora", "dtl_ref", "dtl", "dtl+")
INFER = ("timm", "dtl", "dtl+")
#: inference beside ``dtl`` (``auto``: Triton first on CUDA) where the CUDA C++ kernels run:
#: DTL on them, no Python per add-back — which backend small batches should take
INFER_CUDA = ("dtl_cuda",)
#: ``dtl`` with every Triton launch through Triton's JIT (``triton_launch.jit_only()``
#: around its calls): what the direct launches save on the GPU, where Triton runs
INFER_TRITON_JIT = ("dtl_jit",)


def build(name: str, provider: str, device: str, img: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(img_size=img) if name.startswith("vit") else {}
    with torch.device(device):
        if provider in ("timm", "lora"):
            import timm

            model = timm.create_model(name, num_classes=NUM_CLASSES, **kw)
            if provider == "lora":
                import peft

                cfg = peft.LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"])
                model = peft.get_peft_model(model, cfg)
            return model
        method = {"dtl_ref": "dtl", "dtl_cuda": "dtl", "dtl_jit": "dtl"}.get(provider, provider)
        model = create_model(name, method=method, num_classes=NUM_CLASSES, **kw)
    if model.csn is not None:
        model.csn.backend = {"dtl_ref": "reference", "dtl_cuda": "cuda"}.get(provider, "auto")
        with torch.no_grad():  # B ≠ 0: nothing short-circuits on zeros
            for p in model.csn.up.values():
                p.normal_(0, 0.02)
    return model


class Timer:
    """Wall time of calls: CUDA events on a GPU, perf_counter on the CPU (ms)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def busy_ms(fn: Callable[[], object], reps: int) -> float | None:
    """Summed duration of the CUDA kernels of one call (profiler), or None off a GPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return total_us / 1e3 / reps


def round_robin(calls: dict[str, Callable], timer: Timer, reps: int, warmup: int) -> dict:
    samples = {name: [] for name in calls}
    for r in range(warmup + reps):
        for name, fn in calls.items():
            ms = timer(fn)
            if r >= warmup:
                samples[name].append(ms)
    return samples


def stats(xs: list[float]) -> tuple[float, float, float]:
    """(median, p25, p75); a single sample repeats."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(sorted(xs), n=4, method="inclusive")
    return med, q1, q3


def train_calls(name, providers, device, batch, img, amp) -> dict[str, Callable]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    calls = {}
    for provider in providers:
        model = build(name, provider, device, img).train()
        opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()

        calls[provider] = step
    return calls


def infer_calls(name, providers, device, batch, img, amp, graphs: bool) -> dict[str, Callable]:
    x = torch.randn(batch, 3, img, img, device=device)
    calls = {}
    for provider in providers:
        # frozen, every provider: under autocast a weight that requires grad goes through
        # autocast's cast cache (host time a frozen DTL backbone does not pay; bench_host.py)
        model = build(name, provider, device, img).eval().requires_grad_(False)

        def fwd(model=model, jit=provider == "dtl_jit"):
            with (
                torch.no_grad(),
                torch.autocast(device, dtype=amp, enabled=amp is not None),
                triton_launch.jit_only() if jit else contextlib.nullcontext(),
            ):
                return model(x)

        calls[provider] = fwd
        if graphs:
            try:
                calls[f"{provider}@graph"] = cuda_graph(fwd)
            except Exception as exc:  # noqa: BLE001 — its eager row and the others still run
                print(f"[{name} b={batch}] {provider}: no CUDA graph ({type(exc).__name__}: "
                      f"{str(exc)[:200]})", flush=True)  # fmt: skip
                torch.cuda.synchronize()
    return calls


def _cuda_kernels_run(device: str) -> bool:
    """Whether the CUDA C++ backend runs tensors on ``device`` (built and a GPU there)."""
    from dtl_kernels.ops import side

    return device == "cuda" and side.BACKENDS["cuda"].runs(torch.zeros(1, device=device))


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph (static input and output), replayed per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph: lazy inits, compile caches
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--models", nargs="+", default=["vit_base_patch16_224"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile-reps", type=int, default=5)
    ap.add_argument("--providers", nargs="+", default=list(TRAIN), choices=TRAIN)
    ap.add_argument("--infer-batches", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile point")
    ap.add_argument(
        "--no-diagnostics", action="store_true", help="inference without dtl_cuda / dtl_jit"
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny ViT, 2 rounds")
    ap.add_argument(
        "--warm-only",
        action="store_true",
        help="fill the compile caches (Triton's kernels at every add-back's width, the first "
        "model's compiled point) without timing or writing anything",
    )
    ap.add_argument("--out", default="step", help="CSV name stem")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.dry_run:
        args.device, args.models, args.batch, args.img = "cpu", ["vit_tiny_patch16_224"], 2, 32
        args.reps, args.warmup, args.infer_batches, args.amp = 2, 1, [1], "none"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_step: no CUDA GPU (use --device cpu or --dry-run)")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    providers = [p for p in args.providers if p != "lora" or _has_peft()]
    if args.warm_only:
        warm(args, amp)
        return 0
    timer = Timer(args.device)
    res = Results("step", device=args.device)
    dtype = args.amp if amp else "float32"
    gpu = args.device == "cuda"
    for name in args.models:
        shape = f"{args.img}x{args.img}"

        def add(provider, mode, batch, value, unit="ms", name=name, shape=shape):
            res.add(provider, mode, name, batch, dtype, shape, value, unit)

        calls = train_calls(name, providers, args.device, args.batch, args.img, amp)
        samples = round_robin(calls, timer, args.reps, args.warmup)
        med = {p: statistics.median(s) for p, s in samples.items()}
        for p, s in samples.items():
            add(p, "step_ms", args.batch, stats(s))
            busy = busy_ms(calls[p], args.profile_reps) if gpu else None
            if busy is not None:
                add(p, "step_busy_ms", args.batch, busy)
            for ref in ("full", "lora", "dtl_ref"):
                if ref in med and p != ref:
                    add(p, f"step_x_{ref}", args.batch, med[p] / med[ref], "x")
            gpu_busy = f"  GPU busy {busy:.2f} ms" if busy is not None else ""
            print(f"[{name} b={args.batch}] {p:8s} step {med[p]:8.2f} ms "
                  f"(IQR {stats(s)[1]:.2f}–{stats(s)[2]:.2f}){gpu_busy}", flush=True)  # fmt: skip
        del calls
        res.write(args.out, args.results_dir, show=False)  # a later stop keeps these rows
        infer = INFER
        if not args.no_diagnostics:
            infer += INFER_CUDA if _cuda_kernels_run(args.device) else ()
            infer += INFER_TRITON_JIT if gpu and triton_launch.ENABLED else ()
        for batch in args.infer_batches:
            calls = infer_calls(name, infer, args.device, batch, args.img, amp, graphs=gpu)
            samples = round_robin(calls, timer, args.reps, args.warmup)
            med = {p: statistics.median(s) for p, s in samples.items()}
            for p, s in samples.items():
                base, graph = p.removesuffix("@graph"), p.endswith("@graph")
                add(base, "infer_graph_ms" if graph else "infer_ms", batch, stats(s))
                ref = "timm@graph" if graph else "timm"
                if base != "timm" and ref in med:  # (timm's graph may have failed)
                    add(base, "infer_graph_x_timm" if graph else "infer_x_timm", batch,
                        med[ref] / med[p], "x")  # fmt: skip
                if gpu and not graph:
                    add(base, "infer_busy_ms", batch, busy_ms(calls[p], args.profile_reps))
            print(f"[{name} infer b={batch}] "
                  + "  ".join(f"{p} {m:.2f} ms" for p, m in med.items()), flush=True)  # fmt: skip
            del calls
            res.write(args.out, args.results_dir, show=False)
        if gpu and not args.no_compile:
            compiled_point(name, args, amp, timer, add)
    res.write(args.out, args.results_dir)
    return 0


def warm(args, amp) -> None:
    """One training step and one forward per inference batch of the fused providers of each
    model (their kernels compile on the first call, one per add-back width and dtype), and
    the compiled point of the first model: what the timed run would otherwise compile
    inside its own time box (``gpu_check.py`` runs this beside its checks)."""
    fused = ("dtl", "dtl+")
    for i, name in enumerate(args.models):
        t0 = time.perf_counter()
        for step in train_calls(name, fused, args.device, args.batch, args.img, amp).values():
            step()
        for batch in args.infer_batches:
            for fwd in infer_calls(name, fused, args.device, batch, args.img, amp,
                                   graphs=False).values():  # fmt: skip
                fwd()
        if i == 0 and args.device == "cuda" and not args.no_compile:
            compiled_point(name, args, amp, Timer(args.device), lambda *a, **k: None)
        print(f"[{name}] warmed in {time.perf_counter() - t0:.0f} s", flush=True)


def compiled_point(name, args, amp, timer, add) -> None:
    """DTL inference at batch 1 under ``torch.compile(mode="reduce-overhead")``."""
    try:
        model = build(name, "dtl", args.device, args.img).eval()
        x = torch.randn(1, 3, args.img, args.img, device=args.device)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)

        def fwd():
            with torch.no_grad(), torch.autocast(args.device, dtype=amp, enabled=amp is not None):
                return compiled(x)

        t0 = time.perf_counter()
        for _ in range(3):
            fwd()
        print(
            f"[{name}] torch.compile reduce-overhead: {time.perf_counter() - t0:.0f} s to compile"
        )
        add("dtl", "infer_compiled_ms", 1, stats([timer(fwd) for _ in range(args.reps)]))
    except Exception as exc:  # reported, not fatal: the eager and graph rows stand
        print(f"[{name}] torch.compile failed: {type(exc).__name__}: {exc}", flush=True)


def _has_peft() -> bool:
    with contextlib.suppress(ImportError):
        import peft  # noqa: F401

        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
