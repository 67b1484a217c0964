"""The summary of a ``gpu_check.py`` run: stage status, correctness counts, sanitizer and
pytest verdicts, the kernel table and every target (issue 9) with its measured value.

``python benchmarks/gpu_summary.py DIR`` rebuilds it from the CSVs and log of a run.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

# (model, dtype) -> least forward bandwidth as a fraction of the plain copy's
FWD_TARGETS = {
    ("DTL", "bfloat16"): 0.70,
    ("DTL", "float32"): 0.60,
    ("DTL+k3", "bfloat16"): 0.50,
    ("DTL+k3", "float32"): 0.50,
}
FULL_VS_EAGER, FULL_VS_COMPILE, TEMP_X_Y = 3.0, 1.5, 0.10
FUSED = ("cuda", "triton")


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def section(log: str, name: str) -> str:
    """The output of stage ``name`` in the log: from its header to the next stage's.
    Headers are exactly five '=' and a space; compute-sanitizer's lines start with nine."""
    start = log.rfind(f"===== {name} ")
    return log[start:].split("\n===== ", 1)[0] if start >= 0 else ""


def verdict(value: float, target: float, op: str) -> str:
    ok = value >= target if op == ">=" else value <= target
    if ok:
        return f"PASS  {value:.3g} (target {op} {target:g})"
    miss = (target / value if op == ">=" else value / target) if value else float("inf")
    return f"MISS  {value:.3g} (target {op} {target:g}; off by {miss:.2f}x)"


def summary(out: Path, records: list, log: str) -> tuple[str, bool]:
    lines, ok = [], True
    lines.append("=" * 78)
    lines.append("gpu_check summary")
    lines.append("stages:")
    for name, status, secs, note in records:
        lines.append(f"  {name:24s} {status:8s} {secs:5.0f}s  {note}")
        if status in ("FAILED", "TIMEOUT"):
            ok = False

    correct = read_csv(out / "correctness.csv")
    if correct:
        env = correct[0]
        lines.append(
            f"device: {env.get('device')}; torch {env.get('torch')}; "
            f"triton {env.get('triton')}; {env.get('date')}; rev {env.get('git_rev')}"
        )
        cases = defaultdict(lambda: True)
        for r in correct:
            key = (r["backend"], r["case"])
            cases[key] = cases[key] and r["passed"] == "True"
        lines.append(
            "correctness vs the float64 reference (every output and gradient, "
            "bit-identical repeats):"
        )
        for backend in sorted({b for b, _ in cases}):
            mine = {c: v for (b, c), v in cases.items() if b == backend}
            bad = [c for c, v in mine.items() if not v]
            lines.append(
                f"  {backend:8s} {len(mine) - len(bad)}/{len(mine)} cases pass"
                + (f"; FAILED: {', '.join(bad)}" if bad else "")
            )
            ok = ok and not bad
    for name in ("pytest-gpu",):
        text = section(log, name)
        if text:
            tail = [ln for ln in text.strip().splitlines() if re.search(r"passed|failed|error", ln)]
            lines.append(f"{name}: {tail[-1].strip() if tail else '(no summary line)'}")
    for name in dict.fromkeys(re.findall(r"===== (sanitize-\S+) ", log)):
        text = section(log, name)
        if not text:
            continue
        found = re.findall(
            r"(ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: \d+ hazards?[^\n]*)", text
        )
        clean = bool(found) and all(re.search(r": 0 ", f) for f in found)
        lines.append(f"{name}: {'; '.join(found) if found else 'no sanitizer summary'}")
        ok = ok and clean

    tables = (("kernels.csv", kernel_table), ("e2e.csv", e2e_table))
    for name, table in tables:
        rows = read_csv(out / name)
        if rows:
            lines += table(rows)
    e2e_logs = [section(log, m) for m in dict.fromkeys(re.findall(r"===== (e2e-\S+) ", log))]
    targets = [
        ln.strip()
        for text in e2e_logs
        for ln in text.splitlines()
        if ln.strip().startswith(("PASS", "MISS"))
    ]
    if targets:
        lines.append("end-to-end targets (bench_e2e):")
        lines += [f"  {t}" for t in targets]
    for name, table in (("step.csv", step_targets), ("fit_giants.csv", giant_targets)):
        rows = read_csv(out / name)
        if rows:
            lines += table(rows)
    lines.append(f"overall: {'OK' if ok else 'PROBLEMS (see above and log.txt)'}")
    return "\n".join(lines) + "\n", ok


# Issue 18 item 6 (ViT-B/16 and Swin-B, batch 32, bf16 autocast; bench_step.py's protocol):
# (provider, row mode, target, op); ratios are of medians of one interleaved run.
STEP_TARGETS = [
    ("dtl", "step_x_full", 0.45, "<="),
    ("dtl", "step_x_lora", 0.6, "<="),
    ("dtl+", "step_x_full", 0.5, "<="),
    ("dtl", "step_x_dtl_ref", 1 / 1.3, "<="),  # fused ≥ 1.3× faster than the eager reference
    ("dtl", "infer_x_timm", 0.95, ">="),
    ("dtl+", "infer_x_timm", 0.95, ">="),
    ("dtl", "infer_graph_x_timm", 0.98, ">="),
    ("dtl+", "infer_graph_x_timm", 0.98, ">="),
]


def step_targets(rows: list[dict]) -> list[str]:
    out = ["step and inference (bench_step: interleaved, median of ≥ 30; ms, busy = GPU kernels):"]
    by = defaultdict(dict)
    for r in rows:
        by[r["model"], r["provider"], r["batch"]][r["mode"]] = r
    for (model, provider, batch), d in by.items():
        cells = [f"{m.removesuffix('_ms')} {float(d[m]['median']):.2f}"
                 f" [{float(d[m]['p20']):.2f}–{float(d[m]['p80']):.2f}]"
                 for m in ("step_ms", "step_busy_ms", "infer_ms", "infer_graph_ms",
                           "infer_busy_ms", "infer_compiled_ms") if m in d]  # fmt: skip
        if cells:
            out.append(f"  {model} {provider:8s} b{batch:>3s}: " + "; ".join(cells))
    out.append("step / inference targets:")
    for provider, mode, target, op in STEP_TARGETS:
        for (model, p, batch), d in by.items():
            if p == provider and mode in d:
                value = float(d[mode]["median"])
                out.append(f"  {verdict(value, target, op)}  {model} {provider} b{batch} {mode}")
    return out


def kernel_table(rows: list[dict]) -> list[str]:
    val = {
        (r["provider"], r["mode"], r["model"], r["dtype"], r["shape"], r["unit"]): r["median"]
        for r in rows
    }
    configs = []
    for r in rows:
        key = (r["shape"], r["model"], r["dtype"], r["mode"])
        if r["provider"] != "copy" and key not in configs:
            configs.append(key)
    provs = [
        p
        for p in ("eager", "compile", "cuda", "triton", "cpu")
        if any(r["provider"] == p for r in rows)
    ]
    out = [
        "side op, µs per call (CUDA graphs of 100 calls, L2 flushed); "
        "x_copy = bandwidth / plain copy's:"
    ]
    head = (
        f"  {'shape':28s} {'model':7s} {'dtype':8s} {'mode':4s} "
        + " ".join(f"{p:>9s}" for p in provs)
        + "  "
        + " ".join(f"{p + ' x_copy':>13s}" for p in FUSED)
    )
    out.append(head)
    for shape, model, dtype, mode in configs:
        cells = [val.get((p, mode, model, dtype, shape, "us"), "-") for p in provs]
        xs = [val.get((p, mode, model, dtype, shape, "x_copy"), "-") for p in FUSED]
        out.append(
            f"  {shape:28s} {model:7s} {dtype:8s} {mode:4s} "
            + " ".join(f"{c:>9s}" for c in cells)
            + "  "
            + " ".join(f"{x:>13s}" for x in xs)
        )
    out.append("kernel targets:")
    for shape, model, dtype, mode in configs:
        for p in FUSED:

            def get(unit, p=p, shape=shape, model=model, dtype=dtype, mode=mode):
                v = val.get((p, mode, model, dtype, shape, unit))
                return float(v) if v not in (None, "") else None

            tag = f"{p:6s} {shape.split(':')[0]:8s} {model:7s} {dtype:8s} {mode:4s}"
            if mode == "fwd" and shape.startswith("vitb") and (model, dtype) in FWD_TARGETS:
                x = get("x_copy")
                if x is not None:
                    out.append(
                        f"  {tag} bandwidth/copy  " + verdict(x, FWD_TARGETS[model, dtype], ">=")
                    )
            if mode == "full" and shape.startswith("vitb"):
                for unit, lim in (
                    ("speedup_vs_eager", FULL_VS_EAGER),
                    ("speedup_vs_compile", FULL_VS_COMPILE),
                ):
                    x = get(unit)
                    if x is not None:
                        out.append(f"  {tag} {unit[8:]:14s}  " + verdict(x, lim, ">="))
            if mode == "full":
                x = get("temp_x_y")
                if x is not None:
                    out.append(f"  {tag} temp/y bytes    " + verdict(x, TEMP_X_Y, "<="))
    return out


ESTIMATE_WITHIN = 0.10  # issue 21: the prediction within 10 % of max_memory_allocated


def giant_targets(rows: list[dict]) -> list[str]:
    """Issue 21, item 4: each giant's peak against its goal, the prediction against the
    measured peak (both the one simulated here and the committed table's, simulated on a CPU:
    benchmarks/RESULTS.md)."""
    out = ["giants (DTL+, bf16 weights, checkpoint_tail, bf16 autocast; fit_giants.csv):"]
    for r in rows:
        name = r["model"] + (f" (as {r['run_as']})" if r["run_as"] != r["model"] else "")
        out.append(
            f"  {name} batch {r['batch']} @ {r['image']} px: peak {float(r['peak_gb']):.2f} GB, "
            f"step {r['step_ms_median']} ms, built in {r['build_s']} s, host peak "
            f"+{r['host_peak_growth_gib']} GiB"
        )
        out.append(
            "    peak (GB)            " + verdict(float(r["peak_gb"]), float(r["goal_gb"]), "<=")
        )
        for col, what in (("estimate_over_measured", "estimate/measured"),
                          ("estimate_cpu_over_measured", "table's/measured")):  # fmt: skip
            off = abs(float(r[col]) - 1)
            out.append(f"    {what:20s} " + verdict(off, ESTIMATE_WITHIN, "<=")
                       + f" (ratio {r[col]})")  # fmt: skip
    return out


def e2e_table(rows: list[dict]) -> list[str]:
    out = []
    by = defaultdict(dict)
    for r in rows:
        by[r["model"], r["provider"], r["batch"]][r["mode"].split(":")[-1]] = r["median"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for m in models:
        out.append(f"end to end {m} (bf16 autocast where run on CUDA): one training step")
        out.append(
            f"  {'provider':14s} {'batch':>5s} {'peak MB':>9s} {'x full':>7s} "
            f"{'step ms':>9s} {'x full':>7s} {'trainable':>11s}"
        )
        for (mm, p, b), d in by.items():
            if mm != m or "step_time" not in d:
                continue
            out.append(
                f"  {p:14s} {b:>5s} {d.get('peak_total', d.get('cpu_peak', '-')):>9s} "
                f"{d.get('peak_total_x_full', d.get('peak_x_full', '-')):>7s} "
                f"{d['step_time']:>9s} {d.get('step_x_full', '-'):>7s} "
                f"{d.get('trainable', '-'):>11s}"
            )
        inf = [(p, b, d) for (mm, p, b), d in by.items() if mm == m and "infer" in d]
        if inf:
            out.append(
                "  inference img/s: "
                + "; ".join(
                    f"{p} b{b} {d['infer']}"
                    + (f" ({d['infer_x_timm']}x)" if "infer_x_timm" in d else "")
                    for p, b, d in inf
                )
            )
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    log_text = (folder / "log.txt").read_text() if (folder / "log.txt").exists() else ""
    print(summary(folder, [], log_text)[0])
