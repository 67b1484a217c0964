"""Fused side op ``out = y + mix(T·Uᵀ)`` on Triton: the registered ops and their launchers.

The kernels and their design are in :mod:`dtl_kernels.ops.triton_kernels`; the tiles,
grids and temporaries per shape in :mod:`dtl_kernels.ops.triton_plan`; Triton's launch
after the first one of a launch spec in :mod:`dtl_kernels.ops.triton_launch`.

Shapes (as every backend, see :mod:`dtl_kernels.ops.side`): ``y`` ``(B, N, d)`` block
output; ``taps`` ``T`` ``(B, N, K)`` concatenated rank-r taps (``K = i·r``, a few dozen at
most); ``ups`` ``U`` ``(d, K)``; ``conv_weight`` ``w`` ``(d, 1, k, k)`` or ``None`` (DTL);
``grid = (H, W)`` with ``H·W = N − num_prefix`` for DTL+. ``y`` (``grad_out``) and
``conv_weight`` share one floating dtype (float32, float16, bfloat16; float64 computes in
float64, for ``gradcheck``); ``taps`` and ``ups`` share ``y``'s dtype or, beside a float32
``y``, bfloat16 / float16 (the autocast mix, :func:`contract.side_dtypes_ok`). Math in fp32
(fp64 for fp64), stores in each output's own dtype.

Only ``taps``, ``ups`` and ``conv_weight`` are saved for backward (not ``h``, not ``y``).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import _env
from . import _ext, contract, triton_kernels, triton_launch
from .triton_kernels import tl, triton
from .triton_plan import BWD_CTAS_PER_SM, TEMP_FLOOR, TEMP_SHARE, plan  # noqa: F401 (API)

OP_FORWARD = "dtl_kernels::triton_side_forward"
OP_BACKWARD = "dtl_kernels::triton_side_backward"


def available() -> bool:
    """Whether Triton is importable (launching needs CUDA tensors or ``TRITON_INTERPRET=1``)."""
    return triton is not None


def forward(args: contract.SideArgs) -> torch.Tensor:
    """``y + mix(taps · upsᵀ)`` on the Triton kernels, differentiable in every tensor."""
    return _forward_op(*args.kernel_args())


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the kernels were defined by Triton's interpreter (decided at import time)."""
    return type(triton_kernels._fwd_kernel).__name__ == "InterpretedFunction"


def _require_launchable(x: torch.Tensor) -> None:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    if triton is None:
        raise _ext.BackendUnavailable("the triton backend needs `pip install triton`")
    if not x.is_cuda and not _interpreted():
        raise _ext.BackendUnavailable(
            "the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
            "set before dtl_kernels.ops.triton_kernels is first imported)"
        )


_SM_COUNT: dict = {}


def _plan_for(
    x: torch.Tensor,
    taps: torch.Tensor,
    k: int,
    grid_h: int,
    grid_w: int,
    deterministic: bool = False,
) -> dict:
    bsz, n, d = x.shape
    kw = taps.shape[2]
    sms = 132
    if x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]
    grid = (grid_h, grid_w) if k else None
    # called on a miss of the launch-spec cache only (_launch_spec), which keeps the result
    return plan(bsz, n, d, kw, k, grid, x.dtype, x.device.type, sms, taps.dtype, deterministic)


def deterministic_mode() -> bool:
    """Whether the backward runs without atomics (bit-identical runs):
    ``torch.use_deterministic_algorithms(True)`` or ``DTL_KERNELS_DETERMINISTIC=1``."""
    return torch.are_deterministic_algorithms_enabled() or (
        _env.get("DTL_KERNELS_DETERMINISTIC", "0") not in ("", "0")
    )


def _native_dot(x: torch.Tensor) -> bool:
    """16-bit dots straight on the tensor cores (``x``: the taps, whose dtype the ups share;
    16-bit also beside a float32 ``y``). On CUDA for float16 and bfloat16; under the
    interpreter for float16 only (triton 3.8's interpreter computes wrong bfloat16 dots, so
    bfloat16 takes the fp32 path there; float16 runs the split path as on GPU)."""
    return x.dtype == torch.float16 or (x.is_cuda and x.dtype == torch.bfloat16)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_NO_DEVICE_SWITCH = contextlib.nullcontext()  # reusable: holds no state


def _device_of(x: torch.Tensor):
    """Launch on the tensors' device, whatever the current device is. The switch (a
    ``torch.cuda.device`` guard: two device exchanges per launch) only where the tensors
    are not on the current device."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NO_DEVICE_SWITCH


def _launch(cfg: dict, args: tuple, consts: dict) -> None:
    # through Triton's JIT the first time per plan and alignment, then directly (the
    # arguments as one tuple and one dict: nothing packed again per launch)
    triton_launch.launch(getattr(triton_kernels, cfg["kernel"]), cfg, args, consts)


def _consts(x: torch.Tensor, taps: torch.Tensor, row_tensors: tuple) -> dict:
    """The launch constants that depend on dtype, device and strides (not on the plan)."""
    n = x.shape[1]
    return dict(
        NATIVE_DOT=_native_dot(taps),  # the rank-K dots take the taps' / ups' dtype
        ACC=_acc_dtype(x.dtype),
        T_VEC=_t_vec(taps),
        FLAT=all(t.shape[0] == 1 or t.stride(0) == n * t.stride(1) for t in row_tensors),
        FAST=x.is_cuda and x.dtype != torch.float64,
    )


def _t_vec(taps: torch.Tensor) -> int:
    """Elements per 16 bytes if every taps row starts 16-byte aligned (vector loads)."""
    vec = 16 // taps.element_size()
    sb, sn, sk = taps.stride()
    return vec if sk == 1 and sn % vec == 0 and sb % vec == 0 else 1


# What a launch needs besides the tensors' data (the contract's checks, the plan, the launch
# constants, the sizes of the temporaries) depends only on shapes, strides, dtypes, devices
# and the scalars: worked out once per such key (~20 µs of host time per call otherwise). A
# key that fails the checks raises and is never stored (so a NaN β is refused each time).
# Through _C_bind's bridge the key comes with the call (``key``: bytes that hold all of the
# above, csrc/bind/launcher_bridge.cpp), which saves building it here from a dozen tensor
# attributes at every launch. β enters the key as the float the launches are given (the
# spec keeps it): a β that is not a float (a 0-dim tensor, changed in place) is read anew.
_SPECS: dict = {}
_MAX_SPECS = 4096


def _launch_spec(op, y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta, det=False,
                 key=None):  # fmt: skip
    """``(k, plan, consts)`` for ``op`` on these inputs (``plan`` / ``consts`` ``None`` when
    ``y`` is empty); ``y`` may be ``grad_out``; ``key``: the bridge's key of this call."""
    if key is None:
        w = None if conv_weight is None else (conv_weight.shape, conv_weight.dtype,
                                              conv_weight.device)  # fmt: skip
        key = (op, y.shape, y.stride(), y.dtype, y.device, taps.shape, taps.stride(),
               taps.dtype, taps.device, ups.shape, ups.dtype, ups.device, w, grid_h, grid_w,
               num_prefix, float(beta), det)  # fmt: skip
    else:
        key = (key, det)
    spec = _SPECS.get(key)
    if spec is not None:
        return spec
    k = contract.check_kernel_inputs(
        op, y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta
    )
    if y.numel() == 0:
        return k, None, None  # nothing to launch (and not stored: no plan for empty shapes)
    _require_launchable(y)
    p = _plan_for(y, taps, k, grid_h, grid_w, det)
    if not _interpreted():  # (launch() checks triton_launch.ENABLED per call)
        for launch in ("fwd", "bwd", "finish"):  # each keeps its compiled kernels
            p[launch][triton_launch.CACHE_KEY] = triton_launch.CompiledLaunches()
    consts = _consts(y, taps, (y, taps))  # the outputs are contiguous: FLAT as for y
    if op == "triton_side_backward":
        consts["SGN"] = y.stride(1) if k else 0
    # what the launchers pass besides the tensors, fixed by the key: the arguments of
    # _forward_buffers / _backward_buffers, the strides of y (or grad_out), taps and the
    # contiguous outputs, the launches' sizes and β
    bsz, n, d = y.shape
    kw = taps.shape[2]
    rows = bsz * n
    acc = _acc_torch(y.dtype)
    p["fwd_buffers"] = (math.prod(p["fwd_scratch"]) if p["fwd_scratch"] else 0, acc)
    zero_taps = p["bwd"]["meta"]["SPLIT"] > 1 and taps.dtype == acc  # ∂T added up in place
    tbuf_start = p["bwd_slots"] * d * (kw + k * k) if p["bwd_tbuf"] else 0
    p["bwd_buffers"] = (zero_taps, p["bwd_buffer"][0], tbuf_start, acc)
    p["strides"] = (y.stride(), taps.stride(), (n * d, d, 1))  # y / grad_out, taps, out
    p["fwd_ints"] = (rows, n, d, kw, float(beta)) if k == 0 else (rows, d, kw, float(beta))
    p["bwd_ints"] = (rows, n, d, kw, float(beta))
    p["finish_ints"] = (p["bwd_slots"], d, kw, k * k, rows * kw if p["bwd_tbuf"] else 0)
    p["finish_consts"] = {"ACC": _acc_dtype(y.dtype)}
    if len(_SPECS) >= _MAX_SPECS:
        _SPECS.clear()
    _SPECS[key] = spec = (k, p, consts)
    return spec


def _forward_buffers_py(y, scratch_numel, acc):
    """``(out, scratch)``: ``out`` like ``y``, contiguous; ``scratch`` ``acc`` elements."""
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        torch.empty(scratch_numel, dtype=acc, device=y.device),
    )


def _backward_buffers_py(grad_out, taps, ups, conv_weight, zero_taps, buf_numel, tbuf_start,
                         acc):  # fmt: skip
    """``(grad_taps, grad_ups, grad_conv, buf, tbuf)``: the gradients like ``taps`` /
    ``ups`` / ``conv_weight``, contiguous (``grad_taps`` zeroed if ``zero_taps``;
    ``grad_conv`` empty for DTL); ``buf`` zeroed ``acc`` elements, ``tbuf`` its tail from
    ``tbuf_start`` (``buf`` itself at 0)."""
    new = torch.zeros_like if zero_taps else torch.empty_like
    grad_taps = new(taps, memory_format=torch.contiguous_format)
    grad_ups = torch.empty_like(ups, memory_format=torch.contiguous_format)
    if conv_weight is not None:
        grad_conv = torch.empty_like(conv_weight, memory_format=torch.contiguous_format)
    else:
        grad_conv = grad_out.new_empty((0,))
    buf = torch.zeros(buf_numel, dtype=acc, device=grad_out.device)
    return grad_taps, grad_ups, grad_conv, buf, (buf[tbuf_start:] if tbuf_start else buf)


# The same allocations in one C++ call each where _C_bind is built (csrc/bind/
# launch_buffers.cpp: a torch call costs ~1 µs of argument parsing per tensor, the C++
# call ~0.4 µs per tensor: 4.5 → 1.9 µs for the backward's five)
_forward_buffers = getattr(_ext.BINDING, "forward_buffers", _forward_buffers_py)
_backward_buffers = getattr(_ext.BINDING, "backward_buffers", _backward_buffers_py)


def side_fwd(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    beta: float,
    key: bytes | None = None,
) -> torch.Tensor:
    """Launch the forward kernel; returns ``out`` ``(B, N, d)`` in ``y``'s dtype. ``key``:
    the bridge's key of this call (the launch spec's cache key), else built here."""
    k, p, consts = _launch_spec(
        "triton_side_forward", y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta,
        key=key,
    )  # fmt: skip
    if p is None:  # y is empty: nothing to launch
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    out, scratch = _forward_buffers(y, *p["fwd_buffers"])  # (B, N, d) contiguous; ACC scratch
    ups_c = ups.contiguous()
    ys, ts, outs = p["strides"]
    with _device_of(y):
        if k == 0:
            _launch(p["fwd"], (y, *ys, taps, *ts, ups_c, out, *outs, *p["fwd_ints"]), consts)
        else:
            w = conv_weight.contiguous()  # read as (d, k²) in place: no per-call transposed copy
            _launch(p["fwd"], (y, *ys, taps, *ts, ups_c, w, out, *outs, scratch,
                               *p["fwd_ints"]), consts)  # fmt: skip
    return out


def side_bwd(
    grad_out: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    beta: float,
    key: bytes | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; returns ``(grad_taps, grad_ups, grad_conv)`` in the
    dtypes of ``taps``, ``ups`` and ``conv_weight`` (``grad_conv`` empty for DTL).
    Bit-identical runs in :func:`deterministic_mode`, else fp32 atomics. ``key``: as for
    :func:`side_fwd`."""
    k, p, consts = _launch_spec(
        "triton_side_backward", grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix,
        beta, deterministic_mode(), key,
    )  # fmt: skip
    if p is None:  # grad_out is empty
        grad_conv = conv_weight.new_zeros(conv_weight.shape) if k else grad_out.new_empty((0,))
        return taps.new_zeros(taps.shape), ups.new_zeros(ups.shape), grad_conv
    ups_c = ups.contiguous()
    w = conv_weight.contiguous() if k else ups_c  # read as (d, k²) in place (DTL: a dummy)
    # ∂T: written once per row tile, or (d split over programs) added up by atomics: into
    # the zeroed output when it is ACC, else into the tail of the buffer (cast at the end)
    grad_taps, grad_ups, grad_conv, buf, tbuf = _backward_buffers(
        grad_out, taps, ups, conv_weight if k else None, *p["bwd_buffers"]
    )
    gs, ts, _ = p["strides"]
    with _device_of(grad_out):
        _launch(p["bwd"], (grad_out, *gs, taps, *ts, ups_c, w,
                           tbuf if p["bwd_tbuf"] else grad_taps, buf, *p["bwd_ints"]),
                consts)  # fmt: skip
        _launch(p["finish"], (buf, grad_ups, grad_conv if k else grad_ups, tbuf, grad_taps,
                              *p["finish_ints"]), p["finish_consts"])  # fmt: skip
    return grad_taps, grad_ups, grad_conv


# --------------------------------------------------------------------------------------
# Registered ops + autograd
# --------------------------------------------------------------------------------------


# Defined with torch.library.Library rather than custom_op: the dispatcher then calls the
# launchers directly, without custom_op's per-call wrapper and output-aliasing checks (host
# time that every add-back paid twice). The launchers are the CPU / CUDA kernels through
# _C_bind's bridge where it is built (csrc/bind/launcher_bridge.cpp: the arguments wrapped by
# hand, not boxed), else through torch.library's Python kernels. CPU tensors run the same
# kernels through Triton's interpreter (TRITON_INTERPRET=1).
_LIB = torch.library.Library("dtl_kernels", "FRAGMENT")
_SCHEMA = (
    "(Tensor y, Tensor taps, Tensor ups, Tensor? conv_weight, int grid_h, int grid_w, "
    "int num_prefix, float beta)"
)
_LIB.define(f"triton_side_forward{_SCHEMA} -> Tensor")
_LIB.define(f"triton_side_backward{_SCHEMA.replace('Tensor y', 'Tensor grad_out')} "
            "-> (Tensor, Tensor, Tensor)")  # fmt: skip
#: how the launchers are registered: "bridge" (_C_bind) or "torch.library"
LAUNCHER_PATH = "bridge" if hasattr(_ext.BINDING, "register_launchers") else "torch.library"
_CPU_LIB: torch.library.Library | None = None  # torch.library path: the CPU kernels


def _register_launchers(cpu: bool) -> None:
    """The launchers as the ops' CUDA kernels, and as their CPU kernels with ``cpu``: where
    the interpreter defined the kernels (else a CPU call is refused before a step writes its
    taps, csrc/step.cpp, and by the dispatcher for a direct call), or while the benchmarks'
    recording driver stands in for a GPU (``benchmarks/triton_fake_driver.py``). Called
    again, it replaces what the last call registered."""
    global _CPU_LIB
    if LAUNCHER_PATH == "bridge":  # (the bridge replaces a pair it registered before)
        _ext.BINDING.register_launchers("triton_side_forward", side_fwd,
                                        "triton_side_backward", side_bwd, cpu)  # fmt: skip
        return
    if _CPU_LIB is not None:
        _CPU_LIB._destroy()
        _CPU_LIB = None
    if cpu:
        _CPU_LIB = torch.library.Library("dtl_kernels", "IMPL")
        _CPU_LIB.impl("triton_side_forward", side_fwd, "CPU")
        _CPU_LIB.impl("triton_side_backward", side_bwd, "CPU")


if LAUNCHER_PATH == "torch.library":  # the CUDA kernels, once (the CPU ones just above)
    _LIB.impl("triton_side_forward", side_fwd, "CUDA")
    _LIB.impl("triton_side_backward", side_bwd, "CUDA")
#: whether the launchers are the ops' CPU kernels too (as imported: under the interpreter)
_CPU = triton is not None and _interpreted()
_register_launchers(_CPU)
_forward_op = torch.ops.dtl_kernels.triton_side_forward.default
_backward_op = torch.ops.dtl_kernels.triton_side_backward.default

contract.register_fakes("triton_side_forward", OP_FORWARD, "triton_side_backward", OP_BACKWARD)
contract.register_python_autograd(OP_FORWARD, _backward_op)
