"""Code-generation gates without a GPU (issue 19, item 3): ``make codegen-check``.

Compiles ahead of time for sm_90a (H100 / H200)
  * every Triton kernel of ``dtl_kernels/ops/triton_kernels.py``, as its launchers call it for
    each shape × dtype of ``CASES`` × ``DTYPES`` (``codegen_triton.py``), with the Triton
    the GPU machine runs (3.6.0; put a ``pip install --target DIR triton==3.6.0`` first on
    PYTHONPATH, the Makefile does), and
  * every CUDA C++ kernel the op launches for those shapes (``codegen_cuda.py``),
and reads registers, spills, shared memory, occupancy, barriers and tensor-core
instructions off ``ptxas -v`` and the SASS (``codegen_sass.py``). Writes
``benchmarks/results/codegen.csv`` (one row per kernel × shape × dtype, with a PASS / FAIL /
n/a column per gate) and ``codegen.md`` (summary). benchmarks/README.md explains the
columns and gates. Exit status 0 even when gates fail (the CSV is the report); 2 when the
Triton version is not the pinned one (``--any-triton`` to allow).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import codegen_cuda  # noqa: E402
import codegen_sass  # noqa: E402
import codegen_triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PINNED_TRITON = "3.6.0"  # what the lent GPU machine runs (device README, KINDS.md)

# The shapes (add a row to check another). N = prefix + H·W for DTL+.
CASES = {
    "vit-b-dtl": dict(B=32, N=197, d=768, K=24, k=0, prefix=1, grid=(14, 14)),
    "vit-b-dtl+k3": dict(B=32, N=197, d=768, K=24, k=3, prefix=1, grid=(14, 14)),
    "vit-b-dtl+k5": dict(B=32, N=197, d=768, K=24, k=5, prefix=1, grid=(14, 14)),
    "swin-b-s3-k5": dict(B=32, N=196, d=512, K=72, k=5, prefix=0, grid=(14, 14)),
}
# dtype mixes: name → (y / grad_out / conv_weight, taps / ups). A mix the launchers refuse
# is reported as skipped. The CUDA C++ kernels have one scalar type per instantiation.
DTYPES = {
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32": (torch.float32, torch.float32),
    "fp32+bf16": (torch.float32, torch.bfloat16),
}
_TORCH_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float64: "fp64"}  # fmt: skip
GATES = ("gate_spills", "gate_occupancy", "gate_shift_barriers", "gate_tensor_cores")
COLUMNS = (
    "impl", "case", "dtype", "kernel", "arch", "grid_ctas", "threads", "regs",
    "spill_stores", "spill_loads", "stack", "smem_static", "smem_dynamic",
    "ctas_by_regs", "ctas_by_threads", "ctas_by_smem", "ctas_per_sm", "sass_instrs", "loops",
    "main_loop_instrs", "barriers", "barriers_main_loop", "barriers_shift", "hmma", "wgmma",
    "tensor_core", "shfl", "local_ld_st", "product16", *GATES, "triton", "nvcc", "ptxas",
)  # fmt: skip


def gates(row: dict) -> dict:
    """PASS / FAIL / n/a of each gate for one row (README: what each means)."""

    def verdict(ok, applies=True):
        return "n/a" if not applies else ("PASS" if ok else "FAIL")

    return dict(
        gate_spills=verdict(row["spill_stores"] == 0 and row["spill_loads"] == 0),
        gate_occupancy=verdict(row["ctas_per_sm"] >= 2),
        gate_shift_barriers=verdict(row["barriers_shift"] == 0, row["barriers_shift"] != ""),
        gate_tensor_cores=verdict(row["tensor_core"] > 0, row["product16"]),
    )


def _row(ident: dict, res: dict, smem_dynamic: int, threads: int, grid_ctas: int, m: dict,
         product16: bool) -> dict:  # fmt: skip
    """One CSV row: ``ident`` (impl, case, dtype, kernel, arch), ptxas' ``res``, the launch,
    the SASS metrics ``m``, occupancy and gates."""
    row = dict(ident, grid_ctas=grid_ctas, threads=threads, regs=res["regs"])
    row.update({k: res[k] for k in ("spill_stores", "spill_loads", "stack", "smem_static")})
    row["smem_dynamic"] = smem_dynamic
    row.update(codegen_sass.occupancy(res["regs"], threads, res["smem_static"] + smem_dynamic))
    row.update(m)
    row["barriers_shift"] = "" if m["barriers_shift"] is None else m["barriers_shift"]
    row["product16"] = product16
    row.update(gates(row))
    return row


def _grid_ctas(grid) -> int:
    n = 1
    for g in grid:
        n *= int(g)
    return n


def triton_rows(cases, dtypes, arch, workdir, kernels=None, log=print):
    """Rows of the Triton kernels; also returns the (case, dtype, reason) skipped."""
    rows, skipped, gpu = [], [], f"sm_{arch}a"
    from dtl_kernels.ops import triton_kernels

    regions = codegen_triton.shift_regions(Path(triton_kernels.__file__))  # the source compiled
    for case in cases:
        for dt in dtypes:
            y_dtype, side_dtype = DTYPES[dt]
            try:
                launches = codegen_triton.capture_launches(CASES[case], y_dtype, side_dtype)
            except TypeError as exc:  # the launchers refuse this dtype mix
                skipped.append(("triton", case, dt, str(exc)))
                continue
            for launch in launches:
                if kernels and launch.kernel not in kernels:
                    continue
                t0 = time.time()
                c = codegen_triton.compile_launch(launch, arch, workdir)
                res = codegen_sass.parse_ptxas_log(c.ptxas_log)[launch.kernel]
                (fn,) = codegen_sass.parse_sass(c.sass).values()
                m = codegen_sass.metrics(fn, regions)
                # a 16-bit product: a tt.dot whose operands (taps / ups) are 16-bit
                product16 = "tt.dot" in c.ttir and side_dtype.itemsize == 2
                threads = 32 * launch.constexprs.get("num_warps", 4)
                ident = dict(impl="triton", case=case, dtype=dt, kernel=launch.kernel, arch=gpu)
                grid_ctas = _grid_ctas(launch.grid)
                rows.append(_row(ident, res, c.shared, threads, grid_ctas, m, product16))
                log(f"  triton {case} {dt} {launch.kernel}: {res['regs']} regs, "
                    f"{res['spill_stores']} B spilled ({time.time() - t0:.1f} s)")  # fmt: skip
                if not c.cubin_match:
                    log("    note: ptxas -v gave another cubin than Triton's")
    return rows, skipped


def cuda_rows(cases, dtypes, arch, workdir, nvcc, nvdisasm, log=print):
    """Rows of the CUDA C++ kernels each case launches (one scalar type per kernel)."""
    rows, skipped, gpu = [], [], f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    exe = codegen_cuda.build_launch_recorder(workdir)
    regions = codegen_cuda.shift_regions()
    for dt in dtypes:
        y_dtype, side_dtype = DTYPES[dt]
        if y_dtype != side_dtype or _TORCH_NAMES[y_dtype] not in codegen_cuda.TU:
            skipped.append(("cuda", "*", dt, "no CUDA C++ instantiation for this dtype mix"))
            continue
        name = _TORCH_NAMES[y_dtype]
        t0 = time.time()
        plog, sass, _ = codegen_cuda.compile_tu(name, nvcc, nvdisasm, workdir, arch)
        log(f"  nvcc {codegen_cuda.TU[name]}: {time.time() - t0:.1f} s")
        res_all = codegen_sass.parse_ptxas_log(plog)
        funcs = codegen_sass.parse_sass(sass)
        for case in cases:
            for mangled, smem, ctas, threads in codegen_cuda.launches(exe, CASES[case], name):
                kernel = codegen_cuda.pretty(mangled)
                m = codegen_sass.metrics(funcs[mangled], regions)
                # every kernel but the partial sums computes h = T·Uᵀ (and ∂T / ∂U)
                product16 = y_dtype.itemsize == 2 and not kernel.startswith("sum_partials")
                ident = dict(impl="cuda", case=case, dtype=dt, kernel=kernel, arch=gpu)
                rows.append(_row(ident, res_all[mangled], smem, threads, ctas, m, product16))
    return rows, skipped


def write_csv(rows, path: Path, versions: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({**row, **versions, "ptxas": versions["ptxas_" + row["impl"]]})


def write_summary(rows, skipped, path: Path, versions: dict, seconds: float) -> None:
    """The Markdown summary: versions, gate tallies, one line per kernel, what was skipped."""
    lines = [
        "# Code-generation gates (issue 19, item 3)",
        "",
        f"sm_90a, no GPU: `make codegen-check` ({datetime.date.today()}, {seconds:.0f} s on "
        f"this machine). Triton {versions['triton']} (its ptxas {versions['ptxas_triton']}), "
        f"nvcc {versions['nvcc'] or '—'}. Rows and columns: "
        "`codegen.csv`; what they mean: `benchmarks/README.md`.",
        "",
        "| gate | PASS | FAIL | n/a |",
        "|---|---|---|---|",
    ]
    for g in GATES:
        n = {v: sum(r[g] == v for r in rows) for v in ("PASS", "FAIL", "n/a")}
        lines.append(f"| {g[5:]} | {n['PASS']} | {n['FAIL']} | {n['n/a']} |")
    lines += [
        "",
        "| impl | case | dtype | kernel | regs | spills st/ld B | smem B | CTAs/SM | "
        "bar main loop | bar shift | HMMA / WGMMA | gates failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = ", ".join(g[5:] for g in GATES if r[g] == "FAIL") or "—"
        smem = r["smem_static"] + r["smem_dynamic"]
        shift = "—" if r["barriers_shift"] == "" else r["barriers_shift"]
        lines.append(
            f"| {r['impl']} | {r['case']} | {r['dtype']} | {r['kernel']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {smem} | {r['ctas_per_sm']} | "
            f"{r['barriers_main_loop']} | {shift} | "
            f"{r['hmma']} / {r['wgmma']} | {failed} |"
        )
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {impl} {case} {dt}: {why}" for impl, case, dt, why in skipped]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--kernels", nargs="+", help="only these Triton kernels (by name)")
    ap.add_argument("--skip-triton", action="store_true")
    ap.add_argument("--skip-cuda", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "codegen"),
                    help="output prefix: writes PREFIX.csv and PREFIX.md")  # fmt: skip
    ap.add_argument("--workdir", default=str(ROOT / "build" / "codegen"))
    ap.add_argument("--any-triton", action="store_true", help=f"allow Triton != {PINNED_TRITON}")
    args = ap.parse_args(argv)

    import triton

    if triton.__version__ != PINNED_TRITON and not args.any_triton:
        print(f"codegen_check: Triton {triton.__version__} at {triton.__file__}, the GPU "
              f"machine runs {PINNED_TRITON}: put `pip install --target DIR "
              f"triton=={PINNED_TRITON}` first on PYTHONPATH (make codegen-check does), "
              "or pass --any-triton", file=sys.stderr)  # fmt: skip
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, skipped = [], []
    ptxas = codegen_triton.tool_version("ptxas")
    versions = dict(triton=triton.__version__, nvcc="", ptxas_triton=ptxas, ptxas_cuda="")
    if not args.skip_triton:
        print(f"Triton {triton.__version__} ({triton.__file__}), ptxas {ptxas}")
        r, s = triton_rows(args.cases, args.dtypes, args.arch, workdir, args.kernels)
        rows, skipped = rows + r, skipped + s
    if not args.skip_cuda:
        home = codegen_cuda.cuda_home()
        if home is None:
            skipped.append(("cuda", "*", "*", "no CUDA toolkit (nvcc) found"))
        else:
            os.environ.setdefault("CUDA_HOME", str(home))  # before torch's cpp_extension
            nvcc = home / "bin" / "nvcc"
            own = home / "bin" / "nvdisasm"
            nvdisasm = str(own) if own.exists() else codegen_triton.tool("nvdisasm")
            ver = codegen_cuda.nvcc_version(nvcc)
            versions.update(nvcc=ver, ptxas_cuda=ver)
            print(f"nvcc {ver} ({nvcc}), nvdisasm {nvdisasm}")
            r, s = cuda_rows(args.cases, args.dtypes, args.arch, workdir, nvcc, nvdisasm)
            rows, skipped = rows + r, skipped + s
    seconds = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out.with_suffix(".csv"), versions)
    write_summary(rows, skipped, out.with_suffix(".md"), versions, seconds)
    for impl, case, dt, why in skipped:
        print(f"skipped {impl} {case} {dt}: {why.splitlines()[0]}")
    for g in GATES:
        fails = sum(r[g] == "FAIL" for r in rows)
        print(f"{g}: {fails} FAIL of {sum(r[g] != 'n/a' for r in rows)}")
    print(f"wrote {out.with_suffix('.csv')} and .md ({len(rows)} rows, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
