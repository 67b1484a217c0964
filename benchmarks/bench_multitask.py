"""Feature reuse (SPEC §3): 19 DTL+ tasks on one ViT-B/16, ``MultiTaskDTL`` vs the 19 task
models run one after another.

Every task is a ``DTLViT`` on the same frozen backbone (random weights) with M = 7, DTL+
k = 3 and non-zero ``B`` (N(0, 0.02)), its own head. Latency of one eval forward of all
tasks under ``torch.no_grad`` (wall time, median / p20 / p80): the sequential baseline
(``sequential``), ``MultiTaskDTL(batch_tails=True)`` (``multitask``: the tails of all
branched tasks run as one batch per block) and ``batch_tails=False``
(``multitask_unbatched``). The three are timed round-robin in the same run, so machine
noise hits them alike; ``x_sequential`` rows are ratios of medians. The first round
checks the outputs against the sequential ones and is the warm-up; with ``--quick`` it is
also timed (2 samples per provider: checked round + 1 round).

Target: ≥ 50 % less latency than sequential (block runs 7 + 19·5 = 102 instead of
19·12 = 228 give at best 55 %). Run: ``python benchmarks/bench_multitask.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, quantiles  # noqa: E402

from dtl_kernels import DTLViT, MultiTaskDTL  # noqa: E402


def build_tasks(
    name: str, n: int, m: int, k: int, num_classes: int
) -> tuple[torch.nn.Module, dict]:
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model(name, num_classes=0)
    tasks = {}
    for t in range(n):
        model = DTLViT(backbone, adapt_from=m, conv_kernel=k, num_classes=num_classes)
        with torch.no_grad():
            for p in model.csn.up.values():
                p.normal_(0, 0.02)
        tasks[f"task{t:02d}"] = model.eval()
    return backbone.eval(), tasks


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 timed round after the checked one, which counts too"
    )
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--tasks", type=int, default=19)
    ap.add_argument("--adapt-from", type=int, default=7, help="M")
    ap.add_argument("--conv-kernel", type=int, default=3)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (each runs all three)")
    ap.add_argument("--img", type=int, default=224)
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 7)

    backbone, tasks = build_tasks(args.model, args.tasks, args.adapt_from, args.conv_kernel, 10)
    providers = {
        "sequential": None,
        "multitask": MultiTaskDTL(backbone, tasks, batch_tails=True).eval(),
        "multitask_unbatched": MultiTaskDTL(backbone, tasks, batch_tails=False).eval(),
    }

    def sequential(x):
        return {n: m(x) for n, m in tasks.items()}

    res = Results("multitask")
    shape = f"{args.tasks} tasks,M={args.adapt_from},k={args.conv_kernel}"
    checks = []
    medians: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        x = torch.randn(
            batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(batch)
        )
        fns = {p: (sequential if mt is None else mt) for p, mt in providers.items()}
        samples = {p: [] for p in fns}

        def timed(p, x=x, fns=fns, samples=samples):
            with torch.no_grad():
                t0 = time.perf_counter()
                out = fns[p](x)
                samples[p].append((time.perf_counter() - t0) * 1e3)
            return out

        # first round: the outputs must agree; it is the warm-up (quick: also a sample)
        ref = timed("sequential")
        for p in ("multitask", "multitask_unbatched"):
            out = timed(p)
            err = max((out[n] - ref[n]).abs().max().item() for n in ref)
            print(f"[b={batch}] {p}: max |logits - sequential| = {err:.2e}")
            if err > 1e-3 * max(1.0, max(r.abs().max().item() for r in ref.values())):
                sys.exit(f"{p} disagrees with the sequential models (max error {err:.3g})")
        if not args.quick:
            for v in samples.values():
                v.clear()
        for _ in range(reps):
            for p in fns:
                timed(p)
        stats = {p: quantiles(s) for p, s in samples.items()}
        seq = stats["sequential"][0]
        medians[batch] = {p: st[0] for p, st in stats.items()}
        for p, st in stats.items():
            res.add(p, "latency", args.model, batch, "float32", shape, st, "ms")
            res.add(p, "x_sequential", args.model, batch, "float32", shape, st[0] / seq, "x")
        print(
            f"[b={batch}] sequential {seq:.0f} ms; multitask {stats['multitask'][0]:.0f} ms"
            f" ({stats['multitask'][0] / seq:.3f}x); batch_tails=False"
            f" {stats['multitask_unbatched'][0]:.0f} ms"
            f" ({stats['multitask_unbatched'][0] / seq:.3f}x)",
            flush=True,
        )
        for p in ("multitask", "multitask_unbatched"):
            checks.append((batch, p, 1 - stats[p][0] / seq))
    res.write()
    save_plot(medians, shape)
    blocks = len(backbone.blocks)
    best = 1 - (args.adapt_from + args.tasks * (blocks - args.adapt_from)) / (args.tasks * blocks)
    print(f"\nTarget: >= 50% less latency than sequential (block-count limit {100 * best:.1f}%):")
    for batch, p, saving in checks:
        ok = saving >= 0.50
        tag = "PASS" if ok else "MISS"
        if p != "multitask":
            tag = "info"
        print(f"  {tag}  b={batch} {p}: {100 * saving:.1f}% less latency")


def save_plot(medians: dict[int, dict[str, float]], title: str) -> None:
    """Bars of the median latency per batch, each relative to sequential (1.0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = ["sequential", "multitask", "multitask_unbatched"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(providers)
    for j, p in enumerate(providers):
        xs = [i + j * width for i in range(len(medians))]
        ys = [m[p] / m["sequential"] for m in medians.values()]
        bars = ax.bar(xs, ys, width, label=p)
        for bar, b in zip(bars, medians, strict=True):
            ax.annotate(
                f"{medians[b][p] / 1e3:.1f}s",
                (bar.get_x() + width / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="target 0.5")
    ax.set_xticks([i + width for i in range(len(medians))], [f"batch {b}" for b in medians])
    ax.set_ylabel("latency / sequential")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "multitask.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
