"""The side op's contract, written once in Python (its C++ twin is ``csrc/side_checks.h``).

* :class:`SideArgs`: the arguments of ``y + mix(T·Uᵀ)`` in the kernels' order, built by
  :meth:`SideArgs.of`. User input is checked there (an error naming the argument and the
  problem); the model wrappers, which build these tensors themselves, skip the check.
  :meth:`SideArgs.kernel_args` is the one place parameters are cast to the activations'
  dtype (autocast keeps them float32 beside bfloat16).
* :func:`check_kernel_inputs`: what a kernel-level op takes (every tensor in one dtype,
  ``K >= 1``, a consistent grid). The same checks, in the same order, as
  ``check_side_inputs`` in ``side_checks.h``; the Triton launchers and every backend's fake
  kernels call it, so tracing on the meta device refuses what the kernels refuse.
* :func:`register_fakes`: fake kernels for a forward / backward op pair with the side-op
  schema ``(y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta)``; the compiled
  (C++ / CUDA) ops and the Triton ops share it. :func:`register_python_autograd`: the
  Triton ops' autograd (the compiled ops' is C++, ``csrc/autograd.cpp``).

Shapes: ``y`` ``(B, N, d)``; ``taps`` ``(B, N, K)``; ``ups`` ``(d, K)``; ``conv_weight``
``(d, 1, k, k)`` or ``None`` (DTL); ``grid = (H, W)`` with ``H·W = N − num_prefix`` (DTL+).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class SideArgs:
    """The side op's arguments in the kernels' order (``grid_h = grid_w = 0`` for DTL)."""

    y: torch.Tensor
    taps: torch.Tensor
    ups: torch.Tensor
    conv_weight: torch.Tensor | None
    grid_h: int
    grid_w: int
    num_prefix: int
    beta: float

    @classmethod
    def of(
        cls,
        y: torch.Tensor,
        taps: torch.Tensor,
        ups: torch.Tensor,
        beta: float,
        conv_weight: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
        num_prefix: int = 0,
        check: bool = True,
    ) -> SideArgs:
        """The arguments of ``y + mix(T·Uᵀ)``; ``grid`` / ``num_prefix`` matter for DTL+ only.

        ``check=True`` (user input) raises ``TypeError`` (not tensors, non-floating or
        mismatched dtypes, β not a finite number) or ``ValueError`` (shapes, devices, grid /
        prefix inconsistent). ``ups`` / ``conv_weight`` may have another floating dtype than
        ``y`` (float32 parameters beside bfloat16 activations). ``check=False`` is for
        inputs the caller built itself (the model wrappers); the kernels still check what
        they index.
        """
        if check:
            _check_user_inputs(y, taps, ups, beta, conv_weight, grid, num_prefix)
        gh, gw = (int(grid[0]), int(grid[1])) if conv_weight is not None else (0, 0)
        return cls(y, taps, ups, conv_weight, gh, gw, int(num_prefix), float(beta))

    @property
    def grid(self) -> tuple[int, int] | None:
        return (self.grid_h, self.grid_w) if self.conv_weight is not None else None

    @property
    def conv_size(self) -> int:
        return self.conv_weight.shape[-1] if self.conv_weight is not None else 0

    def kernel_args(self) -> tuple:
        """The op's arguments, with ``ups`` in the taps' dtype and ``conv_weight`` in
        ``y``'s (the kernels' dtypes, :func:`side_dtypes_ok`)."""
        side, dtype = self.taps.dtype, self.y.dtype
        taps = self.taps
        ups = self.ups if self.ups.dtype == side else self.ups.to(side)
        w = self.conv_weight
        if w is not None and w.dtype != dtype:
            w = w.to(dtype)
        return (self.y, taps, ups, w, self.grid_h, self.grid_w, self.num_prefix, self.beta)


def side_dtypes_ok(y_dtype: torch.dtype, side_dtype: torch.dtype) -> bool:
    """The side op's dtypes: ``y`` (``grad_out``, ``out``, ``conv_weight``) in one floating
    dtype; ``taps`` and ``ups`` in one dtype, ``y``'s or — beside a float32 ``y`` — bfloat16
    / float16 (autocast keeps the residual stream float32 while the taps, a matmul's output,
    are 16-bit). ``side_checks.h`` has the same rule."""
    return side_dtype == y_dtype or (
        y_dtype == torch.float32 and side_dtype in (torch.bfloat16, torch.float16)
    )


def _check_user_inputs(y, taps, ups, beta, conv_weight, grid, num_prefix) -> None:
    named = [("y", y), ("taps", taps), ("ups", ups)]
    if conv_weight is not None:
        named.append(("conv_weight", conv_weight))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"side_add: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"side_add: {name} must be floating point, got {t.dtype}")
        if t.dtype not in KERNEL_DTYPES:  # float8: floating point, but no kernel computes in it
            raise TypeError(f"side_add: {name} must be float32, float16, bfloat16 or float64, "
                            f"got {t.dtype}")  # fmt: skip
        if t.layout != torch.strided:
            raise TypeError(f"side_add: {name} must be a dense (strided) tensor, got {t.layout}")
        if t.device != y.device:
            raise ValueError(f"side_add: {name} is on device {t.device} but y is on {y.device}")
    if not side_dtypes_ok(y.dtype, taps.dtype):
        raise TypeError(
            f"side_add: taps have dtype {taps.dtype} but y has {y.dtype} (taps take y's dtype, "
            "or bfloat16 / float16 beside a float32 y)"
        )
    if not _finite_number(beta):
        raise TypeError(f"side_add: beta must be a finite number, got {beta!r:.40}")
    if abs(beta) > _beta_limit(y.dtype):
        raise ValueError(
            f"side_add: |beta| must be <= {_beta_limit(y.dtype):.3g} for {y.dtype} inputs, "
            f"got {beta!r}"
        )
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
    if w.dim() != 4 or w.shape[0] != d or w.shape[1] != 1 or not w.shape[2] == w.shape[3] >= 1:
        raise ValueError(
            f"side_add: conv_weight must be a depthwise (d, 1, k, k) = ({d}, 1, k, k) kernel, "
            f"got {tuple(w.shape)}"
        )
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or any(not _whole_number(g) or g < 1 for g in grid)
    ):
        raise ValueError(f"side_add: DTL+ needs a patch grid of two whole numbers ≥ 1 (H, W), "
                         f"got {grid!r}")  # fmt: skip
    if grid[0] * grid[1] != n - num_prefix:
        raise ValueError(
            f"side_add: {n} tokens do not hold {num_prefix} prefix tokens plus a "
            f"{grid[0]}x{grid[1]} patch grid"
        )


def _beta_limit(dtype: torch.dtype) -> float:
    """β is used in the kernels' compute type (float64 for float64 I/O, else float32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max


def check_kernel_inputs(
    op: str,
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    beta: float,
) -> int:
    """A kernel-level op's checks (``check_side_inputs`` of ``side_checks.h``, without the
    backend's device type and size limits); returns the conv size ``k`` (0 for DTL).

    ``y`` may be ``grad_out`` (the backward op). Raises ``TypeError`` for dtypes, else
    ``ValueError``.
    """
    dt = y.dtype
    if dt not in KERNEL_DTYPES:
        raise TypeError(f"{op}: dtype must be float32, float16, bfloat16 or float64, got {dt}")
    named = [("y/grad_out", y), ("taps", taps), ("ups", ups), ("conv_weight", conv_weight)]
    for name, t in named:
        if t is not None and t.device != y.device:
            raise ValueError(f"{op}: {name} is on {t.device} but y/grad_out is on {y.device}")
    if ups.dtype != taps.dtype:
        raise TypeError(f"{op}: ups has dtype {ups.dtype} but taps have {taps.dtype}")
    if not side_dtypes_ok(dt, taps.dtype):
        raise TypeError(
            f"{op}: taps have dtype {taps.dtype} but y/grad_out has {dt} (taps / ups take y's "
            "dtype, or bfloat16 / float16 beside float32 y)"
        )
    if conv_weight is not None and conv_weight.dtype != dt:
        raise TypeError(f"{op}: conv_weight has dtype {conv_weight.dtype} but y/grad_out has {dt}")
    if y.dim() != 3 or taps.dim() != 3 or ups.dim() != 2:
        raise ValueError(
            f"{op}: expected y (B, N, d), taps (B, N, K), ups (d, K); got "
            f"{tuple(y.shape)}, {tuple(taps.shape)}, {tuple(ups.shape)}"
        )
    bsz, n, d = y.shape
    if tuple(taps.shape[:2]) != (bsz, n):
        raise ValueError(
            f"{op}: taps {tuple(taps.shape)} do not match y {tuple(y.shape)} in (B, N)"
        )
    if ups.shape[0] != d:
        raise ValueError(f"{op}: ups has {ups.shape[0]} rows but d = {d}")
    if ups.shape[1] != taps.shape[2]:
        raise ValueError(f"{op}: ups has {ups.shape[1]} columns but taps have K = {taps.shape[2]}")
    if taps.shape[2] < 1:
        raise ValueError(f"{op}: taps need K >= 1 columns, got {taps.shape[2]}")
    if not math.isfinite(beta) or abs(beta) > _beta_limit(dt):
        raise ValueError(f"{op}: beta must be a finite number of the compute type, got {beta!r}")
    if not 0 <= num_prefix <= n:
        raise ValueError(f"{op}: num_prefix must be in 0..{n}, got {num_prefix}")
    if conv_weight is None:
        return 0
    w = conv_weight
    k = w.shape[3] if w.dim() == 4 else -1
    if w.dim() != 4 or tuple(w.shape[:3]) != (d, 1, k) or k < 1:
        raise ValueError(
            f"{op}: conv_weight must be (d, 1, k, k) with d = {d}, got {tuple(w.shape)}"
        )
    patches = n - num_prefix
    if grid_h < 1 or grid_w < 1 or grid_h * grid_w != patches:
        raise ValueError(
            f"{op}: {n} tokens do not hold {num_prefix} prefix tokens plus a "
            f"{grid_h}x{grid_w} patch grid"
        )
    return k


def register_fakes(forward_name: str, forward, backward_name: str, backward) -> None:
    """Fake (meta) kernels for a forward / backward op pair with the side-op schema: they
    run :func:`check_kernel_inputs`, so tracing refuses what the kernels refuse, naming
    the op (``forward_name`` / ``backward_name``).

    ``forward`` / ``backward``: the ops (qualified names or ``torch.library.custom_op``
    objects)."""

    def fake_forward(y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta):
        check_kernel_inputs(
            forward_name, y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta
        )
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    def fake_backward(grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta):
        check_kernel_inputs(
            backward_name, grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta
        )
        grad_taps = torch.empty_like(taps, memory_format=torch.contiguous_format)
        grad_ups = torch.empty_like(ups, memory_format=torch.contiguous_format)
        if conv_weight is None:
            return grad_taps, grad_ups, ups.new_empty((0,))
        return (
            grad_taps,
            grad_ups,
            torch.empty_like(conv_weight, memory_format=torch.contiguous_format),
        )

    torch.library.register_fake(forward)(fake_forward)
    torch.library.register_fake(backward)(fake_backward)


def _finite_number(x) -> bool:
    """An int or a float (not a bool) that is finite as a float (a huge int is not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _whole_number(g) -> bool:
    """An int (also a NumPy or symbolic one), not a bool or a float."""
    if isinstance(g, bool):
        return False
    try:
        operator.index(g)
    except TypeError:
        return False
    return True


def register_python_autograd(
    forward, call_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> None:
    """Autograd for a forward op with the side-op schema whose backward is ``call_backward``
    (the Triton ops; the compiled ops have theirs in C++, ``csrc/autograd.cpp``). Autograd
    saves only the rank-K ``taps``, ``ups`` and ``conv_weight`` (``h`` is rebuilt in
    backward); ``∂y = G``."""

    def setup_context(ctx, inputs, output):
        _y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta = inputs
        ctx.save_for_backward(taps, ups, conv_weight)
        ctx.args = (grid_h, grid_w, num_prefix, beta)

    def autograd_backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: these gradients carry no graph (the backward op has none)
            raise RuntimeError(
                "dtl_kernels side op: double backward (create_graph=True) is not supported: "
                "its gradients are not differentiable"
            )
        taps, ups, conv_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_taps = grad_ups = grad_conv = None
        if need[1] or need[2] or need[3]:
            grad_taps, grad_ups, grad_conv = call_backward(
                grad_out, taps, ups, conv_weight, *ctx.args
            )
        return (
            grad_out if need[0] else None,  # the residual: ∂y = G, no copy
            grad_taps if need[1] else None,
            grad_ups if need[2] else None,
            grad_conv if (need[3] and conv_weight is not None) else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(forward, autograd_backward, setup_context=setup_context)
