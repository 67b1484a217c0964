"""One table of side-op cases and one accuracy rule for every backend's tests.

Who runs the table:

* ``test_side_backends.py``: the backends that run in the test process through
  ``side.side_add(..., backend=…)`` (autograd included): ``cpu`` on CPU tensors,
  ``cuda`` and ``triton`` on a GPU (skipped without one). Every case in every dtype of
  :data:`SWEEP_DTYPES`.
* ``test_side_triton.py``: ``triton`` under ``TRITON_INTERPRET=1`` (in a subprocess), every
  case that is not ``big``, in the case's own dtype.
* ``test_side_cuda.py``: the CUDA kernels built as host code (``tests/cuda_emu``), every
  case that is not ``big``, in the case's own dtype, with ``sms`` emulated SMs.

The reference is ``reference.side_add`` (the spec) in float64.

Accuracy rule (flash-attention's), one per dtype: for every output (out, ∂y, ∂taps, ∂ups,
∂w) the backend's error against float64 is at most ``MULTIPLE`` times the error of the
same computation done by the PyTorch reference in the backend's dtype, plus
``FLOOR[dtype]·max(1, max|exact|)``. Saturated cases (``|h| ~ 10³``, θ' moving by ~β/2
per unit of ``h`` near 0) allow ``SATURATED_MULTIPLE``: there the few ``h`` near 0 carry
rounding that depends on the summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtl_kernels.ops import reference

MULTIPLE, SATURATED_MULTIPLE = 4.0, 10.0
FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SWEEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OUTPUTS = ("out", "grad_y", "grad_taps", "grad_ups", "grad_conv")


@dataclass(frozen=True)
class Case:
    """``batch`` images of ``prefix + H·W`` tokens (``grid = (H, W)``; for DTL only the
    token count matters), width ``d``, ``K`` tap columns, conv size ``k`` (0: DTL).

    ``layout``: ``""`` contiguous; ``"noncontig"`` y / taps / ups / grad strided (last dims
    sliced or transposed); ``"rowslice"`` y / taps / grad are slices along N of longer
    tensors (``stride_b != N·stride_n``). ``sms``: SMs of the CUDA emulator (how many
    blocks share the backward's deterministic reduction). ``big``: compiled backends only.
    ``side``: the dtype of taps and ups beside a float32 ``y`` (the autocast mix), run when
    the case runs in float32; ``None``: the case's dtype.
    """

    name: str
    batch: int
    prefix: int
    grid: tuple[int, int]
    d: int
    K: int
    k: int = 0
    beta: float = 100.0
    dtype: torch.dtype = torch.float32
    layout: str = ""
    saturated: bool = False
    sms: int = 1
    big: bool = False
    side: torch.dtype | None = None

    def side_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The taps' / ups' dtype when the case runs with ``y`` in ``dtype``."""
        return self.side if self.side is not None and dtype == torch.float32 else dtype

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def conv_grid(self) -> tuple[int, int] | None:
        return self.grid if self.k else None

    @property
    def num_prefix(self) -> int:
        return self.prefix if self.k else 0


def C(name, batch, prefix, grid, d, K, k=0, **kw) -> Case:  # noqa: N802 (a table row)
    return Case(name, batch, prefix, grid, d, K, k, **kw)


f16, bf16, f64 = torch.float16, torch.bfloat16, torch.float64
CASES = [
    # -- DTL: rows 1 … 1200, d not a power of two, K up to 24
    C("dtl-rows1", 2, 0, (1, 1), 24, 2, beta=1.0),
    C("dtl-rows7-K6", 2, 0, (1, 7), 40, 6, sms=2),
    C("dtl-d13", 1, 0, (1, 7), 13, 4),
    C("dtl-rows37-d40", 3, 0, (1, 37), 40, 2),
    C("dtl-multitile-d72-K8", 3, 0, (1, 37), 72, 8, beta=1.0),
    C("dtl-rows197-d100-K24", 3, 0, (1, 197), 100, 24),
    C("dtl-rows1200", 8, 0, (1, 150), 32, 2, sms=4),
    C("dtl-d200-K24", 3, 0, (1, 70), 200, 24, sms=2),
    C("dtl-noncontig", 1, 0, (1, 37), 72, 6, beta=1.0, layout="noncontig"),
    C("dtl-saturated", 2, 0, (1, 7), 24, 6, saturated=True),
    C("dtl-bf16", 2, 0, (1, 37), 40, 6, dtype=bf16),
    C("dtl-fp16-noncontig", 2, 0, (1, 37), 40, 6, dtype=f16, layout="noncontig"),
    C("dtl-fp64-rowslice", 2, 0, (1, 7), 24, 6, beta=1.0, dtype=f64, layout="rowslice"),
    # -- DTL+: k = 1 … 7 (even k pads bottom / right), grids 1×1 … 16×21, prefixes 0 … 5
    C("k3-grid1x1", 2, 0, (1, 1), 24, 2, 3, beta=1.0),
    C("k3-prefix1-grid2x3", 2, 1, (2, 3), 24, 6, 3),
    C("k3-grid1x7-d17", 1, 0, (1, 7), 17, 2, 3),
    C("k4-grid7x1", 1, 0, (7, 1), 24, 6, 4, beta=1.0),
    C("k4-prefix5-grid4x8", 2, 5, (4, 8), 40, 6, 4, sms=3),
    C("k4-prefix1-grid6x6", 1, 1, (6, 6), 24, 2, 4, beta=1.0),
    C("k5-prefix1-grid3x4", 1, 1, (3, 4), 24, 6, 5),
    C("k5-prefix1-B2-K8", 2, 1, (6, 6), 40, 8, 5),
    C("k1-prefix1-grid3x4", 2, 1, (3, 4), 24, 2, 1),
    C("k2-grid5x3", 2, 0, (5, 3), 40, 6, 2, beta=1.0),
    C("k5-grid9x11-d33", 1, 0, (9, 11), 33, 5, 5, sms=2),
    C("k7-prefix2-grid3x4-d17", 1, 2, (3, 4), 17, 3, 7, beta=1.0),
    C("k6-prefix1-grid16x21", 1, 1, (16, 21), 40, 6, 6, beta=1.0, sms=2),
    C("k3-prefix5-grid16x21-d72", 2, 5, (16, 21), 72, 12, 3, sms=4),
    C("k4-grid5x7-d130-K48", 2, 0, (5, 7), 130, 48, 4),
    C("k4-K128", 1, 0, (4, 5), 24, 128, 4, beta=1.0),  # K at the CUDA kernels' limit
    C("k7-K128-grid9x17-d33", 1, 0, (9, 17), 33, 128, 7),
    C("k3-prefix5-noncontig", 1, 5, (4, 8), 40, 2, 3, layout="noncontig"),
    C("k4-prefix5-rowslice", 1, 5, (4, 8), 40, 6, 4, layout="rowslice"),
    C("k3-saturated", 1, 1, (6, 6), 24, 6, 3, saturated=True),
    C("k3-saturated-d70-K12", 2, 1, (10, 3), 70, 12, 3, saturated=True),
    C("k3-fp16", 1, 1, (6, 6), 40, 6, 3, dtype=f16),
    C("k5-fp16", 1, 1, (5, 5), 40, 6, 5, dtype=f16),
    C("k3-fp16-noncontig", 1, 1, (6, 6), 40, 6, 3, dtype=f16, layout="noncontig"),
    C("k4-bf16-prefix5", 1, 5, (4, 8), 40, 6, 4, beta=1.0, dtype=bf16),
    C("k2-bf16-grid11x9", 2, 0, (11, 9), 36, 8, 2, dtype=bf16, sms=3),
    C("k3-bf16-prefix1-K40", 1, 1, (6, 6), 40, 40, 3, dtype=bf16),  # K over 2½ mma k-steps
    C("k3-fp64", 1, 1, (2, 3), 24, 6, 3, dtype=f64),
    C("k5-fp64-grid9x17", 1, 2, (9, 17), 20, 10, 5, dtype=f64, sms=2),
    # -- float32 y with 16-bit taps / ups (what bf16 / fp16 autocast training feeds)
    C("mix-bf16-dtl-rows37", 3, 0, (1, 37), 40, 6, side=bf16),
    C("mix-fp16-dtl-noncontig", 2, 0, (1, 37), 72, 6, layout="noncontig", side=f16),
    C("mix-bf16-k3-prefix1-grid6x6", 2, 1, (6, 6), 40, 12, 3, side=bf16),
    C("mix-fp16-k4-prefix5-rowslice", 1, 5, (4, 8), 40, 6, 4, layout="rowslice", side=f16),
    C("mix-bf16-k5-grid9x11-saturated", 1, 0, (9, 11), 33, 6, 5, saturated=True, side=bf16),
    C("mix-bf16-dtl-rows197-d100-K24", 2, 0, (1, 197), 100, 24, side=bf16),  # ViT's K
    C("mix-bf16-dtl-rows37-d64-noncontig", 3, 0, (1, 37), 64, 6, layout="noncontig", side=bf16),
    # odd K: the CPU's bf16 pairs (csrc/cpu/bf16_dot.h) end in a half-empty pair
    C("mix-bf16-dtl-K7", 2, 0, (1, 19), 40, 7, side=bf16),
    C("k3-bf16-prefix1-K5", 1, 1, (5, 5), 24, 5, 3, dtype=bf16),
    # -- ViT-B/16 and Swin-B stage 3 sized: several tiles per program on a GPU
    C("vit-b-dtl", 4, 0, (1, 197), 768, 24, big=True),
    C("vit-b-k3", 4, 1, (14, 14), 768, 24, 3, big=True),
    C("vit-b-k5-prefix1", 4, 1, (14, 14), 768, 24, 5, big=True),
    C("vit-b-k3-noncontig", 2, 1, (14, 14), 768, 12, 3, layout="noncontig", big=True),
    C("vit-b-k4-rowslice", 2, 1, (14, 14), 768, 24, 4, layout="rowslice", big=True),
    C("swin-b-s3-k5-K72", 4, 0, (14, 14), 512, 72, 5, big=True),
    C("vit-b-k3-mix-bf16", 4, 1, (14, 14), 768, 24, 3, big=True, side=bf16),
    C("swin-b-s3-k5-mix-bf16", 2, 0, (14, 14), 512, 72, 5, big=True, side=bf16),
    C("k5-prefix5-grid16x21-d200", 3, 5, (16, 21), 200, 12, 5, big=True),
]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"


def inputs(case: Case, seed: int = 0) -> list[torch.Tensor | None]:
    """``[y, taps, ups, conv_weight, grad]`` in float64 on the CPU (``conv_weight`` None
    for DTL). ``|h| = |T·Uᵀ|`` is ~0.3 (θ in its curved range), ~10³ when saturated."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b, n, d, kw, k = case.batch, case.tokens, case.d, case.K, case.k
    y = rnd(b, n, d)
    taps = rnd(b, n, kw) * (1e3 if case.saturated else 0.3)
    ups = rnd(d, kw) * 0.3 / (kw / 6) ** 0.5
    if case.side is not None:  # values a 16-bit tensor holds exactly (the exact reference's too)
        taps, ups = taps.to(case.side).double(), ups.to(case.side).double()
    w = rnd(d, 1, k, k) / k if k else None
    return [y, taps, ups, w, rnd(b, n, d)]


def _strided(x: torch.Tensor, which: str) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    if which == "rows":  # a slice along N of a longer tensor: stride_b != N·stride_n
        big = x.new_zeros(x.shape[0], x.shape[1] + 3, x.shape[2])
        big[:, 1 : 1 + x.shape[1]] = x
        out = big[:, 1 : 1 + x.shape[1]]
    elif which == "cols":  # a slice of a wider tensor along the last dim
        big = x.new_zeros(*x.shape[:-1], x.shape[-1] + 5)
        big[..., 2 : 2 + x.shape[-1]] = x
        out = big[..., 2 : 2 + x.shape[-1]]
    else:  # "transposed": the transpose of a contiguous buffer of the swapped shape
        out = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(out, x)
    return out


def in_layout(case: Case, y, taps, ups, grad):
    """``y``, ``taps``, ``ups``, ``grad`` in the case's memory layout (same values)."""
    if case.layout == "noncontig":
        return (
            _strided(y, "cols"),
            _strided(taps, "transposed"),
            _strided(ups, "transposed"),
            (_strided(grad, "cols")),
        )
    if case.layout == "rowslice":
        return _strided(y, "rows"), _strided(taps, "rows"), ups, _strided(grad, "rows")
    return y, taps, ups, grad


def run_autograd(side_add, case: Case, dtype, values, device="cpu", layout=True):
    """``side_add(y, taps, ups, β, w, grid, prefix)`` and its gradients (``grad`` as ∂L/∂out),
    in ``dtype`` on ``device``; returns ``[out, ∂y, ∂taps, ∂ups(, ∂w)]``."""
    y, taps, ups, w, grad = values
    side = case.side_dtype(dtype)
    leaves = [
        t.detach().to(device, dt).clone().requires_grad_() if t is not None else None
        for t, dt in ((y, dtype), (taps, side), (ups, side), (w, dtype))
    ]
    g = grad.to(device, dtype)
    args = leaves[:3] + [g]
    if layout:
        args = list(in_layout(case, *args))
    out = side_add(args[0], args[1], args[2], case.beta, leaves[3], case.conv_grid, case.num_prefix)
    out.backward(args[3])
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def references(case: Case, dtype, values, device="cpu"):
    """The exact (float64) outputs and PyTorch's own at ``dtype`` (the yardstick)."""
    exact = run_autograd(reference.side_add, case, torch.float64, values, device, layout=False)
    at_dtype = run_autograd(reference.side_add, case, dtype, values, device, layout=False)
    return exact, at_dtype


def compare(
    case: Case, dtype, ours, exact, at_dtype, names=OUTPUTS, out_dtype=None
) -> tuple[bool, dict]:
    """The accuracy rule over every output; ``(all good, report per output)``. ``out_dtype``:
    the dtype ``ours`` must have (default: ``dtype``, and the taps' dtype for ∂taps / ∂ups
    of a mixed case); the floor is that of the output's own dtype."""
    multiple = SATURATED_MULTIPLE if case.saturated else MULTIPLE
    assert len(ours) == len(exact) == len(at_dtype), (len(ours), len(exact), len(at_dtype))
    ok, report = True, {}
    for name, o, e, t in zip(names, ours, exact, at_dtype, strict=False):
        own = case.side_dtype(dtype) if name in ("grad_taps", "grad_ups") else dtype
        err = (o.double().cpu() - e.cpu()).abs().max().item() if o.numel() else 0.0
        err_torch = (t.double().cpu() - e.cpu()).abs().max().item() if t.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        tol = multiple * err_torch + FLOOR[own] * max(1.0, scale)
        good = bool(torch.isfinite(o).all()) and o.dtype == (out_dtype or own)
        good &= o.shape == e.shape
        good &= err <= tol
        ok &= good
        report[name] = f"err {err:.2e} (torch {err_torch:.2e}, tol {tol:.2e})" + (
            "" if good else " FAIL"
        )
    return ok, report
