"""The fused side op ``out = y + g(θ(T·Uᵀ))``: input checks, backend choice, dispatch.

Backends: ``reference`` (pure PyTorch, always there), ``cpu`` (compiled C++, CPU
tensors), ``cuda`` (compiled CUDA C++) and ``triton`` (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``). ``DTL_KERNELS_BACKEND`` overrides ``auto``.

Shapes (all backends): ``y`` ``(B, N, d)`` block output; ``taps`` ``(B, N, K)``
concatenated rank-r taps of the stage so far (``K = i·r``); ``ups`` ``(d, K)``
concatenated up projections; ``conv_weight`` ``(d, 1, k, k)`` or ``None`` (DTL);
``grid = (H, W)`` with ``H·W = N − num_prefix`` for DTL+.
"""

from __future__ import annotations

import os

import torch

from . import _ext, reference

BACKENDS = ("reference", "cpu", "triton", "cuda")


def resolve_backend(x: torch.Tensor, requested: str = "auto") -> str:
    """Which backend runs the side op for tensors like ``x``.

    ``requested`` (or ``DTL_KERNELS_BACKEND`` when ``requested == "auto"``) may name a
    backend; one that is not built, or does not serve ``x``'s device, raises
    :class:`~dtl_kernels.ops.BackendUnavailable` saying how to get it.
    """
    name = requested if requested != "auto" else os.environ.get("DTL_KERNELS_BACKEND", "auto")
    if name == "auto":
        return _auto_backend(x)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "cpu":
        _ext.require_cpu()
        if x.device.type != "cpu":
            raise _ext.BackendUnavailable(f"the cpu backend cannot run {x.device} tensors")
    elif name == "cuda":
        _ext.require_cuda()
        if not x.is_cuda:
            raise _ext.BackendUnavailable(f"the cuda backend cannot run {x.device} tensors")
    elif name == "triton":
        if not _ext.triton_importable():
            raise _ext.BackendUnavailable("the triton backend needs `pip install triton`")
        if not x.is_cuda and not _ext.triton_interpret():
            raise _ext.BackendUnavailable(
                "the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
            )
    return name


def _auto_backend(x: torch.Tensor) -> str:
    if x.device.type == "cpu":
        return "cpu" if _ext.cpu_built() and _fused_ready("cpu") else "reference"
    if x.is_cuda:
        if _ext.cuda_built() and _fused_ready("cuda"):
            return "cuda"
        if _ext.triton_importable() and _fused_ready("triton"):
            return "triton"
    return "reference"


def _fused_ready(name: str) -> bool:
    """Whether the fused side op of backend ``name`` is implemented and importable."""
    if name in ("cpu", "cuda"):
        from . import compiled_side

        return compiled_side.available(name)
    if name == "triton":
        from . import triton_side

        return triton_side.available()
    return False


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
    """``y + mix(T·Uᵀ)`` on the chosen backend; see the module docstring for shapes."""
    name = resolve_backend(y, backend)
    if name == "reference":
        return reference.side_add(y, taps, ups, beta, conv_weight, grid, num_prefix)
    if not _fused_ready(name):
        raise _ext.BackendUnavailable(f"the fused side op has no {name!r} backend yet")
    if name == "triton":
        from . import triton_side

        return triton_side.side_add(y, taps, ups, beta, conv_weight, grid, num_prefix)
    from . import compiled_side

    return compiled_side.side_add(y, taps, ups, beta, conv_weight, grid, num_prefix)
