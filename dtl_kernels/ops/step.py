"""One add-back step of the side network as ONE op: the taps of the blocks since the previous
add-back, then the fused side op (``dtl_kernels::side_step``, ``csrc/step.cpp``).

::

    taps_out = taps with columns [first_col, first_col + Σ r_j) set to inputs[j] · downs[j]ᵀ
    out      = y + mix(taps_out · upsᵀ)            (the side op, :mod:`dtl_kernels.ops.side`)

Why one op: at the batch sizes where a GPU waits for the host, a DTL forward is a chain of
small calls, and each Python-level call (a tap's matmul, a buffer write, the side op's
argument handling) costs as much host time as the work it launches. This op takes the
whole step in one call and, in training, one autograd node whose backward runs
``side_backward`` and the taps' two matmuls in C++ (gradients in ``csrc/step.cpp``'s
header). The call goes through ``dtl_kernels._C_bind``'s direct entry where it is built:
``torch.ops``' generic argument converter costs about as much host time as the op. The
taps are computed in the dtype of ``taps`` (bfloat16 under bf16 autocast, as a matmul
there is); ``save_dtype`` keeps inputs that need no gradient in that dtype for
``∂downs`` (the ``trunk_dtype`` memory option).

Shapes: ``y`` ``(B, N, d)``; ``taps`` ``(B, N, K)``; ``inputs[j]`` ``(B, N, d_j)``;
``downs[j]`` ``(r_j, d_j)``; ``ups`` ``(d, K)``; ``conv_weight`` ``(d, 1, k, k)`` or
``None``. ``kernel``: the :class:`~dtl_kernels.ops.side.Backend` whose kernels run the side
op (``"cpu"``, ``"cuda"`` or ``"triton"``; see :data:`STEP_KERNELS`).
"""

from __future__ import annotations

import torch

from . import _ext

#: backend name → the kernel id of ``side_step`` (0: the compiled ops, 1: Triton's)
STEP_KERNELS = {"cpu": 0, "cuda": 0, "triton": 1}


def side_step(
    y: torch.Tensor,
    taps: torch.Tensor,
    inputs: list[torch.Tensor],
    downs: list[torch.Tensor],
    first_col: int,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid: tuple[int, int] | None,
    num_prefix: int,
    beta: float,
    backend: str,
    save_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, taps_out)`` of one add-back step (module docstring); differentiable in every
    tensor. ``grid``: the patch grid ``(H, W)`` for DTL+, else ignored."""
    args = _op_args(y, taps, inputs, downs, first_col, ups, conv_weight, grid, num_prefix, beta,
                    backend)  # fmt: skip
    return _call("side_step", (*args, save_dtype))


def side_step_(
    y: torch.Tensor,
    taps: torch.Tensor,
    inputs: list[torch.Tensor],
    downs: list[torch.Tensor],
    first_col: int,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid: tuple[int, int] | None,
    num_prefix: int,
    beta: float,
    backend: str,
) -> torch.Tensor:
    """:func:`side_step` for a pass that records no gradient: the new taps are written into
    ``taps`` itself (contiguous, the caller's own buffer, never one it shares), and ``out``
    is returned. Refused where autograd would record it (``no_grad`` / ``inference_mode``
    only). One copy of the stage's taps per pass instead of one per add-back."""
    args = _op_args(y, taps, inputs, downs, first_col, ups, conv_weight, grid, num_prefix, beta,
                    backend)  # fmt: skip
    return _call("side_step_", args)


def _op_args(y, taps, inputs, downs, first_col, ups, conv_weight, grid, num_prefix, beta,
             backend) -> tuple:  # fmt: skip
    """The twelve arguments both ops share, positionally."""
    gh, gw = grid if conv_weight is not None else (0, 0)
    if backend == "triton":
        from . import triton_side  # noqa: F401  (registers the kernels the steps call)
    return (y, taps, inputs, downs, first_col, ups, conv_weight, gh, gw, num_prefix, beta,
            STEP_KERNELS[backend])  # fmt: skip


def _call(name: str, args: tuple):
    """The op ``name`` through the direct entry where it takes these arguments (without
    torch.ops' converter; NotImplemented: not the plain case, csrc/bind), else torch.ops."""
    if _ext.BINDING is not None and not torch.compiler.is_compiling():
        got = getattr(_ext.BINDING, name)(*args)
        if got is not NotImplemented:
            return got
    return getattr(torch.ops.dtl_kernels, name).default(*args)


def _fake_side_step(y, taps, inputs, downs, first_col, ups, conv_weight, grid_h, grid_w,
                    num_prefix, beta, kernel, save_dtype=None):  # fmt: skip
    if len(inputs) != len(downs) or taps.dim() != 3 or y.dim() != 3:
        raise ValueError("side_step: inputs and downs must pair up; y and taps must be 3-D")
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        torch.empty_like(taps, memory_format=torch.contiguous_format),
    )


def _fake_side_step_(y, taps, inputs, downs, first_col, ups, conv_weight, grid_h, grid_w,
                     num_prefix, beta, kernel):  # fmt: skip
    _fake_side_step(y, taps, inputs, downs, first_col, ups, conv_weight, grid_h, grid_w,
                    num_prefix, beta, kernel)  # fmt: skip
    if not taps.is_contiguous():
        raise ValueError("side_step_: taps must be contiguous")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _fake_write_taps(taps, inputs, downs, first_col):
    return None


if _ext.cpu_built():
    torch.library.register_fake("dtl_kernels::side_step")(_fake_side_step)
    torch.library.register_fake("dtl_kernels::side_step_")(_fake_side_step_)
    torch.library.register_fake("dtl_kernels::write_taps_")(_fake_write_taps)
