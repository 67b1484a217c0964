"""The CPU side-op kernels of two commits, timed side by side in one process.

Why: on a shared machine the side op's time moves by ±30 % between runs of
``bench_side_op.py`` (other tenants share the memory bus), which hides a kernel change of
that size. Here the kernel file of each commit (``csrc/cpu/side.cpp`` and the headers it
includes) is compiled the same way — the AVX-512 variant's ``-m`` flags from ``setup.py``
with ``-O3 -fopenmp``, not Python's own ``CFLAGS`` that the package build adds, so absolute
times can differ a little from the installed kernels' — into a library of its own (its ops
under a namespace of their own), and the two are called in turn, forward then backward,
round after round: whatever the machine does meanwhile hits both alike. Outputs are
compared too (forward: max |difference|; gradients: bit for bit is expected where only the
order of independent work changed).

    python benchmarks/cpu_kernel_ab.py --base 3306329 [--head WORKTREE] [--reps 25]
        [--side-dtype bfloat16] [--y-dtype bfloat16] [--conv 3]
        [--out benchmarks/results/cpu_kernel_ab.csv]

``--head`` is a commit or ``WORKTREE`` (the files as they are; the CSV's ``git_rev``
column is the checkout's HEAD, the provider column names what was measured). Needs a CPU
with AVX-512 (the variant it builds) and a C++ compiler (about 30 s per build). ViT-B/16's
shape: rows = 32·197, d = 768, K = 24, float32 y (or bf16), β = 100; DTL, or DTL+
(``--conv k``) on the 14 × 14 grid after a class token. Not in ``make bench`` (a
diagnostic for changes to the CPU kernels).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("csrc/cpu/side.cpp", "csrc/cpu/vec_capability.h", "csrc/side_checks.h",
           "csrc/side_math.h", "csrc/cuda/side_plan.h", "csrc/cpu/bf16_dot.h")  # fmt: skip
NEWER = {"csrc/cpu/bf16_dot.h"}  # headers older commits do not have (nothing includes them)
SCHEMAS = (
    "side_forward(Tensor y, Tensor taps, Tensor ups, Tensor? conv_weight, int grid_h, "
    "int grid_w, int num_prefix, float beta) -> Tensor",
    "side_backward(Tensor grad_out, Tensor taps, Tensor ups, Tensor? conv_weight, int grid_h, "
    "int grid_w, int num_prefix, float beta) -> (Tensor, Tensor, Tensor)",
)
REGISTRATION = "TORCH_LIBRARY_IMPL(dtl_kernels, CPU, m) {"


def variant_flags(name: str = "_C_cpu_avx512") -> list[str]:
    """The compiler flags ``setup.py`` builds the CPU kernel variant ``name`` with."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CPU_VARIANTS":
            return ast.literal_eval(node.value)[name]
    raise SystemExit("cpu_kernel_ab: setup.py has no CPU_VARIANTS")


def source_of(rev: str, path: str) -> str | None:
    """``path``'s text at ``rev``; None for a header of :data:`NEWER` it does not have."""
    if rev == "WORKTREE":
        return (ROOT / path).read_text()
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0 and path in NEWER:
        return None
    if out.returncode != 0:
        raise SystemExit(f"cpu_kernel_ab: cannot read {path} at {rev}: {out.stderr.strip()}")
    return out.stdout


def build(rev: str, namespace: str, workdir: Path):
    """Compile ``rev``'s kernel file with its ops registered under ``namespace``; returns
    ``torch.ops.<namespace>``."""
    from torch.utils import cpp_extension

    tree = workdir / namespace
    for path in SOURCES:
        dest = tree / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = source_of(rev, path)
        if text is None:
            continue
        if path.endswith("side.cpp"):
            if REGISTRATION not in text:
                raise SystemExit(f"cpu_kernel_ab: {path} at {rev} registers its kernels "
                                 "differently; this script cannot rename them")  # fmt: skip
            defs = "".join(f'  m.def("{s}");\n' for s in SCHEMAS)
            text = text.replace(
                REGISTRATION,
                f"TORCH_LIBRARY({namespace}, m) {{\n{defs}}}\n"
                f"TORCH_LIBRARY_IMPL({namespace}, CPU, m) {{",
            )
        dest.write_text(text)
    flags = ["-O3", "-std=c++20", "-g0", "-fopenmp", *variant_flags()]
    build_dir = workdir / f"build_{namespace}"
    build_dir.mkdir(exist_ok=True)
    cpp_extension.load(name=namespace, sources=[str(tree / SOURCES[0])], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                       is_python_module=False, verbose=False)  # fmt: skip
    return getattr(torch.ops, namespace)


def inputs(side_dtype: torch.dtype, y_dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    b, n, d, k = 32, 197, 768, 24
    y = torch.randn(b, n, d, generator=gen).to(y_dtype)
    taps = torch.randn(b, n, k, generator=gen).to(side_dtype)
    ups = (torch.randn(d, k, generator=gen) * 0.02).to(side_dtype)
    grad = torch.randn(b, n, d, generator=gen).to(y_dtype)
    return y, taps, ups, grad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--head", default="WORKTREE", help="a commit, or WORKTREE (default)")
    ap.add_argument("--reps", type=int, default=25, help="rounds (default 25)")
    ap.add_argument(
        "--side-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="taps / ups dtype (bfloat16: autocast's mix beside a float32 y)",
    )
    ap.add_argument(
        "--y-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="y / out / ∂out dtype (bfloat16 needs --side-dtype bfloat16: all-bf16)",
    )
    ap.add_argument("--conv", type=int, default=0, help="DTL+ conv size k (default 0: DTL)")
    ap.add_argument(
        "--out", type=Path, default=None, help="CSV (default: results/cpu_kernel_ab.csv)"
    )
    args = ap.parse_args()
    side_dtype, y_dtype = getattr(torch, args.side_dtype), getattr(torch, args.y_dtype)
    if y_dtype != torch.float32 and side_dtype != y_dtype:
        raise SystemExit("cpu_kernel_ab: a bfloat16 y takes bfloat16 taps / ups")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise SystemExit("cpu_kernel_ab: this CPU does not run the AVX-512 variant it builds")
    with tempfile.TemporaryDirectory(prefix="dtl_kernel_ab_") as tmp:
        ops = {}
        for label, rev in (("base", args.base), ("head", args.head)):
            ns = "dtl_ab_" + re.sub(r"\W", "_", f"{label}_{rev}")[:40]
            t0 = time.monotonic()
            ops[label] = build(rev, ns, Path(tmp))
            print(f"built {label} ({rev}) in {time.monotonic() - t0:.0f} s")
        y, taps, ups, grad = inputs(side_dtype, y_dtype)
        conv = None
        if args.conv:  # DTL+: ViT-B's 14 × 14 grid after one class token
            gen = torch.Generator().manual_seed(1)
            conv = (torch.randn(768, 1, args.conv, args.conv, generator=gen) / args.conv).to(
                y_dtype
            )
        call = (conv, 14, 14, 1, 100.0) if args.conv else (None, 0, 0, 0, 100.0)
        got = {k: (op.side_forward(y, taps, ups, *call), op.side_backward(grad, taps, ups, *call))
               for k, op in ops.items()}  # fmt: skip
        fwd_diff = (got["head"][0].float() - got["base"][0].float()).abs().max().item()
        pairs = list(zip(got["head"][1], got["base"][1], strict=True))
        same_grads = all(torch.equal(a, b) for a, b in pairs)
        grad_diff = [
            ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in pairs[:2]
        ]  # (∂taps and ∂ups: the third, ∂conv, is empty here)
        calls = {}  # base forward, base backward, head forward, head backward, in turn
        for label, op in ops.items():
            calls[(label, "fwd")] = lambda op=op: op.side_forward(y, taps, ups, *call)
            calls[(label, "bwd")] = lambda op=op: op.side_backward(grad, taps, ups, *call)
        load = os.getloadavg()[0]
        stats = interleaved(calls, args.reps)
    res = Results("cpu_kernel_ab")
    shape = f"rows=6304,d=768,K=24,y {args.y_dtype},taps {args.side_dtype}"
    model = f"dtl+k{args.conv}" if args.conv else "dtl"
    lines = []
    for mode in ("fwd", "bwd"):
        med = {k: stats[(k, mode)][0] for k in ops}
        for k, rev in (("base", args.base), ("head", args.head)):
            dtypes = f"y {args.y_dtype}, taps {args.side_dtype}"
            res.add(f"{k} {rev}", mode, model, 32, dtypes, shape, stats[(k, mode)], "ms")
        lines.append(f"{mode}: base {med['base']:.2f} ms, head {med['head']:.2f} ms "
                     f"(head / base {med['head'] / med['base']:.3f})")  # fmt: skip
    res.write(directory=args.out.parent if args.out else None,
              name=args.out.stem if args.out else None)  # fmt: skip
    print(f"\nload average {load:.2f} → {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} "
          f"threads; {args.reps} rounds, interleaved")  # fmt: skip
    print("\n".join(lines))
    print(
        f"forward: max |head − base| = {fwd_diff:.3g}; gradients bit for bit: {same_grads}"
        f" (max |head − base| / max |base|: ∂taps {grad_diff[0]:.2g}, ∂ups {grad_diff[1]:.2g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
