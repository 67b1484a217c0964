"""Accuracy study: which fine-tuning method gives the best accuracy for its memory?
Linear probe, PEFT LoRA (r = 8; r = 1, parameter-matched; r = 8 on blocks 7-12 only,
memory-matched), DTL, DTL+ (k = 3 and 5) and full fine-tuning on real pretrained backbones
and real data (``make bench-accuracy``; ``--quick`` for ``make bench``).

Protocol, per backbone × dataset × variant (each run is ``python -m dtl_kernels.train`` in
its own process with one thread, so its peak memory is its own; ``--epochs`` epochs, 10 %
of them warm-up, batch 32, trunk cache off, evaluated once at the end):

1. **select** (``accuracy_search``), on a validation split held out of the training
   images, seed 0; the test split is never looked at. The learning rate over about two
   decades in half-decade steps (dtl / dtl+ / dtl+k5 {1e-3 … 3e-2}, lora / lora-r1 /
   lora-tail {3e-4 … 1e-2}, linear {1e-3 … 1e-1}, full {1e-5 … 1e-4}) at drop path 0,
   extended by one step whenever the winner sits at an edge (at most twice). Then drop
   path by **coordinate search**, to keep the compute affordable: 0.1 at the winning lr,
   and at its two lr neighbours only if 0.1 wins there; the linear probe gets no drop-path
   search. Ties in validation accuracy go to the lower validation loss.
2. **test**: with the pick, ``--seeds`` seeds train on the whole training split and are
   tested on the test split: mean ± std, a bootstrap 95 % CI of the mean, and the
   per-seed difference to DTL on the same seeds with a paired bootstrap 95 % CI
   (``accuracy_stats``), with peak memory, throughput and wall time.

Runs are resumable: a run folder is reused when an identical run finished there
(``accuracy_runs.Run``), and so is a run the committed ``accuracy_study_runs.csv`` records
(so a fresh clone goes on from the committed study; ``--fresh`` counts run folders only;
the row keeps the date and revision it was measured at); the tables are rewritten as
cells finish — but never replaced by tables with fewer test runs than the committed ones
(``--replace-results`` to do so).
``--reuse-only`` builds them from what has finished (the Markdown lists what is still to
run); ``--plan`` prints every run the study would do, and how many, without running
anything.

Outputs (``--results``): ``accuracy_study.{csv,md,png}`` and ``accuracy_study_runs.csv``.
``--quick`` (DINOv2 on elpv, 2 epochs, 800 images, one seed, fixed lrs, no search) writes
only ``accuracy_quick.*``, into its own run folders: it never touches the committed study,
and no mode writes the older committed results (``accuracy.*``, ``accuracy_bf16*``).

Backbones: ``dinov2`` = DINOv2 ViT-S/14 (``vit_small_patch14_dinov2`` with the offline
weights ``dinov2-vits14-imgfocus``, 112 px), ``lite0`` = ImageNet EfficientNet-Lite0 (128
px; no attention layers, so no LoRA variants). Datasets: ``elpv`` (solar cells, 4 classes;
validation 400 images) and ``fashion-mnist`` (VTAB-1k style: 1000 training images, 200 of
them the validation split, the official 10 000 test images; needs the Debian package
``dataset-fashion-mnist``). ``--max-train N`` caps the training split (the validation
split then is N // 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy_report import Cell, fmt_lr, output_paths, recorded_runs, write_all  # noqa: E402
from accuracy_runs import (  # noqa: E402
    BACKBONES,
    DATASETS,
    VARIANTS,
    Run,
    execute,
    finished,
    folder_provenance,
)
from accuracy_search import select  # noqa: E402
from common import RESULTS, env_columns  # noqa: E402

DEFAULT_EPOCHS = 30  # the epoch sweep's longest schedule (accuracy_sweep.py)
QUICK_VARIANTS = ("linear", "lora", "dtl", "dtl+", "full")
QUICK_LR = {
    "linear": 1e-2, "lora": 1e-3, "lora-r1": 3e-3, "lora-tail": 1e-3, "dtl": 3e-3,
    "dtl+": 3e-3, "dtl+k5": 3e-3, "full": 1e-4,
}  # fmt: skip


def cells_of(args) -> list[Cell]:
    cells = []
    for backbone in args.backbones:
        for dataset in filter(available, args.datasets):
            for variant in args.variants:
                if VARIANTS[variant][0] == "lora" and backbone == "lite0":
                    continue  # no attention projections in a CNN
                cells.append(Cell(backbone, dataset, variant))
    return cells


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


def run_of(args, cell: Cell, phase: str, lr: float, seed: int, drop_path: float = 0.0) -> Run:
    return Run(cell.backbone, cell.dataset, cell.variant, phase, lr, seed, args.epochs,
               drop_path=drop_path, max_train=args.max_train, precision=args.precision)  # fmt: skip


def study_cell(args, cell: Cell, evaluate) -> Cell:
    """Select (unless quick), then the test seeds at the pick; fills ``cell``."""
    if args.quick:
        cell.pick = run_of(args, cell, "quick", QUICK_LR[cell.variant], 0)
    else:
        make = lambda lr, dp: run_of(args, cell, "select", lr, 0, dp)  # noqa: E731
        cell.selection = select(cell.variant, make, evaluate, args.lrs.get(cell.variant))
        cell.pick = cell.selection.pick
    if cell.pick is None:
        return cell
    phase = "quick" if args.quick else "test"
    runs = [replace(cell.pick, phase=phase, seed=seed) for seed in range(args.seeds)]
    got = evaluate(runs)
    cell.tests = {r: s for r, s in got.items() if s is not None}
    cell.missing_tests = [r for r in runs if got.get(r) is None]
    return cell


def executing(args):
    """Evaluate runs by running them (or reading an identical earlier run: a committed
    row of the runs CSV, or a run folder)."""
    recorded = recorded_of(args)

    def one(r: Run) -> dict | None:
        done = reused(r, args.out, recorded)
        return done if done is not None else execute(r, args.out, args.reuse_only)

    return lambda runs: {r: one(r) for r in runs}


def reused(r: Run, root: Path, recorded: dict[str, dict]) -> dict | None:
    """An identical earlier run's summary, or None: a local run folder first, else the
    committed runs CSV's row. A folder that keeps no provenance (trained before folders
    did) takes the CSV row's where the row is this folder's run (the same numbers, as the
    CSV rounds them; never its device: the folder's summary has its own), else what the
    folder itself says (:func:`folder_provenance`) — never this process's."""
    done, record = finished(r, root), recorded.get(r.record_key())
    if done is None:
        return record
    if "recorded" in done:
        return done
    own = folder_provenance(r.folder(root), done)
    if record is not None and _same_numbers(done, record):
        kept = dict(record["recorded"])
        if not done.get("diverged"):  # the summary has its own device; a divergence has none
            kept.pop("device", None)
        own.update(kept)
    return {**done, "recorded": own}


def _same_numbers(summary: dict, record: dict) -> bool:
    """Whether a CSV row records this summary's run (the CSV's rounding)."""
    if summary.get("diverged") or record.get("diverged"):
        return bool(summary.get("diverged")) and bool(record.get("diverged"))
    return (round(100 * summary["test_acc"], 2) == round(100 * record["test_acc"], 2)
            and round(summary["wall_time_s"], 1) == round(record["wall_time_s"], 1)
            and summary["trainable_params"] == record["trainable_params"])  # fmt: skip


def recorded_of(args) -> dict[str, dict]:
    """The runs the committed runs CSV records (none for ``--quick`` or ``--fresh``)."""
    if args.quick or args.fresh:
        return {}
    return recorded_runs(output_paths(args.results, False)["runs"])


def study(args, cells: list[Cell]) -> list[Cell]:
    """Every cell, ``--jobs`` at a time (each runs its runs one after another); the
    outputs are rewritten after each cell. A failed run (not a divergence) marks its
    cell and the others go on."""
    evaluate, lock = executing(args), threading.Lock()

    def work(cell: Cell) -> None:
        try:
            study_cell(args, cell, evaluate)
        except RuntimeError as exc:
            cell.error = str(exc).splitlines()[0][:300]
            print(f"!! {cell.backbone} / {cell.dataset} / {cell.variant}: {cell.error}",
                  file=sys.stderr, flush=True)  # fmt: skip
        with lock:
            write_outputs(args, cells)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(work, cells))
    return cells


def write_outputs(args, cells: list[Cell]) -> list[dict]:
    summaries = [s for c in cells for s in c.tests.values()]
    device = next((s["device"] for s in summaries if s.get("device")), "cpu")
    env = env_columns(device)
    warmup = round(100 * Run.warmup_share)
    header = (
        f"Accuracy study ({'quick' if args.quick else 'main'}; {args.epochs} epochs, {warmup} % "
        f"warm-up, batch 32, {args.precision}"
        + (f", training split capped at {args.max_train}" if args.max_train else "")
        + f"; tables written on {env['device']}, torch {env['torch']}, {env['date']}, rev "
        f"{env['git_rev']}; where, when and at which revision each run trained: the runs CSV)"
    )
    return write_all(cells, args.results, args.quick, header, env, device, args.replace_results)


# -- --plan ------------------------------------------------------------------------------------
class Planner:
    """An ``evaluate`` that runs nothing: finished runs give their results (so the search
    goes as far as they decide it), the others are listed as to do."""

    def __init__(self, root: Path, recorded: dict[tuple, dict]):
        self.root, self.recorded, self.done, self.todo = root, recorded, {}, []

    def __call__(self, runs: list[Run]) -> dict[Run, dict | None]:
        out = {}
        for r in runs:
            out[r] = reused(r, self.root, self.recorded)
            if out[r] is None:
                self.todo.append(r)
            else:
                self.done[r] = out[r]
        return out


def plan(args, cells: list[Cell]) -> int:
    """Print every run the study would do now, and bounds on the runs that depend on
    results not there yet; run nothing, write nothing."""
    planner = Planner(args.out, recorded_of(args))
    low = high = 0
    for cell in cells:
        before = len(planner.todo), len(planner.done)
        study_cell(args, cell, planner)
        print(f"{cell.backbone} / {cell.dataset} / {cell.variant}")
        for r in planner.todo[before[0] :]:
            print(f"  todo  {_describe(r)}  {r.folder(args.out)}")
        print(f"        ({len(planner.done) - before[1]} run(s) already done)")
        more_low, more_high = _later(args, cell)
        low, high = low + more_low, high + more_high
        if more_high:
            print(
                f"  later between {more_low} and {more_high} more run(s), depending on the "
                "results above (grid-edge extensions, drop-path runs, the test seeds)"
            )
    now = len(planner.todo)
    print(f"\n{now} run(s) to do now, {len(planner.done)} already done; "
          f"estimated {now + low}-{now + high} run(s) to do in all")  # fmt: skip
    hours = _hours(args, planner)
    if hours:
        print(hours)
    return 0


def _later(args, cell: Cell) -> tuple[int, int]:
    """(at least, at most) how many runs this cell needs beyond those listed now."""
    if cell.pick is not None:
        return 0, 0
    sel = cell.selection
    return sel.more_at_least + args.seeds, sel.more_at_most + args.seeds


def _describe(r: Run) -> str:
    return f"{r.phase:6s} lr {fmt_lr(r.lr):<5s} drop path {r.drop_path:g}  seed {r.seed}"


def _hours(args, planner: Planner) -> str:
    """Rough CPU time of the runs to do now: seconds per epoch of the finished runs in the
    same backbone / dataset / variant folder (any phase, the epoch sweep's included)."""
    rates: dict[tuple, float] = {}
    for key in {(r.backbone, r.dataset, r.variant) for r in planner.todo}:
        folder = variant_folder(args.out, *key)
        speeds = []
        for path in folder.glob("*/summary.json"):
            try:
                s = json.loads(path.read_text())
                speeds.append(s["wall_time_s"] / s["epochs"])
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
                continue
        if speeds:
            rates[key] = statistics.median(speeds)
    known = [r for r in planner.todo if (r.backbone, r.dataset, r.variant) in rates]
    if not known:
        return ""
    seconds = sum(rates[r.backbone, r.dataset, r.variant] * r.epochs for r in known)
    return (f"≈ {seconds / 3600:.0f} h of one core for {len(known)} of them, from the speed "
            "of finished runs of the same variant (rough; the others unknown)")  # fmt: skip


def variant_folder(root: Path, backbone: str, dataset: str, variant: str) -> Path:
    """The folder holding a variant's run folders (as :meth:`Run.folder` names it)."""
    return Run(backbone, dataset, variant, "x", 1.0, 0, 1).folder(root).parent


# -- command line ------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true",
                    help="dinov2 on elpv, 2 epochs, 800 images, 1 seed, fixed lrs, no search; "
                    "writes only accuracy_quick.*")  # fmt: skip
    ap.add_argument("--plan", action="store_true", help="print the runs it would do; run nothing")
    ap.add_argument("--reuse-only", action="store_true",
                    help="tables from finished runs only; run nothing")  # fmt: skip
    ap.add_argument("--backbones", nargs="+", choices=list(BACKBONES))
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS))
    ap.add_argument("--variants", "--methods", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, help="test seeds per variant (default 3; quick: 1)")
    ap.add_argument("--epochs", type=int,
                    help=f"default {DEFAULT_EPOCHS} (quick: 2); 10 %% of them warm-up")  # fmt: skip
    ap.add_argument("--max-train", type=int, help="cap the training split (quick: 800)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--jobs", type=int, default=1, help="cells run at a time (one thread each)")
    ap.add_argument("--lrs", nargs="*", default=[], metavar="VARIANT=LR,LR",
                    help="replace a variant's lr grid, e.g. full=1e-4 (one value: no "
                    "search)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="run folders (default runs/accuracy; quick: "
                    "runs/accuracy-quick)")  # fmt: skip
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true",
                    help="count only run folders, not the runs the committed "
                    "accuracy_study_runs.csv records")  # fmt: skip
    ap.add_argument("--replace-results", action="store_true",
                    help="write the tables even when they hold fewer test runs than the "
                    "committed accuracy_study_runs.csv (a changed protocol)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        args.lrs = {
            v: tuple(float(x) for x in lrs.split(","))
            for v, lrs in (item.split("=", 1) for item in args.lrs)
        }
    except ValueError:
        ap.error("--lrs takes VARIANT=LR[,LR…], e.g. full=1e-4")
    if set(args.lrs) - set(VARIANTS):
        ap.error(f"--lrs: unknown variant(s) {sorted(set(args.lrs) - set(VARIANTS))}")
    quick = args.quick
    args.backbones = args.backbones or (["dinov2"] if quick else list(BACKBONES))
    args.datasets = args.datasets or (["elpv"] if quick else list(DATASETS))
    args.variants = args.variants or list(QUICK_VARIANTS if quick else VARIANTS)
    args.seeds = args.seeds or (1 if quick else 3)
    args.epochs = args.epochs or (2 if quick else DEFAULT_EPOCHS)
    args.max_train = args.max_train or (800 if quick else None)
    args.out = args.out or Path("runs/accuracy-quick" if quick else "runs/accuracy")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = cells_of(args)
    if args.plan:
        return plan(args, cells)
    args.results.mkdir(parents=True, exist_ok=True)
    study(args, cells)
    failed = [c for c in cells if c.error]
    if not any(c.tests for c in cells):
        print("no finished test runs yet")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
