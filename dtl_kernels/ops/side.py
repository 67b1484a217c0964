"""The fused side op ``out = y + mix(T·Uᵀ)``: its contract, its backends, and which one runs.

One contract (:class:`~dtl_kernels.ops.contract.SideArgs`), one registry
(:data:`BACKENDS`: name → :class:`Backend`) and one selection rule (:func:`select`).
Adding a backend is one registry entry plus its kernels.

Backends: ``reference`` (pure PyTorch, always there), ``cpu`` (compiled C++, CPU tensors),
``cuda`` (compiled CUDA C++) and ``triton`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``auto`` takes the first backend, in the order for the tensors'
device (:data:`AUTO_ORDER`; on CUDA the one the H100 measured faster for the case first),
that is built and takes the shapes; ``DTL_KERNELS_BACKEND`` overrides ``auto``.

Shapes (all backends): ``y`` ``(B, N, d)`` block output; ``taps`` ``(B, N, K)``
concatenated rank-r taps of the stage so far (``K = i·r``); ``ups`` ``(d, K)``
concatenated up projections; ``conv_weight`` ``(d, 1, k, k)`` or ``None`` (DTL);
``grid = (H, W)`` with ``H·W = N − num_prefix`` for DTL+.

Dtypes: ``taps`` in ``y``'s dtype, or 16-bit beside a float32 ``y`` (bf16 / fp16 autocast:
the residual stream stays float32, the taps are a matmul's 16-bit output). ``ups`` /
``conv_weight`` may be float32 parameters: fused backends get ``ups`` in the taps' dtype and
``conv_weight`` in ``y``'s (:meth:`SideArgs.kernel_args`), and their gradients flow back in
float32. Every kernel takes the mix as it is (16-bit products, float32 accumulation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _env
from . import _ext, reference, step
from .contract import SideArgs


@dataclass(frozen=True)
class Backend:
    """One implementation of the side op.

    ``runs(x)``: whether it can run tensors like ``x`` in this process (built, importable,
    right device); ``why_not(x)``: the reason and the fix when it cannot; ``fits(args)``:
    whether it takes these shapes; ``run(args)``: the op, differentiable in every tensor.
    """

    name: str
    runs: Callable[[torch.Tensor], bool]
    why_not: Callable[[torch.Tensor], str]
    fits: Callable[[SideArgs], bool]
    run: Callable[[SideArgs], torch.Tensor]


def _always(*_args) -> bool:
    return True


def _compiled_runs(device_type: str) -> Callable[[torch.Tensor], bool]:
    def runs(x: torch.Tensor) -> bool:
        from . import compiled_side

        return x.device.type == device_type and compiled_side.available(device_type)

    return runs


def _compiled_why_not(device_type: str) -> Callable[[torch.Tensor], str]:
    def why_not(x: torch.Tensor) -> str:
        if device_type == "cpu" and _ext.CPU_ERROR:
            return f"the CPU extension is not built ({_ext.CPU_ERROR}); {_ext.BUILD_HINT}"
        if device_type == "cuda" and _ext.CUDA_ERROR:
            return (
                f"the CUDA extension is not built ({_ext.CUDA_ERROR}); it needs a CUDA "
                f"toolkit and a CUDA build of PyTorch: {_ext.BUILD_HINT} with "
                "DTL_KERNELS_CUDA=1"
            )
        return f"the {device_type} backend cannot run {x.device} tensors"

    return why_not


def _compiled_run(args: SideArgs) -> torch.Tensor:
    from . import compiled_side

    return compiled_side.forward(args)


def _triton_runs(x: torch.Tensor) -> bool:
    if not _ext.triton_importable():
        return False
    from . import triton_side

    # whether CPU tensors can run is fixed when the kernels were defined (import time)
    return x.is_cuda or (x.device.type == "cpu" and triton_side._interpreted())


def _triton_why_not(x: torch.Tensor) -> str:
    if not _ext.triton_importable():
        return "the triton backend needs `pip install triton`"
    return (
        "the triton backend runs CUDA tensors (CPU tensors only when TRITON_INTERPRET=1 "
        "was set before dtl_kernels.ops.triton_kernels was imported)"
    )


def _triton_run(args: SideArgs) -> torch.Tensor:
    from . import triton_side

    return triton_side.forward(args)


def _reference_run(args: SideArgs) -> torch.Tensor:
    a = args  # the spec casts nothing: autograd's own casts keep float32 parameter grads
    return reference.side_add(a.y, a.taps, a.ups, a.beta, a.conv_weight, a.grid, a.num_prefix)


@functools.lru_cache(maxsize=256)
def _cuda_plan_fits(b, n, d, k_cols, ksize, prefix, gh, gw, io, acc, device_index) -> bool:
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    return bool(
        _ext.cuda_module().plan_fits(
            b, n, d, k_cols, ksize, prefix, gh, gw, io, acc, props.multi_processor_count, smem
        )
    )


def _cuda_fits(args: SideArgs) -> bool:
    """Asks the CUDA extension's own launch plan (side_plan.h) whether it takes the shape."""
    mod = _ext.cuda_module()
    y, k_cols, ksize = args.y, args.taps.shape[-1], args.conv_size
    if mod is None or k_cols > mod.MAX_K or ksize > mod.MAX_KSIZE:
        return False
    if not y.is_cuda:  # shape limits only (no device to ask about shared memory)
        return True
    b, n, d = y.shape
    prefix = args.num_prefix if ksize else 0
    acc = 8 if y.dtype == torch.float64 else 4
    io, device = y.element_size(), y.device.index or 0
    return _cuda_plan_fits(
        b, n, d, k_cols, ksize, prefix, args.grid_h, args.grid_w, io, acc, device
    )


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", _always, lambda x: "", _always, _reference_run),
    "cpu": Backend("cpu", _compiled_runs("cpu"), _compiled_why_not("cpu"), _always, _compiled_run),
    "cuda": Backend(
        "cuda", _compiled_runs("cuda"), _compiled_why_not("cuda"), _cuda_fits, _compiled_run
    ),
    "triton": Backend("triton", _triton_runs, _triton_why_not, _always, _triton_run),
}
# auto: the first of these that runs the tensors and takes the shapes
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
# On CUDA, where the H100 measured Triton faster for forward + backward (ViT-B/16 shapes,
# benchmarks/results/gpu/run3-final/kernels.csv): plain DTL in every dtype (fp32 145 vs
# 202 µs, bf16 54 vs 212 µs) and 16-bit DTL+ with k ≤ 3 (561 vs 672 µs). The CUDA C++
# kernels stay first for the other DTL+ cases (fp32 k = 3: 580 vs 824 µs; k = 5: 656 vs
# 1697 µs fp32, 694 vs 1604 µs bf16).
TRITON_FIRST_ON_CUDA = ("triton", "cuda", "reference")
#: the environment variable that overrides ``auto``
BACKEND_ENV = "DTL_KERNELS_BACKEND"


def _auto_order(x: torch.Tensor, conv_weight: torch.Tensor | None) -> tuple[str, ...]:
    order = AUTO_ORDER.get(x.device.type, ("reference",))
    if x.device.type == "cuda":
        k = conv_weight.shape[-1] if conv_weight is not None else 0
        if k == 0 or (x.dtype in (torch.float16, torch.bfloat16) and k <= 3):
            return TRITON_FIRST_ON_CUDA
    return order


def select(
    x: torch.Tensor,
    requested: str = "auto",
    args: SideArgs | None = None,
    conv_weight: torch.Tensor | None = None,
) -> str:
    """The backend that runs the side op for tensors like ``x``.

    ``requested`` (or ``DTL_KERNELS_BACKEND`` when ``"auto"``) may name a backend; one that
    cannot run ``x`` raises :class:`~dtl_kernels.ops.BackendUnavailable` saying how to get
    it. Under ``auto``, ``args`` (when given) must fit the backend too, and the conv
    (``args``' or ``conv_weight``, DTL+ or not) picks the measured-faster order on CUDA.
    """
    name = requested if requested != "auto" else _env.get(BACKEND_ENV, "auto")
    if name == "auto" and exporting():  # ONNX / torch.export know no custom op: plain aten
        return "reference"
    if name == "auto" and transformed():  # the fused ops cannot run there: plain aten
        return "reference"
    if name == "auto":
        conv = args.conv_weight if args is not None else conv_weight
        for candidate in _auto_order(x, conv):
            b = BACKENDS[candidate]
            if b.runs(x) and (args is None or b.fits(args)):
                return candidate
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if not BACKENDS[name].runs(x):
        raise _ext.BackendUnavailable(BACKENDS[name].why_not(x))
    return name


def transformed() -> bool:
    """Is a functorch transform active (``torch.func.vmap``, ``grad``, ``jacrev``: e.g.
    per-sample gradients)? The fused ops have no batching rule, and autograd functions
    written in C++ cannot run under these transforms; the reference formulation can."""
    return torch._C._are_functorch_transforms_active()


def exporting() -> bool:
    """Is a model being exported (``torch.onnx.export``, ``torch.export``)?"""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def has_step(name: str) -> bool:
    """Whether backend ``name`` runs the one-call add-back step (:mod:`.step`)."""
    return name in step.STEP_KERNELS and _ext.cpu_built()


def resolve_backend(x: torch.Tensor, requested: str = "auto") -> str:
    """The backend for tensors like ``x`` before shapes are known (see :func:`select`)."""
    return select(x, requested)


def side_add(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """``y + mix(T·Uᵀ)`` on the chosen backend; see the module docstring for shapes.

    Raises ``TypeError`` (not tensors, non-floating or mismatched dtypes) or
    ``ValueError`` (shapes, devices, grid / prefix inconsistent) before any kernel runs.
    """
    args = SideArgs.of(y, taps, ups, beta, conv_weight, grid, num_prefix)
    return BACKENDS[select(y, backend, args)].run(args)
