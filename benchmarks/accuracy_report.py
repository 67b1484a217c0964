"""The accuracy study's outputs: which files it may write, its rows, tables and plot.

File names: the main study writes ``accuracy_study.{csv,md,png}`` and
``accuracy_study_runs.csv``; ``--quick`` writes ``accuracy_quick.*`` instead. Every write
goes through :func:`write_output`, which refuses any other name — so a quick run can never
overwrite the committed study, and neither can overwrite the older committed results
(``accuracy.*``, ``accuracy_runs.csv``, ``accuracy_bf16*``).
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from accuracy_runs import DIVERGED, PROVENANCE, VARIANTS, Run
from accuracy_search import DROP_PATH, LR_GRIDS, MAX_EXTENSIONS, Selection
from accuracy_stats import RESAMPLES, bootstrap_ci, mean_std, paired_bootstrap_ci
from accuracy_tables import COLORS, write_csv, write_text

STEMS = {False: "accuracy_study", True: "accuracy_quick"}  # quick → its own files
REFERENCE = "dtl"  # paired differences are to this variant, on the same seeds
RUN_FIELDS = [
    "backbone", "dataset", "variant", "method", "phase", "lr", "drop_path", "seed", "epochs",
    "acc", "loss", "evaluated_on", "diverged", "trainable_params", "peak_memory_mib",
    "images_per_s", "wall_s", "train_images", "eval_images", "precision", "device",
    "peak_memory_method", "torch_threads", "options_sha",
]  # fmt: skip


def output_paths(results: Path, quick: bool) -> dict[str, Path]:
    """The only files a study (``quick`` or not) writes, by kind."""
    stem = STEMS[quick]
    return {
        "runs": results / f"{stem}_runs.csv",
        "csv": results / f"{stem}.csv",
        "md": results / f"{stem}.md",
        "png": results / f"{stem}.png",
    }


def write_output(path: Path, quick: bool, write) -> None:
    """``write(path)``, after checking ``path`` is one of this study's own files."""
    if path not in output_paths(path.parent, quick).values():
        kind = "quick" if quick else "main"
        raise ValueError(f"the {kind} accuracy study does not write {path.name}")
    write(path)


@dataclass
class Cell:
    """One variant on one backbone × dataset: its selection and its test runs."""

    backbone: str
    dataset: str
    variant: str
    selection: Selection | None = None  # None: no search (--quick)
    pick: Run | None = None  # the setting the test runs use
    tests: dict[Run, dict] = field(default_factory=dict)  # finished test runs
    missing_tests: list[Run] = field(default_factory=list)
    error: str = ""  # a run that failed (not diverged): the cell is incomplete

    def test_accs(self) -> dict[int, float]:
        """Test accuracy % per seed (diverged runs left out)."""
        return {r.seed: 100 * s["test_acc"] for r, s in self.tests.items() if not s.get("diverged")}


def run_row(run: Run, s: dict) -> dict:
    """One run of the runs CSV."""
    row = dict(
        backbone=run.backbone, dataset=run.dataset, variant=run.variant,
        method=VARIANTS[run.variant][0], phase=run.phase, lr=run.lr, drop_path=run.drop_path,
        seed=run.seed, epochs=run.epochs, diverged=bool(s.get("diverged")),
        options_sha=run.record_key(),  # so that the row can stand for the run (recorded_runs)
    )  # fmt: skip
    if s.get("diverged"):
        return {**row, "precision": run.precision, **s.get("recorded", {})}
    row.update(
        acc=round(100 * s["test_acc"], 2),
        loss=None if s.get("test_loss") is None else round(s["test_loss"], 4),
        evaluated_on=s.get("evaluated_on", "test"), trainable_params=s["trainable_params"],
        peak_memory_mib=round(s["peak_memory_bytes"] / 2**20, 1),
        images_per_s=round(s["images_per_s"], 1), wall_s=round(s["wall_time_s"], 1),
        train_images=s["train_images"], eval_images=s["test_images"],
        precision=s.get("precision", ""), device=s.get("device", ""),
        peak_memory_method=s.get("peak_memory_method", ""),
        torch_threads=s.get("torch_threads", ""),
    )  # fmt: skip
    row.update(s.get("recorded", {}))  # a reused row keeps where and when it was measured
    return row


def recorded_runs(path: Path) -> dict[str, dict]:
    """The finished runs a runs CSV records, as summaries keyed by :meth:`Run.record_key`
    (the digest of every option the run was trained with): a fresh clone (no run folders)
    goes on from the committed study instead of training its runs again. The file is
    untrusted: a row that does not read back as a run (a missing or malformed field, no
    options digest, an accuracy outside 0-100, a count or time that is negative or not
    finite) is left out, and said so."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    out, bad = {}, 0
    for row in rows:
        try:
            key, summary = _row_key(row), _row_summary(row)
        except (KeyError, ValueError, TypeError, AttributeError):
            bad += 1
            continue
        out.setdefault(key, summary)
    if bad:
        print(f"({path.name}: {bad} row(s) that do not read back as runs were left out)")
    return out


def _row_key(row: dict) -> str:
    key = row["options_sha"]
    if len(key) != 16 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not an options digest: {key!r}")
    if row["variant"] not in VARIANTS or row["phase"] not in ("select", "test"):
        raise ValueError(f"not a study run: {row['variant']} / {row['phase']}")
    return key


def _count(text: str, kind=float):
    """A finite, non-negative number from the file."""
    value = kind(text)
    if not 0 <= value < float("inf"):  # also rules out nan
        raise ValueError(f"{text!r} is not a finite non-negative number")
    return value


def _row_summary(row: dict) -> dict:
    recorded = {k: row.get(k) or "" for k in PROVENANCE}
    if row["diverged"] == "True":
        return {**DIVERGED, "recorded": recorded}
    acc = float(row["acc"])
    if not 0.0 <= acc <= 100.0:  # also rules out nan
        raise ValueError(f"accuracy {acc} is not a percentage")
    if (row["phase"] == "test") != (row["evaluated_on"] == "test"):
        raise ValueError(f"a {row['phase']} run evaluated on {row['evaluated_on']!r}")
    return dict(
        test_acc=acc / 100, test_loss=_count(row["loss"]) if row["loss"] else None,
        evaluated_on=row["evaluated_on"], trainable_params=_count(row["trainable_params"], int),
        peak_memory_bytes=_count(row["peak_memory_mib"]) * 2**20,
        images_per_s=_count(row["images_per_s"]), wall_time_s=_count(row["wall_s"]),
        train_images=_count(row["train_images"], int), test_images=_count(row["eval_images"], int),
        precision=row["precision"], device=row["device"],
        peak_memory_method=row["peak_memory_method"], torch_threads=row["torch_threads"],
        epochs=_count(row["epochs"], int), recorded=recorded,
    )  # fmt: skip


def run_rows(cells: list[Cell]) -> list[dict]:
    rows = []
    for c in cells:
        if c.selection is not None:
            rows += [run_row(r, s) for r, s in c.selection.results.items()]
        rows += [run_row(r, s) for r, s in sorted(c.tests.items(), key=lambda x: x[0].seed)]
    return rows


def summarise(cells: list[Cell]) -> list[dict]:
    """One row per cell with at least one finished test run: mean ± std, the bootstrap CI
    of the mean, the paired difference to DTL on the same seeds, and the pick."""
    accs = {(c.backbone, c.dataset, c.variant): c.test_accs() for c in cells}
    out = []
    for c in cells:
        mine = accs[c.backbone, c.dataset, c.variant]
        if not mine:
            continue
        ok = [s for s in c.tests.values() if not s.get("diverged")]
        mean, std = mean_std(list(mine.values()))
        _, low, high = bootstrap_ci(list(mine.values()))
        ref = accs.get((c.backbone, c.dataset, REFERENCE), {})
        paired = paired_bootstrap_ci(mine, ref) if c.variant != REFERENCE and ref else None
        picked = c.selection.results.get(c.pick) if c.selection and c.pick else None
        out.append(dict(
            backbone=c.backbone, dataset=c.dataset, variant=c.variant,
            acc_mean=round(mean, 2), acc_std=round(std, 2), seeds=len(mine),
            ci_low=round(low, 2), ci_high=round(high, 2),
            diff_vs_dtl=None if paired is None else round(paired[0], 2),
            diff_ci_low=None if paired is None else round(paired[1], 2),
            diff_ci_high=None if paired is None else round(paired[2], 2),
            paired_seeds=None if paired is None else paired[3],
            diverged_seeds=len(c.tests) - len(ok),
            lr=c.pick.lr, drop_path=c.pick.drop_path,
            val_acc=None if picked is None else round(100 * picked["test_acc"], 2),
            val_loss=None if picked is None else round(picked["test_loss"], 4),
            at_edge=bool(c.selection and c.selection.at_edge),
            extensions=c.selection.extensions if c.selection else 0,
            select_runs=len(c.selection.results) if c.selection else 0,
            selection=describe_selection(c.selection) if c.selection else "",
            trainable_params=ok[0]["trainable_params"],
            peak_memory_mib=round(statistics.median(s["peak_memory_bytes"] for s in ok) / 2**20, 1),
            images_per_s=round(statistics.median(s["images_per_s"] for s in ok), 1),
            wall_s=round(statistics.median(s["wall_time_s"] for s in ok), 1),
        ))  # fmt: skip
    return out


def describe_selection(sel: Selection) -> str:
    """``lr@dp: val acc % / loss`` of every select run, the pick starred."""
    parts = []
    for run, s in sorted(sel.results.items(), key=lambda x: (x[0].drop_path, x[0].lr)):
        mark = "*" if run == sel.pick else ""
        value = (
            "diverged" if s.get("diverged") else f"{100 * s['test_acc']:.2f}/{s['test_loss']:.3f}"
        )
        parts.append(f"{fmt_lr(run.lr)}@{run.drop_path:g}: {value}{mark}")
    return "; ".join(parts)


def pending(cells: list[Cell]) -> list[str]:
    """What is still to run, per cell, in words."""
    lines = []
    for c in cells:
        sel = c.selection
        todo = []
        if c.error:
            todo.append(f"failed: {c.error}")
        if sel is not None and sel.pick is None:
            todo.append(f"selection: {len(sel.missing)} run(s) to do, then up to "
                        f"{sel.more_at_most} more")  # fmt: skip
        if c.pick is None or c.missing_tests:
            todo.append(f"test: {len(c.missing_tests) if c.pick else 'all'} seed(s)")
        if todo:
            lines.append(f"{c.backbone} / {c.dataset} / {c.variant}: " + "; ".join(todo))
    return lines


def fmt_lr(lr: float) -> str:
    """``3e-4`` rather than ``0.0003`` (and ``1e-5`` rather than ``1e-05``)."""
    mantissa, exp = f"{lr:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def _ci(low, high) -> str:
    return f"[{low:.2f}, {high:.2f}]"


def markdown(summary: list[dict], cells: list[Cell], header: str, quick: bool) -> str:
    lines = [f"# {header}", ""]
    if not quick:
        lines += [protocol_text(summary, cells), ""]
    lines += [
        "| backbone | dataset | variant | test acc % (mean ± std, n) | 95 % CI of the mean | "
        f"Δ vs {REFERENCE.upper()} (same seeds: mean, 95 % CI, n) | lr, drop path | "
        "val acc % / loss | trainable | peak MiB | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        diff = "–" if r["diff_vs_dtl"] is None else (
            f"{r['diff_vs_dtl']:+.2f} {_ci(r['diff_ci_low'], r['diff_ci_high'])} "
            f"({r['paired_seeds']})"
        )  # fmt: skip
        edge = " (grid edge)" if r["at_edge"] else ""
        val = "–" if r["val_acc"] is None else f"{r['val_acc']:.2f} / {r['val_loss']:.3f}"
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['variant']} | {r['acc_mean']:.2f} ± "
            f"{r['acc_std']:.2f} ({r['seeds']}) | {_ci(r['ci_low'], r['ci_high'])} | {diff} | "
            f"{fmt_lr(r['lr'])}, {r['drop_path']:g}{edge} | {val} | {r['trainable_params']:,} | "
            f"{r['peak_memory_mib']:.0f} | {r['images_per_s']:.1f} |"
        )
    selected = [c for c in cells if c.selection is not None and c.selection.results]
    if not quick and selected:  # every cell's, tested or not: a partial study shows its search
        lines += ["", "Selection runs (validation split, seed 0), `lr@drop path: val acc % / "
                  "val loss`, * = picked:", ""]  # fmt: skip
        lines += [f"- {c.backbone} / {c.dataset} / {c.variant}: {describe_selection(c.selection)}"
                  for c in selected]  # fmt: skip
    todo = pending(cells)
    if todo:
        lines += ["", "Not finished yet (these tables hold what has finished):", ""]
        lines += [f"- {t}" for t in todo]
    return "\n".join(lines) + "\n"


def protocol_text(summary: list[dict], cells: list[Cell] | None = None) -> str:
    """How the numbers were made, for the Markdown file: the lr grids the cells searched
    (a ``--lrs`` grid where one was given, extensions included), then the default ladders."""
    used: dict[str, set] = {}
    for c in cells or []:
        if c.selection is not None:
            used.setdefault(c.variant, set()).update(c.selection.grid)
    ran = "; ".join(f"{v} {{{', '.join(fmt_lr(lr) for lr in sorted(g))}}}" for v, g in used.items())
    grids = "; ".join(
        f"{v} {{{', '.join(fmt_lr(lr) for lr in LR_GRIDS[v])}}}"
        for v in ("dtl", "lora", "linear", "full")
    )
    seeds = max((r["seeds"] for r in summary), default=0)
    coarse = (
        f" With {seeds} seeds this CI is coarse (a bootstrap over {seeds} seeds has few "
        "distinct resamples): read it as a rough range, not a precise interval."
        if 0 < seeds <= 5
        else ""
    )
    return (
        "Protocol. Selection on a validation split held out of the training images (seed 0; "
        f"the test split is never looked at): the lr over the grids searched here ({ran or '–'}"
        "; a grid given with `--lrs` where it differs from the default ladders of about two "
        f"decades in half-decade steps, {grids}; dtl+ / dtl+k5 as dtl, lora-r1 / lora-tail as "
        f"lora), extended by one step past an edge winner, at most {MAX_EXTENSIONS} times "
        "(the grids above include the extensions). Drop path by coordinate "
        f"search, to keep the compute affordable: {DROP_PATH:g} at the winning lr, and at its "
        f"two lr neighbours only if {DROP_PATH:g} wins there; the linear probe gets no drop-"
        "path search. Ties in validation accuracy go to the lower validation loss. Then "
        "several seeds train on the whole training split and are tested on the test split. "
        f"Δ vs {REFERENCE.upper()}: mean of the per-seed differences to DTL on the same seeds, "
        f"with a paired percentile bootstrap 95 % CI ({RESAMPLES:,} resamples of the seeds, "
        f"fixed RNG).{coarse} Peak memory: the training process's own (trunk cache off)."
    )


def plot(summary: list[dict], path: Path, device: str) -> None:
    """Accuracy vs peak memory, 95 % CI error bars; one panel per backbone × dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["backbone"], r["dataset"]) for r in summary))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (backbone, dataset) in zip(axes[0], groups, strict=True):
        for r in (r for r in summary if (r["backbone"], r["dataset"]) == (backbone, dataset)):
            err = [[r["acc_mean"] - r["ci_low"]], [r["ci_high"] - r["acc_mean"]]]
            ax.errorbar(r["peak_memory_mib"], r["acc_mean"], yerr=err, fmt="o", capsize=4,
                        label=r["variant"], color=COLORS[r["variant"]])  # fmt: skip
            ax.annotate(r["variant"], (r["peak_memory_mib"], r["acc_mean"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set_xlabel(f"peak training memory (MiB, {device})")
        ax.set_ylabel("test accuracy % (mean, 95 % bootstrap CI)")
        ax.set_title(f"{backbone} on {dataset}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def committed_test_runs(path: Path) -> int:
    """Test runs in an existing runs CSV (0 when there is none)."""
    try:
        with open(path, newline="") as f:
            return sum(row.get("phase") == "test" for row in csv.DictReader(f))
    except OSError:
        return 0


def write_all(
    cells: list[Cell],
    results: Path,
    quick: bool,
    header: str,
    env: dict,
    device: str,
    replace: bool = False,
) -> list:
    """Every output file of the study from the cells so far (``device``: where the runs
    trained, ``cpu`` / ``cuda``); returns the summary rows. The main study's files are
    not replaced by fewer test runs than they hold (a fresh clone without the run folders
    would otherwise overwrite the committed study with a partial one) unless ``replace``."""
    paths = output_paths(results, quick)
    rows = run_rows(cells)
    tests = sum(r["phase"] == "test" for r in rows)
    before = 0 if quick or replace else committed_test_runs(paths["runs"])
    if not rows:
        return []  # nothing has finished: leave any earlier files alone
    if tests < before:
        print(f"(not written: {paths['runs'].name} holds {before} test runs, these results "
              f"{tests}; --replace-results writes them anyway)", flush=True)  # fmt: skip
        return []
    write_output(paths["runs"], quick, lambda p: write_csv(p, RUN_FIELDS, rows, env))
    summary = summarise(cells)
    if summary:
        write_output(paths["csv"], quick, lambda p: write_csv(p, list(summary[0]), summary, env))
        write_output(paths["png"], quick, lambda p: plot(summary, p, device))
    text = markdown(summary, cells, header, quick)
    write_output(paths["md"], quick, lambda p: write_text(p, text))
    return summary
