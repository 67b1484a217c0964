"""θ(x) = x·σ(βx) as a registered op: compiled CPU / CUDA kernels, autograd, fake kernel.

Gradient: θ'(x) = σ(βx) + βx·σ(βx)·(1 − σ(βx)); the backward recomputes σ(βx) from
``x`` instead of saving it.
"""

from __future__ import annotations

import torch

from . import _ext, reference

if _ext.cpu_built():

    @torch.library.register_fake("dtl_kernels::theta")
    def _theta_fake(x: torch.Tensor, beta: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("dtl_kernels::theta_backward")
    def _theta_backward_fake(grad: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        x, beta = inputs
        ctx.save_for_backward(x)
        ctx.beta = beta

    def _backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.dtl_kernels.theta_backward(grad, x, ctx.beta), None

    torch.library.register_autograd("dtl_kernels::theta", _backward, setup_context=_setup_context)


def theta(x: torch.Tensor, beta: float, backend: str = "auto") -> torch.Tensor:
    """High-β Swish, elementwise.

    Args:
        x: any shape, floating dtype, CPU or CUDA.
        beta: β (a Python number).
        backend: ``auto`` (compiled kernel when built for ``x``'s device, else reference),
            ``reference``, or ``compiled`` (error if not built).
    Returns:
        Tensor of ``x``'s shape and dtype (contiguous).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("theta expects a floating-point tensor")
    if backend == "reference":
        return reference.theta(x, beta)
    if backend not in ("auto", "compiled"):
        raise ValueError(f"unknown backend {backend!r} for theta (auto, reference, compiled)")
    built = _ext.cuda_built() if x.is_cuda else (_ext.cpu_built() and x.device.type == "cpu")
    if not built:
        if backend == "compiled":
            _ext.require_cuda() if x.is_cuda else _ext.require_cpu()
            raise _ext.BackendUnavailable(f"no compiled theta for device {x.device}")
        return reference.theta(x, beta)
    return torch.ops.dtl_kernels.theta(x, float(beta))
