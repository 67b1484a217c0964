"""Two variants of the accuracy study compared on every test seed both have: the closest
comparisons, given more seeds than the study's three (``bench_accuracy.py --seeds 5
--variants A B`` trains the extra seeds at the study's picks; this script only reads).

    python benchmarks/accuracy_pairs.py --runs benchmarks/results/accuracy_study_runs.csv \
        benchmarks/results/accuracy_pairs_runs.csv --pair dtl+k5 lora-tail [--pair ...] \
        [--out benchmarks/results/accuracy_pairs.md]

Per backbone × dataset and pair: each variant's test runs at its one test setting (the
study's pick: a cell whose test runs were trained at more than one lr / drop path is
refused, not mixed), mean ± std over its seeds, and the per-seed difference ``A − B`` on
the seeds both have with a paired bootstrap 95 % CI (``accuracy_stats``). Rows are read as
untrusted (``accuracy_report``'s checks: a row that does not read back as a run is left
out, and said so); a run listed in two files (same options digest) counts once.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from accuracy_report import RUN_FIELDS, _row_key, _row_summary, fmt_lr, run_row
from accuracy_runs import PROVENANCE, VARIANTS, Run, finished
from accuracy_stats import mean_std, paired_bootstrap_ci
from accuracy_tables import write_csv, write_text

Cell = tuple[str, str, str]  # backbone, dataset, variant


def read_test_runs(paths: list[Path]) -> tuple[dict[Cell, list[dict]], int]:
    """Every finished test run the files hold, per cell, once each; and the number of rows
    left out (unreadable, not a study run, or a diverged test run; selection runs are
    simply not read)."""
    runs: dict[Cell, list[dict]] = defaultdict(list)
    seen, left_out = set(), 0
    for path in paths:
        if not path.exists():  # e.g. the pairs' own runs CSV before it is first written
            print(f"({path} not found: skipped)")
            continue
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            raise SystemExit(f"accuracy_pairs: cannot read {path}: {e}") from e
        for row in rows:
            try:
                key, summary = _row_key(row), _row_summary(row)
                seed, lr, dp = int(row["seed"]), float(row["lr"]), float(row["drop_path"])
                cell = (row["backbone"], row["dataset"], row["variant"])
            except (KeyError, ValueError, TypeError, AttributeError):
                left_out += 1
                continue
            if row["phase"] != "test" or summary.get("diverged"):
                left_out += row["phase"] == "test"  # a diverged test run has no accuracy
                continue
            if key in seen:
                continue
            seen.add(key)
            acc = 100 * summary["test_acc"]
            runs[cell].append(dict(seed=seed, lr=lr, drop_path=dp, acc=acc, row=row))
    return runs, left_out


def study_runs(row: dict) -> list[Run]:
    """The study's :class:`Run` s a runs-CSV row records: those whose options digest is the
    row's (``max_train`` is not a column: tried as none and as the training count; both
    match where the dataset caps itself, and their folders differ)."""
    base = dict(backbone=row["backbone"], dataset=row["dataset"], variant=row["variant"],
                phase=row["phase"], lr=float(row["lr"]), seed=int(row["seed"]),
                epochs=int(row["epochs"]), drop_path=float(row["drop_path"]),
                precision=row["precision"])  # fmt: skip
    runs = [Run(**base, max_train=n) for n in (None, int(row["train_images"]))]
    return [run for run in runs if run.record_key() == row["options_sha"]]


def add_folder_runs(runs: dict[Cell, list[dict]], root: Path, seeds: int, variants) -> int:
    """Test seeds ``0 … seeds − 1`` the files lack, of the cells of ``variants``, from the
    finished run folders under ``root`` (``bench_accuracy.py``'s ``--out``) at the cell's
    test setting; returns how many were added."""
    added = 0
    for cell, found in runs.items():
        if cell[2] not in variants or not found:
            continue
        templates = study_runs(found[0]["row"])
        have = {r["seed"] for r in found}
        for seed in sorted(set(range(seeds)) - have) if templates else ():
            tried = [(run, finished(run, root)) for run in
                     (replace(t, seed=seed) for t in templates)]  # fmt: skip
            run, summary = next(((r, s) for r, s in tried if s is not None), (None, None))
            if summary is None or summary.get("diverged"):
                continue
            row = run_row(run, summary)
            found.append(dict(seed=seed, lr=run.lr, drop_path=run.drop_path, acc=row["acc"],
                              row=row))  # fmt: skip
            added += 1
    return added


def test_setting(cell: Cell, runs: list[dict]) -> tuple[float, float, dict[int, float]]:
    """``(lr, drop_path, {seed: acc %})`` of a cell's test runs, which share one setting."""
    settings = {(r["lr"], r["drop_path"]) for r in runs}
    if len(settings) != 1:
        raise SystemExit(f"accuracy_pairs: {'/'.join(cell)} has test runs at {len(settings)} "
                         f"settings {sorted(settings)}: one pick per cell expected")  # fmt: skip
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"accuracy_pairs: {'/'.join(cell)} has two test runs of one seed")
    (lr, dp), accs = settings.pop(), {r["seed"]: r["acc"] for r in runs}
    return lr, dp, accs


def compare(runs: dict[Cell, list[dict]], pairs: list[tuple[str, str]]) -> list[dict]:
    """One row per backbone × dataset × pair both of whose variants have test runs."""
    rows = []
    places = sorted({(b, d) for b, d, _ in runs})
    for (backbone, dataset), (a, b) in ((p, q) for p in places for q in pairs):
        if (backbone, dataset, a) not in runs or (backbone, dataset, b) not in runs:
            continue
        (lr_a, dp_a, acc_a), (lr_b, dp_b, acc_b) = (
            test_setting((backbone, dataset, v), runs[(backbone, dataset, v)]) for v in (a, b)
        )
        diff = paired_bootstrap_ci(acc_a, acc_b)
        if diff is None:
            continue
        (mean_a, std_a), (mean_b, std_b) = (
            mean_std(list(acc_a.values())),
            mean_std(list(acc_b.values())),
        )
        rows.append(dict(
            backbone=backbone, dataset=dataset, a=a, b=b, seeds_a=len(acc_a), seeds_b=len(acc_b),
            mean_a=mean_a, std_a=std_a, mean_b=mean_b, std_b=std_b, setting_a=(lr_a, dp_a),
            setting_b=(lr_b, dp_b), diff=diff[0], low=diff[1], high=diff[2], pairs=diff[3],
        ))  # fmt: skip
    return rows


def markdown(rows: list[dict], sources: list[Path], left_out: int) -> str:
    files = ", ".join(f"`{p.name}`" for p in sources)
    lines = [
        "# Accuracy study: pairs of variants on every common test seed",
        "",
        f"Written by `benchmarks/accuracy_pairs.py` from {files}"
        + (f" ({left_out} row(s) left out)" if left_out else "") + ". Test accuracy %, mean ± "
        "sample std over each variant's seeds at its selected lr / drop path; Δ = A − B per "
        "seed on the seeds both have, paired bootstrap 95 % CI.",
        "",
        "| backbone | dataset | A (lr, drop path) | B (lr, drop path) | A: acc % (seeds) | "
        "B: acc % (seeds) | Δ A − B [95 % CI] (pairs) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        sa, sb = r["setting_a"], r["setting_b"]
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['a']} ({fmt_lr(sa[0])}, {sa[1]:g}) | "
            f"{r['b']} ({fmt_lr(sb[0])}, {sb[1]:g}) | {r['mean_a']:.2f} ± {r['std_a']:.2f} "
            f"({r['seeds_a']}) | {r['mean_b']:.2f} ± {r['std_b']:.2f} ({r['seeds_b']}) | "
            f"{r['diff']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] ({r['pairs']}) |"
        )
    if not rows:
        lines.append("| – | – | – | – | – | – | no pair has test runs in both variants |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="runs CSV files")
    ap.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), required=True,
                    help="two variants to compare (repeatable)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="write the Markdown table here (else print it)")
    ap.add_argument("--folders", type=Path,
                    help="also read test seeds the files lack from these finished run folders "
                         "(bench_accuracy.py's --out, e.g. runs/accuracy)")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=5,
                    help="with --folders: look for test seeds 0…N-1 (default 5)")  # fmt: skip
    ap.add_argument("--runs-out", type=Path,
                    help="also write the test runs the pairs used, as a runs CSV")  # fmt: skip
    args = ap.parse_args(argv)
    for a, b in args.pair:
        for v in (a, b):
            if v not in VARIANTS:
                ap.error(f"unknown variant {v!r}; the study's are {', '.join(VARIANTS)}")
        if a == b:
            ap.error(f"--pair {a} {b}: two different variants")
    runs, left_out = read_test_runs(args.runs)
    pairs = [tuple(p) for p in args.pair]
    if args.folders is not None:
        added = add_folder_runs(runs, args.folders, args.seeds, {v for p in pairs for v in p})
        print(f"{added} test run(s) read from run folders under {args.folders}")
    rows = compare(runs, pairs)
    text = markdown(rows, args.runs, left_out)
    if args.out:
        write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    if args.runs_out:
        wanted = {v for p in pairs for v in p}
        used = [r["row"] for (_, _, v), rs in sorted(runs.items()) if v in wanted
                for r in sorted(rs, key=lambda r: r["seed"])]  # fmt: skip
        fields = list(dict.fromkeys(RUN_FIELDS + list(PROVENANCE)))
        write_csv(args.runs_out, fields, [{k: row.get(k, "") for k in fields} for row in used], {})
        print(f"wrote {args.runs_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
