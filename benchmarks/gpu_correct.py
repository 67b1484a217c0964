"""Correctness of one fused side-op backend against the float64 reference (a worker of
``gpu_check.py``; run alone: ``python benchmarks/gpu_correct.py --backend cuda --out DIR``).

Every case calls the public dispatch (``side.side_add(..., backend=NAME)``) with leaves that
require grad, so the registered autograd, the dtype casts and the input checks are exercised
too, and compares the output and every gradient (``y``, ``taps``, ``ups``, ``conv_weight``)
with the pure-PyTorch reference run in float64. The tolerance is the rule of the test suite:

    max |ours − exact| ≤ 4 · max |torch_at_dtype − exact| + floor(dtype) · max(1, max |exact|)

(``torch_at_dtype``: the same reference run in the case's dtype; TF32 off). Each case also
runs twice and must be bit-identical, and non-finite values fail. The CUDA C++ kernels
reduce in a fixed order always; Triton's backward adds its partial sums with atomics by
default, so on Triton the default run is checked for accuracy and the repeats are those
of its deterministic mode (``DTL_KERNELS_DETERMINISTIC=1``), checked for accuracy too.
A case with ``side`` set feeds autocast's mix: ``y`` / ``conv_weight`` / the gradient in
``dtype`` (float32), ``taps`` / ``ups`` in ``side`` (bfloat16 / float16).

Shapes: the ViT-B/16 training shape (B=32, N=197, d=768, K=24, several row tiles per CTA /
program), Swin-B stage 3 (14×14, d=512, K=72) and stage 4 (7×7, d=1024), register tokens,
even k, the CUDA limits (K=128, k=7), saturated θ, strided inputs, float64.
``--dry-run``: a few tiny cases on the CPU (``cpu`` backend, or ``triton`` under the
interpreter), to check this script without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_columns  # noqa: E402

from dtl_kernels.ops import reference, side  # noqa: E402

FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    prefix: int
    grid: tuple[int, int]
    d: int
    k_cols: int
    ksize: int
    dtype: torch.dtype
    strided: bool = False
    beta: float = 100.0
    scale: float = 0.3
    side: torch.dtype | None = None  # taps / ups dtype when it differs from ``dtype``

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        if self.side is not None:
            dt += "+" + str(self.side).replace("torch.", "")
        extra = "-strided" if self.strided else ""
        extra += "-saturated" if self.scale > 1 else ""
        return (
            f"{self.name}:B{self.batch}p{self.prefix}g{self.grid[0]}x{self.grid[1]}"
            f"d{self.d}K{self.k_cols}k{self.ksize}-{dt}{extra}"
        )


def gpu_cases() -> list[Case]:
    vit = dict(batch=32, prefix=1, grid=(14, 14), d=768, k_cols=24)
    cases = [Case("vitb", ksize=k, dtype=dt, **vit) for k in (0, 3, 5) for dt in (F32, BF16, F16)]
    cases += [
        Case("swinb-s3", 32, 0, (14, 14), 512, 72, 5, F32),
        Case("swinb-s3", 32, 0, (14, 14), 512, 72, 5, BF16),
        Case("swinb-s3", 32, 0, (14, 14), 512, 72, 0, BF16),
        Case("swinb-s4", 32, 0, (7, 7), 1024, 8, 5, BF16),
        Case("vitb", ksize=3, dtype=F32, strided=True, **vit),
        Case("vitb", ksize=0, dtype=BF16, strided=True, **vit),
        Case("vitb", ksize=3, dtype=F32, scale=1e3, **vit),
        Case("vits-reg4", 8, 5, (14, 14), 384, 24, 3, F32),
        Case("evenk", 4, 1, (14, 14), 192, 12, 4, BF16),
        Case("limits", 2, 0, (9, 17), 256, 128, 7, F32),
        Case("odd", 3, 2, (5, 7), 100, 6, 3, F16),
        Case("fp64", 2, 1, (14, 14), 100, 6, 3, F64),
        Case("fp64", 2, 1, (14, 14), 100, 6, 0, F64, beta=1.0),
        # autocast's mix: float32 y with 16-bit taps / ups
        Case("vitb", ksize=0, dtype=F32, side=BF16, **vit),
        Case("vitb", ksize=3, dtype=F32, side=BF16, **vit),
        Case("vitb", ksize=5, dtype=F32, side=F16, **vit),
        Case("swinb-s3", 32, 0, (14, 14), 512, 72, 5, F32, side=BF16),
    ]
    return cases


def sanitize_cases() -> list[Case]:
    """For compute-sanitizer: the ViT-B width at batch 8 (the ∂U blocks / programs each
    walk several row tiles, the ∂T blocks several channel steps), DTL+ and DTL; and Swin-B
    stage 3's K = 72 (the conv backward's largest shared-memory plan, its results staged
    over the loop's buffers)."""
    return [
        Case("sanitize", 8, 1, (14, 14), 768, 24, 3, F32),
        Case("sanitize", 8, 1, (14, 14), 768, 24, 3, BF16),
        Case("sanitize", 8, 1, (14, 14), 768, 24, 0, BF16),
        Case("sanitize", 2, 0, (14, 14), 512, 72, 5, BF16),
        Case("sanitize", 8, 1, (14, 14), 768, 24, 3, F32, side=BF16),  # autocast's mix
    ]


def dry_cases(backend: str) -> list[Case]:
    cases = [
        Case("tiny", 2, 1, (4, 5), 40, 6, 3, F32),
        Case("tiny", 2, 1, (4, 5), 40, 6, 0, BF16),
        Case("tiny", 2, 0, (3, 3), 24, 4, 5, F32, strided=True),
        Case("tiny", 2, 1, (4, 5), 40, 6, 3, F32, side=BF16),
    ]
    return cases if backend != "triton" else cases[:2]


def make_inputs(case: Case, device: str, seed: int = 0):
    """Float64 inputs (y, taps, ups, w, grad) of ``case`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=F64)

    b, n, d, kc, k = case.batch, case.tokens, case.d, case.k_cols, case.ksize
    y = rnd(b, n, d)
    taps = rnd(b, n, kc) * case.scale
    ups = rnd(d, kc) * 0.3 / (kc / 6) ** 0.5
    if case.side is not None:  # values the 16-bit taps / ups hold exactly, the exact run's too
        taps, ups = taps.to(case.side).double(), ups.to(case.side).double()
    w = rnd(d, 1, k, k) / k if k else None
    grad = rnd(b, n, d)
    return [t.to(device) if t is not None else None for t in (y, taps, ups, w, grad)]


def strided_view(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    if how == 0:  # a slice of a wider last dim
        return torch.cat([t, t], dim=-1)[..., : t.shape[-1]]
    if how == 1:  # batch and token dims swapped in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.t().contiguous().t()  # (d, K) stored column-major


def run_reference(case: Case, inputs, dtype):
    y, taps, ups, w, grad = inputs
    leaves = [
        t.detach().to(dtype).requires_grad_() if t is not None else None for t in (y, taps, ups, w)
    ]
    grid = case.grid if w is not None else None
    out = reference.side_add(*leaves[:3], case.beta, leaves[3], grid, case.prefix)
    wanted = [t for t in leaves if t is not None]
    return [out.detach()] + list(torch.autograd.grad(out, wanted, grad.to(dtype)))


def run_backend(case: Case, inputs, backend: str):
    y, taps, ups, w, grad = (t.to(case.dtype) if t is not None else None for t in inputs)
    if case.side is not None:
        taps, ups = taps.to(case.side), ups.to(case.side)
    if case.strided:
        y, taps, ups, grad = (
            strided_view(y, 0),
            strided_view(taps, 1),
            strided_view(ups, 2),
            (strided_view(grad, 0)),
        )
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (y, taps, ups, w)]
    grid = case.grid if w is not None else None
    out = side.side_add(*leaves[:3], case.beta, leaves[3], grid, case.prefix, backend=backend)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad)
    return [out.detach()] + list(grads)


NAMES = ["out", "grad_y", "grad_taps", "grad_ups", "grad_conv"]


@contextlib.contextmanager
def deterministic_mode():
    """The fused ops' deterministic mode (Triton's backward without atomics)."""
    saved = os.environ.get("DTL_KERNELS_DETERMINISTIC")
    os.environ["DTL_KERNELS_DETERMINISTIC"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DTL_KERNELS_DETERMINISTIC", None)
        else:
            os.environ["DTL_KERNELS_DETERMINISTIC"] = saved


def check_case(case: Case, backend: str, device: str) -> list[dict]:
    inputs = make_inputs(case, device)
    exact = run_reference(case, inputs, F64)
    # the yardstick of a mix: float32 math on its 16-bit values (what the kernels promise:
    # 16-bit products, fp32 accumulation, h kept in fp32); torch's own mix rounds h to
    # 16 bits, a yardstick loose enough to pass y itself rounded through bf16
    at_dtype = run_reference(case, inputs, case.dtype)
    runs = [run_backend(case, inputs, backend)]  # the default mode
    if backend == "triton":  # atomics by default: the repeats are the deterministic mode's
        with deterministic_mode():
            runs += [run_backend(case, inputs, backend) for _ in range(2)]
    else:
        runs.append(run_backend(case, inputs, backend))
    # the dtype each result must have: taps / ups (and their gradients) in the side dtype
    side = case.side or case.dtype
    dtypes = [case.dtype, case.dtype, side, side, case.dtype]
    rows = []
    for i, (name, e, t) in enumerate(zip(NAMES, exact, at_dtype, strict=False)):
        mine = [r[i] for r in runs]
        o = mine[0]
        err = max((x.double() - e).abs().max().item() for x in mine)
        err_torch = (t.double() - e).abs().max().item()
        # the test suite's rule (tests/side_cases.py): the floor of the output's own dtype
        tol = 4 * err_torch + FLOOR[dtypes[i]] * max(1.0, e.abs().max().item())
        finite = all(bool(torch.isfinite(x).all()) for x in mine)
        repeat = torch.equal(mine[-2], mine[-1])
        ok = finite and repeat and err <= tol and o.dtype == dtypes[i] and o.shape == e.shape
        rows.append(
            dict(
                backend=backend,
                case=case.label(),
                tensor=name,
                err=err,
                tol=tol,
                err_torch=err_torch,
                finite=finite,
                bit_identical=repeat,
                passed=ok,
            )
        )
    return rows


COLUMNS = [
    "backend",
    "case",
    "tensor",
    "err",
    "tol",
    "err_torch",
    "finite",
    "bit_identical",
    "passed",
    "seconds",
]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", required=True, choices=["cuda", "triton", "cpu"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--cases", choices=["gpu", "sanitize"], default="gpu")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th case from the i-th")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference at float32 is exact fp32
    torch.backends.cudnn.allow_tf32 = False
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_correct: no CUDA device visible", file=sys.stderr)
        return 2
    if args.dry_run:
        cases = dry_cases(args.backend)
    else:
        cases = sanitize_cases() if args.cases == "sanitize" else gpu_cases()
    shard, shards = (int(v) for v in args.shard.split("/"))
    cases = cases[shard::shards]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"correct_{args.backend}_{shard}.csv"
    env = env_columns(device)
    failed = 0
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + list(env))
        writer.writeheader()
        for case in cases:
            t0 = time.perf_counter()
            try:
                rows = check_case(case, args.backend, device)
            except Exception as exc:  # one failing case is reported, the rest still run
                rows = [
                    dict(
                        backend=args.backend,
                        case=case.label(),
                        tensor="(raised)",
                        err=f"{type(exc).__name__}: {exc}"[:300],
                        tol="",
                        err_torch="",
                        finite="",
                        bit_identical="",
                        passed=False,
                    )
                ]
            secs = time.perf_counter() - t0
            for r in rows:
                writer.writerow({**r, "seconds": f"{secs:.2f}", **env})
            f.flush()
            bad = [r for r in rows if not r["passed"]]
            failed += bool(bad)
            worst = max(
                (r["err"] / r["tol"] for r in rows if isinstance(r["err"], float) and r["tol"]),
                default=float("nan"),
            )
            status = (
                "PASS"
                if not bad
                else "FAIL "
                + ", ".join(
                    f"{r['tensor']} err={r['err']}"
                    if not isinstance(r["err"], float)
                    else f"{r['tensor']} err={r['err']:.3g}>tol={r['tol']:.3g}"
                    f"{'' if r['bit_identical'] else ' not-bit-identical'}"
                    for r in bad
                )
            )
            print(
                f"[{args.backend}] {case.label():58s} worst err/tol {worst:6.3f}  "
                f"{secs:5.1f}s  {status}",
                flush=True,
            )
    print(f"[{args.backend}] {len(cases) - failed}/{len(cases)} cases pass -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
