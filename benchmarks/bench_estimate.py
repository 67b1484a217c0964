"""Will it fit? ``estimate_memory`` checked against real steps, then used where no machine
here could run the step.

1. ``check``: ViT-S/16, ViT-B/16, Swin-T and EfficientNet-Lite0 at 224 px, batch 8 and 16,
   DTL+ and full fine-tuning: the prediction beside two real AdamW steps on this CPU, in a
   child process each: their peak live tensor bytes (what the estimator models, as CUDA's
   ``max_memory_allocated`` does) and the growth of the process's resident set (everything:
   allocator slack, oneDNN buffers, threads). → ``estimate_check.csv``
2. ``table``: ViT-B/16 and ViT-L/16, batch 32, 224 px, bf16 autocast: parameters, gradients,
   AdamW state and activations at the peak, for full fine-tuning, LoRA r=8, DTL+, DTL+ with
   bf16 frozen weights, and that with ``checkpoint_tail``; and the moonshot, ViT-g/14
   (``vit_giant_patch14_dinov2``, 1.1 B parameters, random weights) with DTL+, bf16 frozen
   weights and ``checkpoint_tail``. → ``estimate_table.csv``

3. ``giants`` (issue 21): the three giants (``dtl_kernels.models.giants``: ViT-g/14 at 224
   px, Perception Encoder G/14 at 448 px, the ViT-22B shape at 224 px) built on the meta
   device (no memory), batch 8 and 32, bf16 autocast: full fine-tuning, LoRA r=8 (float32
   and bf16 frozen weights) and DTL+ with bf16 frozen weights and ``checkpoint_tail``, and
   whether each fits a 24 GB, 80 GB and 141 GB GPU. → ``estimate_giants.csv``

4. ``fit`` (the GPU check's stage): the prediction beside ``torch.cuda.max_memory_allocated``
   of two real bf16-autocast steps on the GPU, for ViT-B/16 (full, DTL+), ViT-L/16 (DTL+,
   bf16 weights, ``checkpoint_tail``) and the ViT-g/14 moonshot, batch 32, 224 px.
   → ``estimate_gpu.csv`` in ``--out``. ``--dry-run``: a tiny ViT on the CPU.
5. ``fit-giant NAME`` (the GPU check's stage, one process per giant; ``bench_fit_giant.py``):
   built in bf16 straight on the GPU, the prediction beside the measured peak, step time,
   build time and host memory. → ``fit_giants.csv`` in ``--out``.

The big backbones of ``table`` and ``fit`` are built on the meta device and given
uninitialised memory (``to_empty``): the estimator reads shapes only. Run:
``python benchmarks/bench_estimate.py [check] [table] [giants] [fit [--dry-run] [--out DIR]]``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, env_columns  # noqa: E402

from dtl_kernels._io import atomic_write  # noqa: E402

CHECK = [
    ("vit_small_patch16_224", "dtl+"), ("vit_small_patch16_224", "full"),
    ("vit_base_patch16_224", "dtl+"), ("vit_base_patch16_224", "full"),
    ("swin_tiny_patch4_window7_224", "dtl+"), ("swin_tiny_patch4_window7_224", "full"),
    ("tf_efficientnet_lite0", "dtl+"), ("tf_efficientnet_lite0", "full"),
]  # fmt: skip

CHILD = """
import json, sys, torch
import torch.nn.functional as F
from dtl_kernels import create_model, estimate_memory
from dtl_kernels.estimate import _LiveBytes
name, method, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = create_model(name, method, num_classes=10)
est = estimate_memory(model, batch, 224)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                        foreach=True)
x, y = torch.randn(batch, 3, 224, 224), torch.zeros(batch, dtype=torch.long)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
live = _LiveBytes(list(model.parameters()) + list(model.buffers()) + [x])
with live:
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); del loss
print(json.dumps(dict(estimate=est.training_peak, live=live.peak,
                      rss=status("VmHWM") - base)))
"""


def check(results: Path) -> None:
    rows = []
    for name, method in CHECK:
        for batch in (8, 16):
            r = _child(name, method, batch, {})
            # glibc returns freed blocks above a fixed 64 KiB at once (its default threshold
            # grows and then keeps freed activations resident)
            rss64 = _child(name, method, batch, {"MALLOC_MMAP_THRESHOLD_": "65536"})["rss"]
            row = dict(model=name, method=method, batch=batch,
                       estimate_mib=round(r["estimate"] / 2**20, 1),
                       live_mib=round(r["live"] / 2**20, 1), rss_mib=round(r["rss"] / 2**20, 1),
                       rss_mmap64k_mib=round(rss64 / 2**20, 1),
                       estimate_over_live=round(r["estimate"] / r["live"], 4),
                       estimate_over_rss=round(r["estimate"] / r["rss"], 3),
                       estimate_over_rss_mmap64k=round(r["estimate"] / rss64, 3))  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    _write(results / "estimate_check.csv", rows)


def _child(name: str, method: str, batch: int, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name, method, str(batch)], capture_output=True, text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", **env),
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _backbone(name: str, device: str = "cpu", **kw):
    """A timm backbone with uninitialised weights (built on meta, then given memory)."""
    import timm
    import torch

    with torch.device("meta"):
        bb = timm.create_model(name, num_classes=0, **kw)
    return bb.to_empty(device=device)


TABLE = [  # (label, create_model method, options)
    ("full fine-tuning", "full", {}),
    ("LoRA r=8", "lora", {}),
    ("DTL+", "dtl+", {}),
    ("DTL+, bf16 frozen weights", "dtl+", {"backbone_dtype": "bf16"}),
    ("DTL+, bf16 weights, checkpoint_tail", "dtl+", {"backbone_dtype": "bf16",
                                                     "checkpoint_tail": True}),
]  # fmt: skip


def table(results: Path) -> None:
    import torch

    from dtl_kernels import create_model, estimate_memory

    rows = []
    plan = [("vit_base_patch16_224", {}, TABLE), ("vit_large_patch16_224", {}, TABLE),
            ("vit_giant_patch14_dinov2", {"img_size": 224}, [TABLE[0], TABLE[4]])]  # fmt: skip
    for name, kw, configs in plan:
        for label, method, options in configs:
            opts = dict(options)
            if opts.get("backbone_dtype") == "bf16":
                opts["backbone_dtype"] = torch.bfloat16
            model = create_model(_backbone(name, **kw), method, num_classes=100, **opts)
            est = estimate_memory(model, 32, 224, "bf16")
            gib = {
                "parameters_gib": est.parameters, "gradients_gib": est.gradients,
                "optimizer_gib": est.optimizer_state, "activations_gib": est.activations,
                "peak_gib": est.peak,
            }  # fmt: skip
            row = dict(model=name, config=label, batch=32, image=224, precision="bf16 autocast",
                       **{k: v / 2**30 for k, v in gib.items()})  # fmt: skip
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            print(rows[-1], flush=True)
            del model
    _write(results / "estimate_table.csv", rows)


GIANT_CONFIGS = [  # (label, create_model method, options)
    ("full fine-tuning", "full", {}),
    ("LoRA r=8", "lora", {}),
    ("LoRA r=8, bf16 frozen weights", "lora", {"backbone_dtype": "bf16"}),
    ("DTL+, bf16 weights, checkpoint_tail", "dtl+", {"backbone_dtype": "bf16",
                                                     "checkpoint_tail": True}),
]  # fmt: skip
GPUS_GB = (24, 80, 141)
# what the estimator does not count (CUDA context, library workspaces, allocator slack)
# is left room for: a prediction fits an N GB card when it is within 90 % of N·10⁹ bytes
FIT_SHARE = 0.9


def giants(results: Path) -> None:
    """Predicted peaks of the giants (built on the meta device: shapes only)."""
    import torch

    from dtl_kernels import create_model, estimate_memory
    from dtl_kernels.models.giants import GIANTS

    rows = []
    for name, kw in GIANTS.items():
        for label, method, options in GIANT_CONFIGS:
            opts = {k: (torch.bfloat16 if v == "bf16" else v) for k, v in options.items()}
            model = create_model(name, method, num_classes=100, device="meta", **kw, **opts)
            size, billions = model.native_input_size()[1], round(model.num_parameters() / 1e9, 3)
            for batch in (8, 32):
                est = estimate_memory(model, batch, size, "bf16")
                row = dict(model=name, config=label, batch=batch, image=size,
                           precision="bf16 autocast", parameters_b=billions,
                           weights_gib=est.parameters / 2**30, gradients_gib=est.gradients / 2**30,
                           optimizer_gib=est.optimizer_state / 2**30,
                           activations_gib=est.activations / 2**30, peak_gib=est.peak / 2**30,
                           **{f"fits_{gb}gb": est.peak <= FIT_SHARE * gb * 1e9 for gb in GPUS_GB},
                           simulated_on="cpu")  # fmt: skip
                rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
                print(rows[-1], flush=True)
            del model
    _write(results / "estimate_giants.csv", rows)


FIT = [  # (model, timm options, method, create_model options)
    ("vit_base_patch16_224", {}, "full", {}),
    ("vit_base_patch16_224", {}, "dtl+", {}),
    ("vit_large_patch16_224", {}, "dtl+", {"backbone_dtype": "bf16", "checkpoint_tail": True}),
    ("vit_giant_patch14_dinov2", {"img_size": 224}, "dtl+",
     {"backbone_dtype": "bf16", "checkpoint_tail": True}),
]  # fmt: skip


_MEASURED_BY = {"cuda": "cuda.max_memory_allocated", "cpu": "live tensor bytes"}


def fit(out: Path, dry_run: bool) -> None:
    """Predicted vs measured peak of two real bf16 steps on the GPU (CPU tiny in a dry run)."""
    import torch
    import torch.nn.functional as F

    from dtl_kernels import create_model, estimate_memory
    from dtl_kernels.estimate import _LiveBytes

    device, batch, size = ("cpu", 2, 64) if dry_run else ("cuda", 32, 224)
    plan = [("vit_tiny_patch16_224", {"img_size": 64}, "dtl+", {})] if dry_run else FIT
    rows = []
    for name, kw, method, options in plan:
        opts = {k: (torch.bfloat16 if v == "bf16" else v) for k, v in options.items()}
        model = create_model(_backbone(name, device, **kw), method, num_classes=100, **opts)
        model = model.to(device).train()
        est = estimate_memory(model, batch, size, "bf16")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        tracker = _LiveBytes(list(model.parameters()) + list(model.buffers()) + [x])
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with tracker:
            for _ in range(2):
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
        measured = tracker.peak
        if device == "cuda":
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - base
        row = dict(model=name, method=method, options=str(options), batch=batch, image=size,
                   estimate_gib=round(est.training_peak / 2**30, 4),
                   live_gib=round(tracker.peak / 2**30, 4),
                   measured_gib=round(measured / 2**30, 4),
                   parameters_gib=round(est.parameters / 2**30, 4),
                   estimate_over_measured=round(est.training_peak / max(measured, 1), 4),
                   peak_gib=round((est.parameters + measured) / 2**30, 4),
                   measured_by=_MEASURED_BY[device])  # fmt: skip
        rows.append(row)
        print(row, flush=True)
        del model, opt, x, y
        if device == "cuda":
            torch.cuda.empty_cache()
    _write(out / "estimate_gpu.csv", rows, device)


# issue 21, item 4: (giant, batch, goal for the whole peak in GB); DTL+, bf16 frozen
# weights, checkpoint_tail, bf16 autocast, each at its GIANTS input size
FIT_GIANTS = [
    ("vit_giant_patch14_dinov2", 32, 8),
    ("vit_pe_core_gigantic_patch14_448", 32, 24),
    ("vit_22b_patch14_224", 8, 80),
]
STAND_IN = ("vit_tiny_patch16_224", {"img_size": 32}, 2)  # --dry-run: the same path, tiny
TIMED_STEPS = {"cuda": 10, "cpu": 2}


def fit_giant(out: Path, name: str, dry_run: bool, tag: str = "0") -> None:
    """One giant in this process (its host memory is this process's): built with random
    weights in bf16 straight on the GPU (build time, host memory), the prediction beside
    the measured peak of two real steps, then the median time of more steps.
    → ``fit_giant_<tag>.csv`` (``gpu_check.py`` merges them into ``fit_giants.csv``)."""
    import time

    import torch
    import torch.nn.functional as F

    from dtl_kernels import create_model, estimate_memory
    from dtl_kernels.estimate import _LiveBytes
    from dtl_kernels.models.giants import GIANTS
    from dtl_kernels.optim import adamw

    batch, goal_gb = next((b, g) for n, b, g in FIT_GIANTS if n == name)
    device, arch, kw = ("cpu", *STAND_IN[:2]) if dry_run else ("cuda", name, GIANTS[name])
    batch = STAND_IN[2] if dry_run else batch
    options = dict(num_classes=100, backbone_dtype=torch.bfloat16, checkpoint_tail=True, **kw)
    if device == "cuda":  # the CUDA context's host memory is not the build's
        torch.zeros(1, device=device)
    host0 = _host_memory(reset_peak=True)
    t0 = time.perf_counter()
    model = create_model(arch, "dtl+", device=device, **options).train()
    _sync(device)
    build_s = time.perf_counter() - t0
    host = {k: v - host0[k] for k, v in _host_memory().items()}
    size = model.native_input_size()[1]
    est = estimate_memory(model, batch, size, "bf16")  # simulated with this device's kernels
    meta = create_model(arch, "dtl+", device="meta", **options)
    est_cpu = estimate_memory(meta, batch, size, "bf16", device="cpu")  # as RESULTS.md's table
    del meta
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tracker = _LiveBytes(list(model.parameters()) + list(model.buffers()) + [x])
    weights = torch.cuda.memory_allocated() if device == "cuda" else est.parameters
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tracker:
        for _ in range(2):
            step()
    _sync(device)
    measured = tracker.peak
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated() - weights
    times = []
    for _ in range(TIMED_STEPS[device]):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = weights + measured
    row = dict(model=name, run_as=arch, method="dtl+ bf16 weights checkpoint_tail", batch=batch,
               image=size, parameters_b=round(model.num_parameters() / 1e9, 3),
               build_s=round(build_s, 2), host_rss_growth_gib=round(host["rss"] / 2**30, 3),
               host_peak_growth_gib=round(host["hwm"] / 2**30, 3),
               host_anon_growth_gib=round(host["anon"] / 2**30, 3),
               weights_gib=round(weights / 2**30, 3),
               estimate_gib=round(est.training_peak / 2**30, 4),
               estimate_cpu_gib=round(est_cpu.training_peak / 2**30, 4),
               measured_gib=round(measured / 2**30, 4),
               estimate_over_measured=round(est.training_peak / max(measured, 1), 4),
               estimate_cpu_over_measured=round(est_cpu.training_peak / max(measured, 1), 4),
               peak_gb=round(peak / 1e9, 3), goal_gb=goal_gb, meets_goal=peak <= goal_gb * 1e9,
               step_ms_median=round(1e3 * sorted(times)[len(times) // 2], 2),
               timed_steps=len(times), measured_by=_MEASURED_BY[device])  # fmt: skip
    print(row, flush=True)
    _write(out / f"fit_giant_{tag}.csv", [row], device)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _host_memory(reset_peak: bool = False) -> dict[str, int]:
    """This process's resident bytes now (``rss``, anonymous ``anon``) and at its peak
    (``hwm``; ``reset_peak`` restarts the peak at the current size: Linux ``clear_refs``)."""
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    fields = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "anon"}
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in fields:
                found[fields[key]] = int(line.split()[1]) * 1024
    return found


def _write(path: Path, rows: list[dict], device: str = "cpu") -> None:
    env = env_columns(device)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
            w.writeheader()
            w.writerows({**r, **env} for r in rows)

    atomic_write(path, write)
    print(f"-> {path}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("parts", nargs="*", default=["check", "table"],
                    choices=["check", "table", "giants", "fit", "fit-giant"])  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--model", choices=[n for n, _, _ in FIT_GIANTS], help="for fit-giant")
    ap.add_argument("--tag", default="0", help="fit-giant writes fit_giant_<tag>.csv")
    args = ap.parse_args()
    if "fit-giant" in args.parts:
        if args.model is None:
            ap.error("fit-giant needs --model")
        fit_giant(args.out, args.model, args.dry_run, args.tag)
    if "check" in args.parts:
        check(args.out)
    if "table" in args.parts:
        table(args.out)
    if "giants" in args.parts:
        giants(args.out)
    if "fit" in args.parts:
        fit(args.out, args.dry_run)
