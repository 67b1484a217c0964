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

import math
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
        from . import triton_side

        # Whether CPU tensors can run is fixed when the kernels were defined (import time).
        if not x.is_cuda and not triton_side._interpreted():
            raise _ext.BackendUnavailable(
                "the triton backend runs CUDA tensors (CPU tensors only when TRITON_INTERPRET=1 "
                "was set before dtl_kernels.ops.triton_side was imported)"
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


# Limits of the CUDA C++ kernels (csrc/cuda/side.cu): larger shapes go elsewhere under auto.
_CUDA_MAX_K, _CUDA_MAX_CONV = 128, 7


def _cuda_fits(taps: torch.Tensor, conv_weight: torch.Tensor | None) -> bool:
    k = conv_weight.shape[-1] if conv_weight is not None else 0
    return taps.shape[-1] <= _CUDA_MAX_K and k <= _CUDA_MAX_CONV


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
    """``y + mix(T·Uᵀ)`` on the chosen backend; see the module docstring for shapes.

    Raises ``TypeError`` (not tensors, non-floating or mismatched dtypes) or
    ``ValueError`` (shapes, devices, grid / prefix inconsistent) before any kernel runs.
    """
    validate(y, taps, ups, beta, conv_weight, grid, num_prefix)
    name = resolve_backend(y, backend)
    if name == "cuda" and backend == "auto" and not _cuda_fits(taps, conv_weight):
        name = "triton" if _ext.triton_importable() and _fused_ready("triton") else "reference"
    if name != "reference":  # autocast: fp32 parameters beside low-precision activations
        ups = ups.to(y.dtype)
        conv_weight = conv_weight.to(y.dtype) if conv_weight is not None else None
    if name == "reference":
        return reference.side_add(y, taps, ups, beta, conv_weight, grid, num_prefix)
    if not _fused_ready(name):
        raise _ext.BackendUnavailable(f"the fused side op has no {name!r} backend yet")
    if name == "triton":
        from . import triton_side

        return triton_side.side_add(y, taps, ups, beta, conv_weight, grid, num_prefix)
    from . import compiled_side

    return compiled_side.side_add(y, taps, ups, beta, conv_weight, grid, num_prefix)


def validate(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
) -> None:
    """Check the side op's inputs; the message names the argument and what is wrong.

    ``y`` and ``taps`` must share a floating dtype; ``ups`` / ``conv_weight`` may differ
    (parameters kept in float32 under bfloat16 activations): backends cast them.
    """
    named = [("y", y), ("taps", taps), ("ups", ups)]
    if conv_weight is not None:
        named.append(("conv_weight", conv_weight))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"side_add: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"side_add: {name} must be floating point, got {t.dtype}")
        if t.device != y.device:
            raise ValueError(f"side_add: {name} is on device {t.device} but y is on {y.device}")
    if taps.dtype != y.dtype:
        raise TypeError(f"side_add: taps have dtype {taps.dtype} but y has {y.dtype}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise TypeError(f"side_add: beta must be a finite number, got {beta!r}")
    if y.dim() != 3:
        raise ValueError(f"side_add: y must be (batch, tokens, d), got shape {tuple(y.shape)}")
    b, n, d = y.shape
    if taps.dim() != 3 or tuple(taps.shape[:2]) != (b, n) or taps.shape[2] < 1:
        raise ValueError(
            f"side_add: taps must be ({b}, {n}, K) with K >= 1 to match y, got {tuple(taps.shape)}"
        )
    k_cols = taps.shape[2]
    if ups.dim() != 2 or tuple(ups.shape) != (d, k_cols):
        raise ValueError(f"side_add: ups must be (d, K) = ({d}, {k_cols}), got {tuple(ups.shape)}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix <= n:
        raise ValueError(f"side_add: num_prefix must be an int in 0…{n}, got {num_prefix!r}")
    if conv_weight is None:
        return
    w = conv_weight
    square = w.dim() == 4 and w.shape[2] == w.shape[3] >= 1
    if not square or w.shape[0] != d or w.shape[1] != 1:
        raise ValueError(
            f"side_add: conv_weight must be a depthwise (d, 1, k, k) = ({d}, 1, k, k) kernel, "
            f"got {tuple(w.shape)}"
        )
    if grid is None or len(grid) != 2 or any(int(g) < 1 for g in grid):
        raise ValueError(f"side_add: DTL+ needs a positive patch grid (H, W), got {grid!r}")
    if grid[0] * grid[1] != n - num_prefix:
        raise ValueError(
            f"side_add: {n} tokens do not hold {num_prefix} prefix tokens plus a "
            f"{grid[0]}x{grid[1]} patch grid"
        )
