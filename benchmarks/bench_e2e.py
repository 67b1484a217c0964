"""End-to-end DTL training and inference on ViT-B/16 and Swin-B (random weights).

Providers (one training step = forward + cross-entropy + backward + AdamW step):

* ``full``: full fine-tuning, the same (published) head path as DTL.
* ``linear``: frozen backbone, head only.
* ``lora``: HF ``peft`` LoRA r=8 on every ``qkv`` of a plain timm model, timm's head trained
  (``LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"])``).
* ``dtl_ref``: DTL with the eager published formulation (``csn.backend = "reference"``).
* ``dtl``: DTL, fused kernel (``backend = "auto"``); ``dtl+``: k = 3 (ViT) / 5 (Swin);
  ``dtl+*``: DTL+ with M = 1; ``dtl_bf16trunk``: ``trunk_dtype=torch.bfloat16``;
  ``dtl_ckpt``: ``checkpoint_tail=True``; ``dtl_bf16w``: ``backbone_dtype=torch.bfloat16``
  (frozen weights in bfloat16); ``dtl_bf16w_ckpt``: both.

DTL models get non-zero ``B`` (N(0, 0.02)) so nothing is short-circuited by zeros.

What is measured, per provider and batch (``mode`` column of the CSV):

* ``saved_bytes`` (MB) and ``saved_x_full``: bytes autograd saves for backward during the
  step's forward + loss, collected with ``torch.autograd.graph.saved_tensors_hooks``,
  deduplicated by storage, parameters excluded (``SavedBytes`` of bench_memory.py).
* ``cpu_peak`` (MB): peak CPU allocator memory of one training step. The step runs under
  ``torch.profiler.profile(profile_memory=True)``; the ``[memory]`` events of
  ``prof.profiler.kineto_results.events()`` (signed ``nbytes()``: + allocation,
  − free) are sorted by ``start_ns()`` and summed; the peak is the largest prefix sum.
  It is therefore the peak *above what was live when the step started* (weights, AdamW
  state of an earlier warm-up step, the input batch), nothing subtracted or added. The
  previous step's gradients are released (``zero_grad(set_to_none=True)``) before the
  profiled step starts, because the profiler does not report frees of blocks allocated
  before it started; the new gradients are therefore inside the peak.
* ``step_time`` (ms): median (p20, p80) wall time of a training step after a warm-up step;
  ``step_x_full`` and ``step_x_lora`` are ratios of medians measured in the same run.
* ``trainable`` (count): trainable parameters.
* ``infer`` (images/s): eval-mode forward under ``torch.no_grad`` at batch 1, 4, 16, plain
  timm vs DTL vs DTL+ (``infer_x_timm``: ratio to plain timm, same run).
* ``M`` sweep (ViT-B DTL, ``shape`` = ``M=<m>``): saved bytes, CPU peak and step time.

On CUDA (when a GPU is present and ``--device`` includes it) the same rows are written with
mode prefix ``cuda:``; peak memory is ``torch.cuda.max_memory_allocated`` minus the memory
allocated at step start, times come from CUDA events.

Plots: ``e2e_batch.png`` (memory and time vs batch), ``e2e_m_sweep.png`` (vs M).
Run: ``python benchmarks/bench_e2e.py [--quick]``; tiny smoke run:
``python benchmarks/bench_e2e.py --models vit_tiny_patch16_224 --batches 2 --reps 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import SavedBytes  # noqa: E402
from common import RESULTS, Results, cpu_peak_bytes, quantiles, time_fn  # noqa: E402

from dtl_kernels import create_model  # noqa: E402

NUM_CLASSES = 10
PROVIDERS = [
    "full",
    "linear",
    "lora",
    "dtl_ref",
    "dtl",
    "dtl+",
    "dtl+*",
    "dtl_bf16trunk",
    "dtl_ckpt",
    "dtl_bf16w",
    "dtl_bf16w_ckpt",
]
MB = 1 / 2**20


# -- models ------------------------------------------------------------------------------
def _randomize_side(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.02)


def build(name: str, provider: str, device: str = "cpu", **opts) -> torch.nn.Module:
    """The model of ``provider`` on timm model ``name`` (random weights, 10 classes), its
    parameters created on ``device`` (a GPU initialises ViT-B in a fraction of the CPU's
    time)."""
    with torch.device(device) if device != "cpu" else contextlib.nullcontext():
        return _build(name, provider, **opts)


def _build(name: str, provider: str, **opts) -> torch.nn.Module:
    if provider in ("timm", "lora"):
        import timm

        model = timm.create_model(name, num_classes=NUM_CLASSES)
        if provider == "lora":
            import peft

            cfg = peft.LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"])
            model = peft.get_peft_model(model, cfg)
        return model
    method, backend = {
        "full": ("full", "auto"),
        "linear": ("linear", "auto"),
        "dtl_ref": ("dtl", "reference"),
        "dtl": ("dtl", "auto"),
        "dtl+": ("dtl+", "auto"),
        "dtl+*": ("dtl+*", "auto"),
        "dtl_bf16trunk": ("dtl", "auto"),
        "dtl_ckpt": ("dtl", "auto"),
        "dtl_bf16w": ("dtl", "auto"),
        "dtl_bf16w_ckpt": ("dtl", "auto"),
    }[provider]
    if provider == "dtl_bf16trunk":
        opts["trunk_dtype"] = torch.bfloat16
    if provider in ("dtl_ckpt", "dtl_bf16w_ckpt"):
        opts["checkpoint_tail"] = True
    if provider in ("dtl_bf16w", "dtl_bf16w_ckpt"):
        opts["backbone_dtype"] = torch.bfloat16
    model = create_model(name, method=method, num_classes=NUM_CLASSES, **opts)
    if model.csn is not None:
        model.csn.backend = backend
        _randomize_side(model)
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- one training step -------------------------------------------------------------------
def autocast(device: str, amp: torch.dtype | None):
    """Mixed precision in ``amp`` (e.g. bfloat16), or nothing when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp)


class Step:
    """forward + cross-entropy + backward + AdamW step of ``model`` on a fixed batch."""

    def __init__(self, model, batch: int, img: int, device: str, amp: torch.dtype | None = None):
        self.model = model.to(device).train()
        self.device = device
        self.amp = amp
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, img, img, generator=gen).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        self.opt = torch.optim.AdamW(trainable(self.model), lr=1e-4, weight_decay=0.05)

    def forward_loss(self) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return F.cross_entropy(self.model(self.x).float(), self.y)

    def __call__(self, rec: SavedBytes | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        if rec is None:
            loss = self.forward_loss()
        else:
            with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
                loss = self.forward_loss()
        loss.backward()
        self.opt.step()


def cuda_time_ms(fn, reps: int) -> tuple[float, float, float]:
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return quantiles(samples)


def measure_step(
    name: str,
    provider: str,
    batch: int,
    img: int,
    reps: int,
    device: str,
    profile: bool = True,
    amp: torch.dtype | None = None,
    **opts,
) -> dict:
    """dict(saved, peak, time=(median, p20, p80), trainable) of one provider / batch.

    The warm-up step (it creates the AdamW state) also counts the saved bytes (they do not
    depend on the optimizer); ``profile`` adds one step for the peak memory (else ``peak`` is
    ``None``); then ``reps`` timed steps."""
    torch.manual_seed(0)
    model = build(name, provider, device, **opts)
    step = Step(model, batch, img, device, amp)
    rec = SavedBytes(step.model)
    step(rec)  # warm-up: AdamW state, kernel caches; saved bytes
    peak = peak_total = None
    if device == "cuda":
        if profile:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak_total = torch.cuda.max_memory_allocated()  # weights + AdamW state included
            peak = peak_total - base
        times = cuda_time_ms(step, reps)
    else:
        if profile:
            # free the previous step's gradients first: the profiler reports no free of a
            # block allocated before it started, so such frees would be missed
            step.opt.zero_grad(set_to_none=True)
            peak = cpu_peak_bytes(step)
        times = time_fn(step, warmup=0, reps=reps)
    out = dict(
        saved=rec.total,
        peak=peak,
        peak_total=peak_total,
        time=times,
        trainable=sum(p.numel() for p in trainable(model)),
    )
    del step, model
    return out


def measure_infer(
    name: str,
    provider: str,
    batch: int,
    img: int,
    reps: int,
    device: str,
    warmup: int = 2,
    amp: torch.dtype | None = None,
) -> tuple:
    """Images/s (median, p20, p80) of an eval forward under no_grad, every model frozen (as a
    DTL backbone is: under autocast a weight that requires grad goes through autocast's cast
    cache, host time a frozen model does not pay; bench_host.py)."""
    torch.manual_seed(0)
    model = build(name, provider, device).to(device).eval().requires_grad_(False)
    x = torch.randn(batch, 3, img, img, device=device)

    def fwd():
        with torch.no_grad(), autocast(device, amp):
            model(x)

    for _ in range(warmup):
        fwd()
    if device == "cuda":
        torch.cuda.synchronize()
        ms = cuda_time_ms(fwd, reps)
    else:
        ms = time_fn(fwd, warmup=0, reps=reps)
    # images/s: the median time gives the median rate; p20 of time is p80 of rate
    return batch / ms[0] * 1e3, batch / ms[2] * 1e3, batch / ms[1] * 1e3


# -- the benchmark -----------------------------------------------------------------------
def short(name: str) -> str:
    return {"vit_base_patch16_224": "ViT-B/16", "swin_base_patch4_window7_224": "Swin-B"}.get(
        name, name
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="ViT-B only, fewer points and repetitions")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--providers", nargs="+", default=PROVIDERS)
    ap.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=None,
        help="step-table batches, every provider (default: 8 32; quick: 8)",
    )
    ap.add_argument(
        "--time-batches",
        nargs="*",
        type=int,
        default=None,
        help="extra batches for the time targets: full, lora, dtl only, no profiled "
        "step (default: none; quick: 32)",
    )
    ap.add_argument(
        "--sweep-batches",
        nargs="*",
        type=int,
        default=None,
        help="(f): batch sweep (none when given empty)",
    )
    ap.add_argument("--sweep-providers", nargs="+", default=["full", "lora", "dtl", "dtl+"])
    ap.add_argument(
        "--m-values", nargs="*", type=int, default=None, help="(g): M sweep (none when given empty)"
    )
    ap.add_argument("--m-batch", type=int, default=None)
    ap.add_argument("--infer-batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--reps", type=int, default=None, help="timed training steps")
    ap.add_argument("--infer-reps", type=int, default=None)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="'all': CPU, plus CUDA when a GPU is present",
    )
    ap.add_argument("--out", default="e2e", help="CSV / PNG name stem in benchmarks/results")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where CSV / PNG go")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16"],
        default="none",
        help="autocast dtype of the steps and inference (CUDA runs: bf16)",
    )
    args = ap.parse_args()
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    q = args.quick
    models = args.models or (
        ["vit_base_patch16_224"] if q else ["vit_base_patch16_224", "swin_base_patch4_window7_224"]
    )
    batches = args.batches or ([8] if q else [8, 32])
    time_batches = args.time_batches if args.time_batches is not None else ([32] if q else [])
    sweep_batches = (
        args.sweep_batches if args.sweep_batches is not None else [] if q else [1, 2, 4, 8, 16, 32]
    )
    m_values = (
        args.m_values
        if args.m_values is not None
        else [1, 4, 7, 10, 12]
        if q
        else list(range(1, 13))
    )
    m_batch = args.m_batch or (8 if q else 32)
    reps = args.reps or (2 if q else 5)
    infer_reps = args.infer_reps or (3 if q else 15)
    devices = ["cpu"] if args.device == "cpu" else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "all":
        devices.insert(0, "cpu")
    if not devices:
        sys.exit("no device to run on (asked for CUDA without a GPU)")

    res = Results("e2e", device="cuda" if devices == ["cuda"] else "cpu")
    shape = f"{args.img}x{args.img}"
    checks: list[tuple[str, float, float, str]] = []  # (what, measured ratio, limit, "<=" / ">=")
    plots: dict = {}

    amp_name = str(amp).replace("torch.", "") if amp else "float32"

    def add(device, provider, mode, model, batch, value, unit, shp=shape, dtype=amp_name):
        row = res.add(
            provider,
            mode if device == "cpu" else f"{device}:{mode}",
            model,
            batch,
            dtype,
            shp,
            value,
            unit,
        )
        if device == "cuda":
            row["machine"] = torch.cuda.get_device_name()
        return row

    for device in devices:
        for name in models:
            vit = name.startswith("vit")
            steps: dict[tuple[str, int], dict] = {}
            # (a)-(d): the step table; (f): the batch sweep shares its points
            plan = [(p, b, True) for b in batches for p in args.providers]
            plan += [
                (p, b, True)
                for b in sweep_batches
                for p in args.sweep_providers
                if (p, b, True) not in plan
            ]
            plan += [
                (p, b, False)
                for b in time_batches
                for p in ("full", "lora", "dtl")
                if p in args.providers and (p, b, True) not in plan
            ]
            for provider, batch, profiled in plan:
                if provider == "lora" and not _has_peft():
                    print(
                        "peft is not installed: skipping lora "
                        "(pip install -r requirements-bench.txt)"
                    )
                    continue
                t0 = time.perf_counter()
                r = measure_step(
                    name, provider, batch, args.img, reps, device, profile=profiled, amp=amp
                )
                steps[provider, batch] = r
                print(
                    f"[{device} {short(name)} b={batch}] {provider:14s}"
                    f" saved {r['saved'] * MB:8.1f} MB"
                    f"  peak {mb(r['peak']):>8s} MB  step {r['time'][0]:9.1f} ms"
                    f"  trainable {r['trainable']:,}  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            for (provider, batch), r in steps.items():
                add(device, provider, "saved_bytes", name, batch, r["saved"] * MB, "MB")
                if r["peak"] is not None:
                    add(
                        device,
                        provider,
                        "cpu_peak" if device == "cpu" else "peak",
                        name,
                        batch,
                        r["peak"] * MB,
                        "MB",
                    )
                if r.get("peak_total") is not None:
                    add(device, provider, "peak_total", name, batch, r["peak_total"] * MB, "MB")
                add(device, provider, "step_time", name, batch, r["time"], "ms")
                add(device, provider, "trainable", name, batch, r["trainable"], "count")
                full, lora = steps.get(("full", batch)), steps.get(("lora", batch))
                if full:
                    add(
                        device,
                        provider,
                        "saved_x_full",
                        name,
                        batch,
                        r["saved"] / full["saved"],
                        "x",
                    )
                    if r["peak"] is not None and full["peak"]:
                        add(
                            device,
                            provider,
                            "peak_x_full",
                            name,
                            batch,
                            r["peak"] / full["peak"],
                            "x",
                        )
                    if r.get("peak_total") and full.get("peak_total"):
                        add(
                            device,
                            provider,
                            "peak_total_x_full",
                            name,
                            batch,
                            r["peak_total"] / full["peak_total"],
                            "x",
                        )
                    add(
                        device,
                        provider,
                        "step_x_full",
                        name,
                        batch,
                        r["time"][0] / full["time"][0],
                        "x",
                    )
                if lora:
                    add(
                        device,
                        provider,
                        "step_x_lora",
                        name,
                        batch,
                        r["time"][0] / lora["time"][0],
                        "x",
                    )
            plots[device, name] = steps
            print_step_table(device, name, steps)
            # targets (ViT-B/16): time at batch 32 (else the largest batch with both
            # providers); saved bytes at the largest batch with both (they are linear in it)
            if vit:
                tag = f"{device} {short(name)}"
                for what, p, ref, key, lim in [
                    ("DTL step time vs full", "dtl", "full", "time", 0.45),
                    ("DTL step time vs PEFT LoRA", "dtl", "lora", "time", 0.60),
                    ("DTL saved bytes vs full", "dtl", "full", "saved", 0.30),
                    ("DTL bf16 trunk saved bytes vs full", "dtl_bf16trunk", "full", "saved", 0.28),
                    ("DTL checkpoint_tail saved bytes vs full", "dtl_ckpt", "full", "saved", 0.08),
                ]:
                    both = [b for (q_, b) in steps if q_ == p and (ref, b) in steps]
                    if not both:
                        continue
                    b = 32 if key == "time" and 32 in both else max(both)
                    a, c = steps[p, b][key], steps[ref, b][key]
                    v = a[0] / c[0] if key == "time" else a / c
                    checks.append((f"[{tag}] {what} (b={b})", v, lim, "<="))
                # GPU memory (issue 9, the paper's Table 2): peak of a step, weights and
                # AdamW state included, as a fraction of full fine-tuning's
                for what, p, lim in [
                    ("DTL peak memory vs full", "dtl", 0.25),
                    ("DTL+ peak memory vs full", "dtl+", 0.26),
                    ("DTL checkpoint_tail peak memory vs full", "dtl_ckpt", 0.12),
                    ("DTL, bf16 frozen weights, peak memory vs full", "dtl_bf16w", 0.25),
                    (
                        "DTL checkpoint_tail + bf16 frozen weights peak vs full",
                        "dtl_bf16w_ckpt",
                        0.12,
                    ),
                ]:
                    both = [
                        b
                        for (q_, b) in steps
                        if q_ == p
                        and ("full", b) in steps
                        and steps[p, b].get("peak_total")
                        and steps["full", b].get("peak_total")
                    ]
                    if both:
                        b = 32 if 32 in both else max(both)
                        v = steps[p, b]["peak_total"] / steps["full", b]["peak_total"]
                        checks.append((f"[{tag}] {what} (b={b})", v, lim, "<="))

            # (e) inference throughput
            rates = {}
            for batch in args.infer_batches:
                for provider in ("timm", "dtl", "dtl+"):
                    rates[provider, batch] = r = measure_infer(
                        name,
                        provider,
                        batch,
                        args.img,
                        infer_reps,
                        device,
                        warmup=1 if q else 2,
                        amp=amp,
                    )
                    add(device, provider, "infer", name, batch, r, "img/s")
                for provider in ("dtl", "dtl+"):
                    x = rates[provider, batch][0] / rates["timm", batch][0]
                    add(device, provider, "infer_x_timm", name, batch, x, "x")
                t, d, dp = (rates[p, batch][0] for p in ("timm", "dtl", "dtl+"))
                print(
                    f"[{device} {short(name)} infer b={batch}] img/s: timm {t:.2f}"
                    f"  DTL {d:.2f} ({d / t:.3f}x)  DTL+ {dp:.2f} ({dp / t:.3f}x)",
                    flush=True,
                )
            if vit:
                for b, lim in [(16, 0.98), (1, 0.95)]:
                    if ("dtl", b) in rates:
                        v = rates["dtl", b][0] / rates["timm", b][0]
                        checks.append(
                            (
                                f"[{device} {short(name)}] DTL inference vs plain timm (b={b})",
                                v,
                                lim,
                                ">=",
                            )
                        )

            # (g) M sweep (ViT only: Fig. 4)
            if vit and m_values:
                msweep = {}
                default_m = plots[device, name].get(("dtl", m_batch))
                for m in m_values:
                    if m == 7 and default_m is not None and default_m["peak"] is not None:
                        r = default_m  # the step table's dtl (M = 7 is the default)
                    else:
                        r = measure_step(
                            name, "dtl", m_batch, args.img, reps, device, amp=amp, adapt_from=m
                        )
                    msweep[m] = r
                    shp = f"M={m}"
                    add(device, "dtl", "saved_bytes", name, m_batch, r["saved"] * MB, "MB", shp)
                    add(
                        device,
                        "dtl",
                        "cpu_peak" if device == "cpu" else "peak",
                        name,
                        m_batch,
                        r["peak"] * MB,
                        "MB",
                        shp,
                    )
                    add(device, "dtl", "step_time", name, m_batch, r["time"], "ms", shp)
                    print(
                        f"[{device} {short(name)} M={m:2d} b={m_batch}]"
                        f" saved {r['saved'] * MB:8.1f} MB"
                        f"  peak {mb(r['peak']):>8s} MB  step {r['time'][0]:9.1f} ms",
                        flush=True,
                    )
                plots[device, name, "M"] = (m_batch, msweep)

    res.write(args.out, directory=args.results_dir)
    if not args.no_plots:
        save_plots(plots, args.out, args.results_dir)
    print("\nTargets (ratios measured in this run):")
    for what, v, lim, op in checks:
        ok = v <= lim if op == "<=" else v >= lim
        print(f"  {'PASS' if ok else 'MISS'}  {what}: {v:.3f}x (target {op} {lim}x)")
    if not checks:
        print("  (none measured: the targets are for ViT-B/16 with full, lora and dtl providers)")


def mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes * MB:.1f}"


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def print_step_table(device: str, name: str, steps: dict) -> None:
    print(f"\n{device} {short(name)}: one training step (forward + backward + AdamW)")
    cols = ["saved MB", "x full", "peak MB", "x full", "step ms", "x full", "x lora"]
    widths = [9, 7, 9, 7, 9, 7, 7]
    print(
        f"{'provider':14s} {'batch':>5s} {'trainable':>11s} "
        + " ".join(f"{c:>{w}s}" for c, w in zip(cols, widths, strict=True))
    )
    for (provider, batch), r in steps.items():
        full, lora = steps.get(("full", batch)), steps.get(("lora", batch))

        def f(v):
            return f"{v:7.3f}" if v is not None else f"{'-':>7s}"

        saved_x = full and r["saved"] / full["saved"]
        peak_x = full and full["peak"] and r["peak"] and r["peak"] / full["peak"]
        time_x = full and r["time"][0] / full["time"][0]
        lora_x = lora and r["time"][0] / lora["time"][0]
        print(
            f"{provider:14s} {batch:5d} {r['trainable']:11,d} {r['saved'] * MB:9.1f} {f(saved_x)}"
            f" {mb(r['peak']):>9s} {f(peak_x)} {r['time'][0]:9.1f} {f(time_x)} {f(lora_x)}"
        )
    print()


def save_plots(plots: dict, stem: str, directory: Path = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    batch_panels = [(k, v) for k, v in plots.items() if len(k) == 2]
    if batch_panels:
        fig, axes = plt.subplots(
            len(batch_panels), 3, figsize=(15, 4 * len(batch_panels)), squeeze=False
        )
        for row, ((device, name), steps) in zip(axes, batch_panels, strict=True):
            providers = sorted(
                {p for p, _ in steps}, key=lambda p: PROVIDERS.index(p) if p in PROVIDERS else 99
            )
            for provider in providers:
                pts = sorted((b, r) for (p, b), r in steps.items() if p == provider)
                if not pts:
                    continue
                bs = [b for b, _ in pts]
                row[0].plot(bs, [r["saved"] * MB for _, r in pts], "o-", label=provider)
                pk = [(b, r["peak"] * MB) for b, r in pts if r["peak"] is not None]
                if pk:
                    row[1].plot([b for b, _ in pk], [v for _, v in pk], "o-", label=provider)
                row[2].plot(bs, [r["time"][0] / 1e3 for _, r in pts], "o-", label=provider)
            for ax, title in zip(
                row,
                [
                    "saved for backward (MB)",
                    "peak allocator memory of a step (MB)",
                    "step time (s)",
                ],
                strict=True,
            ):
                ax.set_title(f"{short(name)} {device}: {title}", fontsize=9)
                ax.set_xlabel("batch")
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
            row[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / f"{stem}_batch.png", dpi=110)
        plt.close(fig)
    m_panels = [(k, v) for k, v in plots.items() if len(k) == 3]
    if m_panels:
        fig, axes = plt.subplots(len(m_panels), 2, figsize=(10, 4 * len(m_panels)), squeeze=False)
        for row, ((device, name, _), (b, sweep)) in zip(axes, m_panels, strict=True):
            ms = sorted(sweep)
            row[0].plot(ms, [sweep[m]["saved"] * MB for m in ms], "o-", label="saved for backward")
            row[0].plot(ms, [sweep[m]["peak"] * MB for m in ms], "s-", label="CPU peak of a step")
            row[1].plot(ms, [sweep[m]["time"][0] / 1e3 for m in ms], "o-")
            row[0].set_ylabel("MB")
            row[1].set_ylabel("step time (s)")
            row[0].legend(fontsize=8)
            for ax in row:
                ax.set_xlabel("M (first adapted block)")
                ax.set_title(f"{short(name)} DTL, batch {b}, {device}", fontsize=9)
                ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / f"{stem}_m_sweep.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
