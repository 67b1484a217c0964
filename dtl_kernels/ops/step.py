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

from . import _ext, compiled_side  # noqa: F401 (the side op's fakes: a traced step reaches it)
from .contract import check_kernel_inputs, side_dtypes_ok

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
    gh, gw = grid if conv_weight is not None else (0, 0)
    args = (y, taps, inputs, downs, first_col, ups, conv_weight, gh, gw, num_prefix, beta,
            _kernel_id(backend), save_dtype)  # fmt: skip
    return _call(_ext.BINDING.side_step if _direct() else None, "side_step", args)


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
    next_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`side_step` for a pass that records no gradient: the new taps are written into
    ``taps`` itself (contiguous, the caller's own buffer, never one it shares), and ``out``
    is returned. Refused where autograd would record it (``no_grad`` / ``inference_mode``
    only). One copy of the stage's taps per pass instead of one per add-back.

    ``next_down`` ``(r', d)``: also the next block's tap, ``out · next_downᵀ``, into the
    ``r'`` columns after those just written (``out`` is that block's input), so that block
    needs no tap call of its own."""
    run = bind_side_step_(ups, conv_weight, grid, num_prefix, beta, backend)
    return run(y, taps, inputs, downs, first_col, next_down)


def bind_side_step_(
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid: tuple[int, int] | None,
    num_prefix: int,
    beta: float,
    backend: str,
):
    """:func:`side_step_` with the arguments that stay the same over a stage bound:
    ``run(y, taps, inputs, downs, first_col, next_down=None) -> out``. What a no-grad pass
    calls at each add-back (the argument handling is done once per stage, not per step)."""
    gh, gw = grid if conv_weight is not None else (0, 0)
    kernel = _kernel_id(backend)
    if kernel == 1 and ups.device.type in ("cpu", "cuda"):  # before a step writes the taps:
        from . import triton_side  # Triton installed, CPU tensors only under its interpreter

        triton_side._require_launchable(ups)
    direct = _ext.BINDING.side_step_ if _direct() else None

    def run(y, taps, inputs, downs, first_col, next_down=None):
        args = (y, taps, inputs, downs, first_col, ups, conv_weight, gh, gw, num_prefix, beta,
                kernel, next_down)  # fmt: skip
        if direct is not None:  # _call, one Python call less: it runs at every add-back
            got = direct(*args)
            if got is not NotImplemented:
                return got
        return torch.ops.dtl_kernels.side_step_.default(*args)

    return run


_triton_registered = False  # triton_side imported (an import statement per step: ~1 µs)


def _kernel_id(backend: str) -> int:
    global _triton_registered
    if backend not in STEP_KERNELS:
        raise ValueError(f"backend must be one of {tuple(STEP_KERNELS)} (a step's kernels), "
                         f"got {backend!r}")  # fmt: skip
    if backend == "triton" and not _triton_registered:
        from . import triton_side  # noqa: F401  (registers the kernels the steps call)

        _triton_registered = True
    return STEP_KERNELS[backend]


def _direct() -> bool:
    """Whether the direct entry may be tried (torch.compile cannot trace into it)."""
    return _ext.BINDING is not None and not torch.compiler.is_compiling()


def _call(direct, name: str, args: tuple):
    """The op ``name`` through its direct entry ``direct`` (not torch.ops' argument
    converter) where given and it takes these arguments (NotImplemented: not the plain
    case, csrc/bind), else through torch.ops."""
    if direct is not None:
        got = direct(*args)
        if got is not NotImplemented:
            return got
    return getattr(torch.ops.dtl_kernels, name).default(*args)


def _check_fake_step(op: str, taps, inputs, downs, first_col: int, others) -> None:
    """What the kernels check before they write (csrc/side_checks.h's check_taps_inputs),
    for the fake (and Meta) kernels: one meta tensor among CPU ones sends a CPU call here,
    where returning empty tensors would be a silently wrong result."""
    if len(inputs) != len(downs) or taps.dim() != 3:
        raise ValueError(f"{op}: inputs and downs must pair up; taps must be 3-D")
    devices = {str(t.device) for t in (taps, *inputs, *downs, *others) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: every tensor must be on one device, got {sorted(devices)}")
    end = first_col + sum(a.shape[0] for a in downs if a.dim() == 2)
    if not 0 <= first_col <= end <= taps.shape[2]:
        raise ValueError(f"{op}: the taps' columns {first_col}..{end} are not inside "
                         f"0..{taps.shape[2]}")  # fmt: skip


def _check_fake_side_op(op, y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta) -> None:
    """The step's side op's checks (β, grid, shapes), on its arguments in the dtypes the
    step hands them over in (csrc/step.cpp's side_dtype): what the run would refuse."""
    for name, t in (("y", y), ("ups", ups), ("conv_weight", conv_weight)):
        if t is not None and not t.is_floating_point():  # cast silently below otherwise
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    side = taps.dtype if side_dtypes_ok(y.dtype, taps.dtype) else y.dtype
    conv = None if conv_weight is None else conv_weight.to(y.dtype)
    check_kernel_inputs(op, y, taps.to(side), ups.to(side), conv, grid_h, grid_w, num_prefix,
                        beta)  # fmt: skip


def _check_fake_step_op(op, y, taps, inputs, downs, first_col, ups, conv_weight, grid_h,
                        grid_w, num_prefix, beta, kernel) -> None:  # fmt: skip
    """What both step ops' kernels refuse, named after ``op``."""
    if y.dim() != 3:
        raise ValueError(f"{op}: y must be 3-D")
    if kernel not in (0, 1):
        raise ValueError(f"{op}: kernel must be 0 or 1, got {kernel}")
    _check_fake_step(op, taps, inputs, downs, first_col, (y, ups, conv_weight))
    _check_fake_side_op(op, y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta)


def _fake_side_step(y, taps, inputs, downs, first_col, ups, conv_weight, grid_h, grid_w,
                    num_prefix, beta, kernel, save_dtype=None):  # fmt: skip
    _check_fake_step_op("side_step", y, taps, inputs, downs, first_col, ups, conv_weight,
                        grid_h, grid_w, num_prefix, beta, kernel)  # fmt: skip
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        torch.empty_like(taps, memory_format=torch.contiguous_format),
    )


def _fake_side_step_(y, taps, inputs, downs, first_col, ups, conv_weight, grid_h, grid_w,
                     num_prefix, beta, kernel, next_down=None):  # fmt: skip
    _check_fake_step_op("side_step_", y, taps, inputs, downs, first_col, ups, conv_weight,
                        grid_h, grid_w, num_prefix, beta, kernel)  # fmt: skip
    if next_down is not None and next_down.device != y.device:
        raise ValueError(f"side_step_: every tensor must be on one device, got "
                         f"{next_down.device} and {y.device}")  # fmt: skip
    if not taps.is_contiguous():
        raise ValueError("side_step_: taps must be contiguous")
    if next_down is not None:  # as csrc/step.cpp's next_tap_column
        left = taps.shape[2] - first_col - sum(a.shape[0] for a in downs)
        if next_down.dim() != 2 or next_down.shape[1] != y.shape[2]:
            raise ValueError(f"side_step_: next_down must be (r, d) with d = {y.shape[2]}")
        if not 1 <= next_down.shape[0] <= left:
            raise ValueError(f"side_step_: next_down must have 1 ≤ r ≤ {left} rows")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _fake_write_taps(taps, inputs, downs, first_col):
    _check_fake_step("write_taps_", taps, inputs, downs, first_col, ())


if _ext.cpu_built():
    torch.library.register_fake("dtl_kernels::side_step")(_fake_side_step)
    torch.library.register_fake("dtl_kernels::side_step_")(_fake_side_step_)
    torch.library.register_fake("dtl_kernels::write_taps_")(_fake_write_taps)
