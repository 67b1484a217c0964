"""Fused side op on the compiled kernels (C++ on CPU, CUDA C++): fake kernels + autograd.

The op (schema in ``csrc/ops.cpp``)::

    out = side_forward(y, T, U, w, H, W, P, β) = y + mix(h),   h = T · Uᵀ

with ``mix = θ`` (DTL, ``w is None``) or, for DTL+, ``θ`` on the ``P`` prefix rows and the
depthwise ``k×k`` "same" convolution ``g`` of ``θ`` on the ``H×W`` patch grid. ``h`` is
never stored: the kernels rebuild it from the taps in forward and again in backward, so
what autograd keeps is ``T`` (``rows × K``), ``U`` and ``w`` — no ``rows × d`` tensor.

Gradients (``G = ∂L/∂out``; SPEC §2)::

    ∂L/∂y = G                                         (pass-through, no copy)
    S     = θ'(h) ⊙ gᵀ(G)  on patch rows,  θ'(h) ⊙ G  on prefix rows (and for DTL)
    ∂L/∂T = S · U                                     (rows × K)
    ∂L/∂U = Sᵀ · T                                    (d × K)
    ∂L/∂w[c, 0, i, j] = Σ_rows θ(h)[row shifted by (i, j)][c] · G[row][c]   (DTL+)

with ``θ'(x) = σ(βx) + βx·σ(βx)(1 − σ(βx))`` and ``gᵀ`` the transposed convolution (the
correlation with the flipped kernel). ``side_backward`` computes all three in one pass;
its reductions over rows are deterministic (fixed-order sums of per-task partials).
"""

from __future__ import annotations

import functools

import torch

from . import _ext

_OP = "dtl_kernels::side_forward"
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


@functools.cache
def _has_kernel(device_type: str) -> bool:
    key = _DISPATCH_KEY.get(device_type)
    if key is None or not _ext.cpu_built():
        return False
    if device_type == "cuda" and not _ext.cuda_built():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)
    except RuntimeError:  # the schema is not registered (an old build)
        return False


@torch.compiler.assume_constant_result
def available(device_type: str) -> bool:
    """Whether the compiled side op has a kernel for ``device_type`` (``"cpu"``/``"cuda"``).

    A constant for ``torch.compile`` (registrations do not change during a trace)."""
    return _has_kernel(device_type)


if _ext.cpu_built():

    @torch.library.register_fake("dtl_kernels::side_forward")
    def _side_forward_fake(y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    @torch.library.register_fake("dtl_kernels::side_backward")
    def _side_backward_fake(grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta):
        grad_taps = torch.empty_like(taps, memory_format=torch.contiguous_format)
        grad_ups = torch.empty_like(ups, memory_format=torch.contiguous_format)
        if conv_weight is None:
            grad_conv = ups.new_empty((0,))
        else:
            grad_conv = torch.empty_like(conv_weight, memory_format=torch.contiguous_format)
        return grad_taps, grad_ups, grad_conv

    def _setup_context(ctx, inputs, output):
        _y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta = inputs
        # Only the rank-K taps and the parameters: h is rebuilt in backward.
        ctx.save_for_backward(taps, ups, conv_weight)
        ctx.args = (grid_h, grid_w, num_prefix, beta)

    def _backward(ctx, grad_out):
        taps, ups, conv_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_taps = grad_ups = grad_conv = None
        if need[1] or need[2] or need[3]:
            grad_taps, grad_ups, grad_conv = torch.ops.dtl_kernels.side_backward(
                grad_out, taps, ups, conv_weight, *ctx.args
            )
        return (
            grad_out if need[0] else None,
            grad_taps if need[1] else None,
            grad_ups if need[2] else None,
            grad_conv if (need[3] and conv_weight is not None) else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "dtl_kernels::side_forward", _backward, setup_context=_setup_context
    )


def side_add(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """``y + mix(taps · upsᵀ)`` on the compiled kernel of ``y``'s device.

    Args:
        y: ``(B, N, d)`` block output (float32, bfloat16, float16 or float64).
        taps: ``(B, N, K)`` concatenated taps, ``y``'s dtype.
        ups: ``(d, K)`` concatenated up projections; cast to ``y``'s dtype if it differs
            (as autocast does for parameters; the gradient flows back in ``ups``' dtype).
        beta: β of θ.
        conv_weight: ``(d, 1, k, k)`` depthwise kernel (DTL+) or ``None`` (DTL); cast like
            ``ups``.
        grid: ``(H, W)`` with ``H·W = N − num_prefix`` (DTL+ only).
        num_prefix: leading tokens that bypass the convolution.
    Returns:
        ``(B, N, d)`` contiguous, ``y``'s dtype.

    Inputs are assumed validated (:func:`dtl_kernels.ops.side.side_add` does it); the
    kernels re-check them and raise ``RuntimeError`` on anything inconsistent.
    """
    if ups.dtype != y.dtype:
        ups = ups.to(y.dtype)
    if conv_weight is not None and conv_weight.dtype != y.dtype:
        conv_weight = conv_weight.to(y.dtype)
    grid_h, grid_w = grid if (conv_weight is not None and grid is not None) else (0, 0)
    args = (y, taps, ups, conv_weight, int(grid_h), int(grid_w), int(num_prefix), float(beta))
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # nothing to differentiate: skip the Python autograd wrapper of the op (its cost is
        # a visible share of a batch-1 inference step)
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.dtl_kernels.side_forward(*args)
    return torch.ops.dtl_kernels.side_forward(*args)
