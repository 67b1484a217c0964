"""Memory options of the DTL models (SPEC §2, "further levers"); both off by default.

``trunk_dtype``: a tap ``t_i = z_i · A_iᵀ`` on a trunk block (``i ≤ M``: its input ``z_i``
needs no gradient) makes autograd keep ``z_i`` (``rows × d``) only for
``∂L/∂A_i = (∂L/∂t_i)ᵀ · z_i``. :func:`low_precision_tap` keeps it in a lower dtype
(bfloat16) instead: half the bytes, and ``∂A_i`` gets bfloat16-rounded inputs (relative
error ~2⁻⁸ per element, averaged over rows).

``checkpoint_tail``: the frozen blocks after ``M`` run on inputs that need gradients, so
autograd stores their activations (attention, MLP) for the input-gradient pass.
:class:`CheckpointedBlock` keeps only the block input and recomputes the block in
backward (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so DropPath
draws the same mask): exact gradients, about one more forward of the tail.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
}


def resolve_trunk_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` (off), a floating ``torch.dtype`` or its name (``"bfloat16"``)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"trunk_dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
        return _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"trunk_dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


class _LowPrecisionTap(torch.autograd.Function):
    """``t = z · Aᵀ``, saving ``z`` in ``dtype`` for ``∂A = (∂t)ᵀ · z``.

    Gradients: ``∂L/∂A = Σ_rows (∂L/∂t)ᵀ z_low`` (in ∂t's dtype), ``∂L/∂z = (∂L/∂t) · A``
    (exact; only when ``z`` needs it, which the CSN avoids by using this for trunk taps).
    Written with ``setup_context`` and a generated vmap rule: ``torch.func`` transforms
    (``vmap``, ``grad``: per-sample gradients) take it as it is.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, down, dtype):
        return torch.matmul(z, down.t())

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, down, dtype = inputs
        ctx.save_for_backward(z.to(dtype), down)

    @staticmethod
    def backward(ctx, grad_t):
        z_low, down = ctx.saved_tensors
        grad_z = grad_down = None
        if ctx.needs_input_grad[1]:
            g2 = grad_t.reshape(-1, grad_t.shape[-1])
            grad_down = torch.matmul(g2.t(), z_low.reshape(-1, z_low.shape[-1]).to(g2.dtype))
            grad_down = grad_down.to(down.dtype)
        if ctx.needs_input_grad[0]:
            grad_z = torch.matmul(grad_t, down.to(grad_t.dtype))
        return grad_z, grad_down, None


def low_precision_tap(z: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tap ``z · downᵀ`` (``z``: ``(..., d)``, ``down``: ``(r, d)``) that keeps ``z`` in
    ``dtype`` for backward. Same forward value as :func:`dtl_kernels.ops.reference.tap`."""
    return _LowPrecisionTap.apply(z, down, dtype)


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under ``torch.utils.checkpoint`` when its input needs a gradient.

    Not registered in the model that uses it (state dicts are unchanged): it only holds
    a reference to the backbone's block.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self.block, x, *args, use_reentrant=False, **kwargs)
        return self.block(x, *args, **kwargs)


def checkpointed_tail(model: nn.Module, enabled: bool) -> list[CheckpointedBlock]:
    """Wrappers for the blocks after the first adapted one (0-based ``M … N-1``) of a DTL
    model, or ``[]`` when disabled or without a side network. Use with :func:`with_tail`."""
    if not enabled or getattr(model, "csn", None) is None:
        return []
    blocks = model.blocks  # the unwrapped list: model._tail is not set yet
    return [CheckpointedBlock(b) for b in blocks[model.csn.config.adapt_from :]]


def with_tail(blocks: list[nn.Module], tail: list[CheckpointedBlock]) -> list[nn.Module]:
    """``blocks`` with its last ``len(tail)`` entries replaced by the wrappers."""
    if tail:
        blocks[len(blocks) - len(tail) :] = tail
    return blocks


# -- frozen weights in low precision ---------------------------------------------------
def set_backbone_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> None:
    """Keep the frozen backbone's parameters and floating buffers in ``dtype`` (bfloat16 or
    float16); trainable ones (the CSN, the head, a trainable backbone head) stay in their
    dtype. DTL needs no fp32 master copy of weights it never updates: this halves the
    largest remaining part of its memory. The model then feeds the backbone ``dtype``
    images, and trainable modules get their inputs cast to their own dtype (a pre-hook).
    """
    dtype = resolve_trunk_dtype(dtype)
    if dtype is None:
        return
    backbone = model.backbone
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    if not frozen:
        raise ValueError(
            f"backbone_dtype keeps frozen weights in {dtype}; method {model.method!r} trains "
            "every backbone weight (use a DTL or linear method)"
        )
    for p in frozen:
        p.data = p.data.to(dtype)
    for module in backbone.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)
    for module in [model.get_submodule("head")] if hasattr(model, "head") else []:
        module.register_forward_pre_hook(_cast_inputs_to_own_dtype)
    for module in backbone.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(_cast_inputs_to_own_dtype)
    model.backbone_dtype = dtype


def _cast_inputs_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(
        a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
