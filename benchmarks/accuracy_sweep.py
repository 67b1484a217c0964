"""Epoch sweep of the accuracy study: does the gap between LoRA and DTL close, hold or grow
with a longer schedule? (``make bench-accuracy-sweep``)

DTL, DTL+ (k = 3) and PEFT LoRA (r = 8) on DINOv2 ViT-S/14, one seed, each at the learning
rate the 3-epoch study chose for it, trained for each of ``--epochs`` (10 % warm-up, cosine),
with a 1,000-image training cap, evaluated once at the end on the test split. The epoch count
decides no comparison between methods, only the schedule of the main study (the point where
every method has stopped improving), so the test split is what it is measured on.

Outputs (``--results``): ``accuracy_sweep_runs.csv``, ``accuracy_sweep.md`` and
``accuracy_sweep.png`` (accuracy vs epochs, one line per method and one panel per dataset).
Run folders go to ``--out`` and are reused when an identical run finished before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy_runs import PROVENANCE, Run, execute, run_provenance  # noqa: E402
from accuracy_tables import COLORS, write_csv, write_text  # noqa: E402
from common import RESULTS  # noqa: E402

# The 3-epoch study's choices (benchmarks/results/accuracy*.csv, validation split).
BEST_LR = {
    ("elpv", "dtl"): 1e-2, ("elpv", "dtl+"): 3e-3, ("elpv", "lora"): 3e-3,
    ("fashion-mnist", "dtl"): 1e-2, ("fashion-mnist", "dtl+"): 1e-2,
    ("fashion-mnist", "lora"): 3e-3,
}  # fmt: skip
FIELDS = ["dataset", "variant", "epochs", "lr", "seed", "acc", "test_loss", "trainable_params",
          "peak_memory_mib", "images_per_s", "wall_s", "train_images", "eval_images",
          "torch_threads", *PROVENANCE]  # fmt: skip


def sweep(args) -> list[dict]:
    rows = []
    for dataset in args.datasets:
        for variant in args.variants:
            for epochs in args.epochs:
                run = Run("dinov2", dataset, variant, "sweep", BEST_LR[dataset, variant], 0,
                          epochs, max_train=args.max_train)  # fmt: skip
                s = execute(run, args.out, args.reuse_only)
                if s is None or s.get("diverged"):
                    continue  # not run yet (--reuse-only), or diverged: no accuracy
                rows.append(dict(
                    dataset=dataset, variant=variant, epochs=epochs, lr=run.lr, seed=0,
                    acc=round(100 * s["test_acc"], 2), test_loss=s.get("test_loss"),
                    trainable_params=s["trainable_params"],
                    peak_memory_mib=round(s["peak_memory_bytes"] / 2**20, 1),
                    images_per_s=round(s["images_per_s"], 1), wall_s=round(s["wall_time_s"], 1),
                    train_images=s["train_images"], eval_images=s["test_images"],
                    torch_threads=s.get("torch_threads", ""),
                    # where, when and at which revision this run trained (not this report)
                    **run_provenance(run.folder(args.out), s),
                ))  # fmt: skip
                print(f"  {dataset} {variant} {epochs} epochs: {rows[-1]['acc']:.2f}%", flush=True)
                write_csv(args.results / "accuracy_sweep_runs.csv", FIELDS, rows, {})
    return rows


def table(rows: list[dict]) -> str:
    epochs = sorted({r["epochs"] for r in rows})
    lines = [
        "Epoch sweep: test accuracy % (one seed, 1,000 training images, 10 % warm-up, bf16)",
        "",
        "| dataset | method | lr | " + " | ".join(f"{e} ep" for e in epochs) + " |",
        "|---|---|---|" + "---|" * len(epochs),
    ]
    for dataset, variant in dict.fromkeys((r["dataset"], r["variant"]) for r in rows):
        mine = {r["epochs"]: r for r in rows if (r["dataset"], r["variant"]) == (dataset, variant)}
        cells = [f"{mine[e]['acc']:.2f}" if e in mine else "–" for e in epochs]
        lr = next(iter(mine.values()))["lr"]
        lines.append(f"| {dataset} | {variant} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["dataset"] == dataset):
            pts = sorted(
                (r["epochs"], r["acc"])
                for r in rows
                if (r["dataset"], r["variant"]) == (dataset, variant)
            )
            ax.plot(*zip(*pts, strict=True), "o-", label=variant, color=COLORS[variant])
        ax.set_xscale("log")
        ticks = sorted({r["epochs"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epochs (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"DINOv2 ViT-S/14 on {dataset}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--datasets", nargs="+", default=["fashion-mnist", "elpv"])
    ap.add_argument("--variants", nargs="+", default=["dtl", "dtl+", "lora"])
    ap.add_argument("--epochs", nargs="+", type=int, default=[3, 10, 30])
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--reuse-only", action="store_true", help="tables from earlier runs only")
    ap.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="run folders")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    rows = sweep(args)
    if not rows:
        print("no runs")
        return 1
    text = table(rows)
    print(text)
    write_text(args.results / "accuracy_sweep.md", text)
    plot(rows, args.results / "accuracy_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
