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
Autograd is registered in C++ (``csrc/autograd.cpp``), fake kernels in Python.
"""

from __future__ import annotations

import functools

import torch

from . import _ext, contract

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


if _ext.cpu_built():  # autograd: csrc/autograd.cpp
    contract.register_fakes("side_forward", _OP, "side_backward", "dtl_kernels::side_backward")


def forward(args: contract.SideArgs) -> torch.Tensor:
    """``y + mix(taps · upsᵀ)`` on the compiled kernel of ``y``'s device, differentiable in
    every tensor; ``(B, N, d)`` contiguous, ``y``'s dtype. The kernels check what they index
    and raise ``RuntimeError`` on anything inconsistent. The kernels take 16-bit taps / ups
    beside a float32 ``y`` (the autocast mix) as they are."""
    return torch.ops.dtl_kernels.side_forward.default(*args.kernel_args())
