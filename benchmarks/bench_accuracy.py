"""Accuracy study: linear probe, PEFT LoRA, DTL, DTL+ and full fine-tuning on real
pretrained backbones and real data, with learning rates chosen on a validation split and
several seeds on the test split (``make bench-accuracy``; ``--quick`` for ``make bench``).

Protocol, per backbone × dataset × method (each run is ``python -m dtl_kernels.train`` in
its own process, so its peak memory is its own):

1. **select**: for every learning rate of the method's grid, train with ``--val-split``
   (training samples held out, the same for every run) and seed 0; keep the learning rate
   with the best validation accuracy. The test split is not looked at.
2. **test**: with that learning rate, train on the whole training split with seeds
   0 … S−1 and evaluate on the test split: mean ± sample std of the accuracy, the peak
   memory of training (CPU: resident-set growth, see ``dtl_kernels.train.metrics``), the
   training throughput and the wall time.

Every run has ``--cache-trunk off``, so the peak memory is that of training itself (the
trunk cache would hold the frozen blocks' outputs in RAM, outside the measured loop).

Runs are resumable: a run whose ``summary.json`` exists is read, not repeated, so an
interrupted study continues where it stopped (``--out`` keeps the run folders).

Outputs (``--results``, default ``benchmarks/results/``): ``accuracy_runs.csv`` (every
run), ``accuracy.csv`` (per method: mean, std, n, chosen lr, peak memory, time),
``accuracy.md`` (the table) and ``accuracy.png`` (accuracy vs peak memory, error bars).

Backbones: ``dinov2`` = DINOv2 ViT-S/14 (``vit_small_patch14_dinov2`` with the offline
weights ``dinov2-vits14-imgfocus``), ``lite0`` = ImageNet EfficientNet-Lite0 (LoRA has no
``qkv`` layers to adapt there and is left out). Datasets: ``elpv`` (solar cells, 4 classes,
the package's train / test split) and ``fashion-mnist`` (VTAB-1k style: 1000 training
samples, 200 of them the validation split, the official 10 000 test images; needs the
Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, env_columns  # noqa: E402

from dtl_kernels._io import atomic_write  # noqa: E402

BACKBONES = {
    "dinov2": dict(
        model="vit_small_patch14_dinov2", pretrained="dinov2-vits14-imgfocus", img_size=112
    ),
    "lite0": dict(model="tf_efficientnet_lite0", pretrained="efficientnet-lite0", img_size=128),
}
DATASETS = {
    "elpv": dict(dataset="elpv", val_split=400),
    "fashion-mnist": dict(dataset="fashion-mnist", max_train=1000, val_split=200),
}
METHODS = ("linear", "lora", "dtl", "dtl+", "full")
# AdamW learning rates: a new head / side network / low-rank factors take large steps, the
# whole backbone small ones
LR_GRID = {
    "linear": (3e-3, 1e-2),
    "lora": (1e-3, 3e-3),
    "dtl": (3e-3, 1e-2),
    "dtl+": (3e-3, 1e-2),
    "full": (1e-4, 3e-4),
}
COLORS = {"linear": "C0", "lora": "C1", "dtl": "C2", "dtl+": "C3", "full": "C4"}  # every panel
QUICK_LR = {"linear": 1e-2, "lora": 1e-3, "dtl": 3e-3, "dtl+": 3e-3, "full": 1e-4}
RUN_FIELDS = [
    "backbone", "dataset", "method", "phase", "lr", "seed", "acc", "evaluated_on",
    "trainable_params", "peak_memory_mib", "images_per_s", "wall_s", "epochs", "img_size",
    "batch_size", "train_images", "eval_images", "precision", "device", "peak_memory_method",
    "torch_threads",
]  # fmt: skip


def run_tag(args) -> str:
    """What sets this study apart from the default one (3 epochs, whole splits, fp32), in
    the run folders' names: a quick study never reuses a full study's runs."""
    tag = "" if args.epochs == 3 else f"-e{args.epochs}"
    tag += f"-n{args.max_train}" if args.max_train else ""
    return tag + ("" if args.precision == "fp32" else f"-{args.precision}")


def _reusable(summary_path: Path, args, opts: dict) -> bool:
    """An earlier run of exactly this configuration (else it runs again)."""
    if not summary_path.is_file():
        return False
    s = json.loads(summary_path.read_text())
    same = (s["epochs"], s["precision"], s["img_size"]) == (
        args.epochs,
        args.precision,
        opts["img_size"],
    )
    return same and s.get("evaluated_on", "test").startswith("val") == ("val_split" in opts)


def run_one(args, backbone: str, dataset: str, method: str, phase: str, lr: float, seed: int):
    """One dtl-train run (or its earlier result); returns its row."""
    name = f"{phase}-lr{lr:g}-s{seed}{run_tag(args)}"
    folder = args.out / backbone / dataset / method.replace("+", "plus") / name
    summary_path = folder / "summary.json"
    opts = {**BACKBONES[backbone], **DATASETS[dataset]}
    if phase == "test":
        opts.pop("val_split")
    if args.max_train:
        opts["max_train"] = min(args.max_train, opts.get("max_train", args.max_train))
        if "val_split" in opts:  # a capped split keeps 4/5 of itself for training
            opts["val_split"] = max(1, min(opts["val_split"], opts["max_train"] // 5))
    if not _reusable(summary_path, args, opts):
        if args.reuse_only:
            return None
        cmd = [sys.executable, "-m", "dtl_kernels.train", "--method", method, "--lr", f"{lr:g}",
               "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", "32",
               "--warmup-epochs", "1", "--precision", args.precision, "--output", str(folder),
               "--cache-trunk", "off", "--overwrite", "--no-progress"]  # fmt: skip
        for key, value in opts.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}")
    s = json.loads(summary_path.read_text())
    print(
        f"  {backbone} {dataset} {method} {phase} lr {lr:g} seed {seed}: "
        f"{100 * s['test_acc']:.2f}% on {s.get('evaluated_on', 'test')}",
        flush=True,
    )
    return {
        "backbone": backbone, "dataset": dataset, "method": method, "phase": phase, "lr": lr,
        "seed": seed, "acc": round(100 * s["test_acc"], 2),
        "evaluated_on": s.get("evaluated_on", "test"),
        "trainable_params": s["trainable_params"],
        "peak_memory_mib": round(s["peak_memory_bytes"] / 2**20, 1),
        "images_per_s": round(s["images_per_s"], 1),
        "wall_s": round(s["wall_time_s"], 1),
        "epochs": s["epochs"], "img_size": s["img_size"], "batch_size": s["batch_size"],
        "train_images": s["train_images"], "eval_images": s["test_images"],
        "precision": s.get("precision", ""),
        "device": s.get("device", ""),
        "peak_memory_method": s.get("peak_memory_method", ""),
        "torch_threads": s.get("torch_threads", ""),
    }  # fmt: skip


def available(dataset: str) -> bool:
    if dataset != "fashion-mnist":
        return True
    from dtl_kernels.train.data import DataError, fashion_mnist_dir

    try:
        fashion_mnist_dir()
    except DataError as exc:
        print(f"skipping fashion-mnist: {exc}")
        return False
    return True


def study(args) -> list[dict]:
    rows = []
    for backbone in args.backbones:
        for dataset in filter(available, args.datasets):
            for method in args.methods:
                if method == "lora" and backbone == "lite0":
                    continue  # no qkv layers in a CNN
                grid = args.lrs.get(method, LR_GRID[method])
                if args.quick:
                    best = QUICK_LR[method]
                elif len(grid) == 1:  # nothing to choose: no validation run
                    best = grid[0]
                else:
                    picks = [
                        run_one(args, backbone, dataset, method, "select", lr, 0) for lr in grid
                    ]
                    picks = [p for p in picks if p is not None]
                    if not picks:
                        continue  # --reuse-only and nothing run yet
                    rows += picks
                    best = max(picks, key=lambda r: (r["acc"], -r["lr"]))["lr"]
                for seed in range(args.seeds):
                    row = run_one(args, backbone, dataset, method, "test", best, seed)
                    if row is not None:
                        rows.append(row)
                        write_runs(args, rows)
    return rows


def stem(args) -> str:
    """Output file names: ``accuracy`` for the fp32 study, ``accuracy_bf16`` for bf16."""
    return "accuracy" if args.precision == "fp32" else f"accuracy_{args.precision}"


def _write_csv(path: Path, fields: list[str], rows: list[dict], env: dict) -> None:
    fields = list(dict.fromkeys(fields))  # a run's own column wins over the same env column

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows({**r, **env} for r in rows)

    atomic_write(path, write)  # a crash leaves the previous file whole


def _device(rows: list[dict]) -> str:
    """Where the runs trained ("cpu" / "cuda"): dtl-train picks CUDA when it is there."""
    return next((r["device"] for r in rows if r.get("device")), "cpu")


def write_runs(args, rows: list[dict]) -> None:
    env = env_columns(_device(rows))
    _write_csv(args.results / f"{stem(args)}_runs.csv", RUN_FIELDS + list(env), rows, env)


def aggregate(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["backbone"], r["dataset"], r["method"]) for r in rows)
    for backbone, dataset, method in keys:
        mine = [
            r
            for r in rows
            if (r["backbone"], r["dataset"], r["method"]) == (backbone, dataset, method)
        ]
        tests = [r for r in mine if r["phase"] == "test"]
        if not tests:
            continue
        accs = [r["acc"] for r in tests]
        sel = {r["lr"]: r["acc"] for r in mine if r["phase"] == "select"}
        out.append(
            dict(
                backbone=backbone, dataset=dataset, method=method,
                acc_mean=round(statistics.mean(accs), 2),
                acc_std=round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
                seeds=len(accs), lr=tests[0]["lr"],
                val_acc_by_lr=" ".join(f"{lr:g}:{a}" for lr, a in sel.items()),
                trainable_params=tests[0]["trainable_params"],
                peak_memory_mib=round(statistics.median(r["peak_memory_mib"] for r in tests), 1),
                images_per_s=round(statistics.median(r["images_per_s"] for r in tests), 1),
                threads="/".join(sorted({str(r.get("torch_threads", "")) for r in tests})),
                wall_s=round(statistics.median(float(r["wall_s"] or 0) for r in tests), 1),
            )
        )  # fmt: skip
    return out


def write_tables(args, summary: list[dict], device: str = "cpu") -> None:
    env = env_columns(device)
    _write_csv(args.results / f"{stem(args)}.csv", list(summary[0]) + list(env), summary, env)
    lines = [
        f"Accuracy study ({'quick' if args.quick else 'full'}; {args.epochs} epochs, batch 32, "
        f"{args.precision}; {env['device']}; torch {env['torch']}; {env['date']}; "
        f"rev {env['git_rev']})",
        "",
        "| backbone | dataset | method | test acc % (mean ± std, n) | lr (val acc % per lr) "
        "| trainable | peak MiB | img/s | wall s | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['method']} | {r['acc_mean']:.2f} ± "
            f"{r['acc_std']:.2f} ({r['seeds']}) | {r['lr']:g} ({r['val_acc_by_lr'] or '-'}) | "
            f"{r['trainable_params']:,} | {r['peak_memory_mib']:.0f} | {r['images_per_s']:.0f} | "
            f"{r['wall_s']:.0f} | {r['threads']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.results / f"{stem(args)}.md", lambda tmp: Path(tmp).write_text(text))


def plot(args, summary: list[dict], device: str = "cpu") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    groups = dict.fromkeys((r["backbone"], r["dataset"]) for r in summary)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (backbone, dataset) in zip(axes[0], groups, strict=True):
        for r in (r for r in summary if (r["backbone"], r["dataset"]) == (backbone, dataset)):
            ax.errorbar(
                r["peak_memory_mib"], r["acc_mean"], yerr=r["acc_std"], fmt="o", capsize=4,
                label=r["method"], color=COLORS[r["method"]],
            )  # fmt: skip
            ax.annotate(r["method"], (r["peak_memory_mib"], r["acc_mean"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set_xlabel(f"peak training memory (MiB, {device})")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{backbone} on {dataset}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.results / f"{stem(args)}.png", dpi=120)
    print(f"plot -> {args.results / f'{stem(args)}.png'}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="dinov2 on elpv, 1 seed, no lr search")
    ap.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=None)
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--seeds", type=int, default=None, help="test runs per method (default 3)")
    ap.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 2)")
    ap.add_argument("--max-train", type=int, default=None, help="cap the training split")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument(
        "--lrs",
        nargs="*",
        default=[],
        metavar="METHOD=LR,LR",
        help="replace a method's learning-rate grid, e.g. full=1e-4",
    )
    ap.add_argument(
        "--reuse-only", action="store_true", help="tables from earlier runs only; run nothing"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="run folders")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        args.lrs = {
            m: tuple(float(v) for v in lrs.split(","))
            for m, lrs in (item.split("=", 1) for item in args.lrs)
        }
    except ValueError:
        ap.error("--lrs takes METHOD=LR[,LR…], e.g. full=1e-4")
    args.backbones = args.backbones or (["dinov2"] if args.quick else list(BACKBONES))
    args.datasets = args.datasets or (["elpv"] if args.quick else list(DATASETS))
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (2 if args.quick else 3)
    if args.quick and args.max_train is None:
        args.max_train = 800
    args.results.mkdir(parents=True, exist_ok=True)
    rows = study(args)
    summary = aggregate(rows)
    if not summary:
        print("no test runs")
        return 1
    write_runs(args, rows)
    write_tables(args, summary, _device(rows))
    plot(args, summary, _device(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
