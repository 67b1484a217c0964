"""Fused side op ``out = y + mix(T·Uᵀ)`` in Triton: kernels → launchers → registered op.

Shapes (as every backend, see :mod:`dtl_kernels.ops.side`): ``y`` ``(B, N, d)`` block
output; ``taps`` ``T`` ``(B, N, K)`` concatenated rank-r taps (``K = i·r``, a few dozen at
most); ``ups`` ``U`` ``(d, K)``; ``conv_weight`` ``w`` ``(d, 1, k, k)`` or ``None`` (DTL);
``grid = (H, W)`` with ``H·W = N − num_prefix`` for DTL+. ``y``, ``taps``, ``ups`` and
``conv_weight`` share one floating dtype (float32, float16, bfloat16; float64 computes in
float64, for ``gradcheck``). Math in fp32, stores in the I/O dtype.

Forward (SPEC §2). The side state ``h = T·Uᵀ`` is never materialised: each program
rebuilds the ``BLOCK_M × BLOCK_D`` tile of ``h`` it needs from the ``K``-wide taps with one
small ``tl.dot``. For DTL+ the depthwise ``k×k`` "same" convolution is a sum over the
``k²`` shifts ``s = (a − p, b − p)`` (``p = (k−1)//2``: PyTorch puts the extra pad of an
even ``k`` bottom/right) of ``w[:, a, b] · θ(h[q + s])``; the shifted ``h`` tiles are
rebuilt from shifted (masked, zero outside the grid) tap rows, so a forward costs
``(k² + 1)`` rank-``K`` dots per tile and no scratch memory.

Backward. With ``A = θ(h)`` and ``G = ∂L/∂out``::

    ∂L/∂y   = G                                   (residual, pass-through)
    D       = G                                   on prefix rows and for DTL
    D[q]    = Σ_ab w[:, a, b] · G[q − s_ab]        on patch rows (gᵀ, the transposed conv;
                                                    q − s_ab outside the grid contributes 0)
    S       = θ'(h) ⊙ D                           θ'(x) = σ(βx) + βx·σ(βx)(1 − σ(βx))
    ∂L/∂T   = S · U                               (B·N × K)
    ∂L/∂U   = Sᵀ · T                              (d × K)
    ∂L/∂w[:, a, b] = Σ_q G[q] ⊙ A[q + s_ab] = Σ_p A[p] ⊙ G[p − s_ab]   (over batch and grid)

The last form of ``∂L/∂w`` uses the same shifted ``G`` tiles as ``D``, so the backward
rebuilds only the centre tile of ``h`` (one dot) and gathers ``k²`` shifted tiles of ``G``.
Reductions over rows (``∂L/∂U``, ``∂L/∂w``) are deterministic: each program of a fixed
launch grid accumulates fp32 partials of its own row tiles in registers and writes them
to its own slot; the slots are summed afterwards by ``torch.sum`` (no atomics). ``∂L/∂T``
is reduced over ``d``; when ``d`` spans several ``BLOCK_D`` chunks, the per-chunk fp32
partials are summed the same way.

Only ``taps``, ``ups`` and ``conv_weight`` are saved for backward (not ``h``, not ``y``).
"""

from __future__ import annotations

import torch

from . import _ext

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; available() says False
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

OP_FORWARD = "dtl_kernels::triton_side_forward"
OP_BACKWARD = "dtl_kernels::triton_side_backward"


def available() -> bool:
    """Whether Triton is importable (launching needs CUDA tensors or ``TRITON_INTERPRET=1``)."""
    return triton is not None


def side_add(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """``y + mix(taps · upsᵀ)`` on the Triton kernels, differentiable in every input.

    Same contract as :func:`dtl_kernels.ops.reference.side_add`; see the module docstring.
    """
    if conv_weight is not None:
        if grid is None:
            raise ValueError("a convolution (DTL+) needs the patch grid (H, W)")
        grid_h, grid_w = int(grid[0]), int(grid[1])
    else:
        grid_h, grid_w = 0, 0
    return _forward_op(y, taps, ups, conv_weight, grid_h, grid_w, int(num_prefix), float(beta))


# --------------------------------------------------------------------------------------
# Kernels (defined only when triton is importable; TRITON_INTERPRET=1 must be set before
# this module is imported for them to run on CPU tensors)
# --------------------------------------------------------------------------------------


@_jit
def _theta(x, beta):
    # θ(x) = x·σ(βx); tl.sigmoid saturates to exactly 0 / 1, no NaN for large |βx|.
    return x * tl.sigmoid(beta * x)


@_jit
def _theta_grad(x, beta):
    # θ'(x) = s + βx·s·(1 − s), s = σ(βx); β multiplies last, as in side_math.h: for
    # |x| > max/β, βx is inf and inf·0 would be NaN where σ saturates.
    s = tl.sigmoid(beta * x)
    return s + beta * (x * s * (1.0 - s))


@_jit
def _rank_k_dot(t, u, NATIVE_DOT: tl.constexpr, ACC: tl.constexpr):
    # h tile = t @ u in ACC precision. t: (BLOCK_M, BLOCK_K), u: (BLOCK_K, BLOCK_D), both
    # in the I/O dtype. 16-bit inputs go to the tensor cores as they are (products are
    # exact, fp32 accumulation); fp32 / fp64 inputs use the exact ("ieee") path.
    if NATIVE_DOT:
        return tl.dot(t, u, out_dtype=ACC)
    else:
        return tl.dot(t.to(ACC), u.to(ACC), input_precision="ieee", out_dtype=ACC)


@_jit
def _side_fwd_kernel(
    y_ptr, stride_yb, stride_yn, stride_yd,  # (B, N, d) block output, any strides
    taps_ptr, stride_tb, stride_tn, stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous concatenated ups U
    w_ptr,  # (d, KSIZE·KSIZE) contiguous depthwise kernel (dummy when KSIZE == 0)
    out_ptr, stride_ob, stride_on, stride_od,  # (B, N, d) output, I/O dtype
    N, D, K,  # tokens per image, features, taps width
    num_prefix, grid_h, grid_w,  # prefix tokens, patch grid (used when KSIZE > 0)
    beta,  # Swish β (host float; cast to ACC here)
    tiles_per_batch,  # cdiv(N, BLOCK_M): axis 0 runs over B · tiles_per_batch
    KSIZE: tl.constexpr,  # conv size k; 0 = DTL (no conv)
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,  # tile; ≥ 16
    NATIVE_DOT: tl.constexpr,  # rank-K dot straight on 16-bit inputs
    ACC: tl.constexpr,  # compute dtype (fp32; fp64 for fp64 I/O)
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid_m // tiles_per_batch
    row0 = (pid_m % tiles_per_batch) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < D
    k_ok = ks < K
    beta = tl.cast(beta, ACC)

    # Uᵀ tile (BLOCK_K, BLOCK_D), shared by every shift.
    u_t = tl.load(ups_ptr + cols[None, :] * K + ks[:, None],
                  mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    taps_b = taps_ptr + b.to(tl.int64) * stride_tb
    ko = ks[None, :] * stride_tk

    if KSIZE == 0:
        t = tl.load(taps_b + rows[:, None].to(tl.int64) * stride_tn + ko,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        mixed = _theta(_rank_k_dot(t, u_t, NATIVE_DOT, ACC), beta)
    else:
        PAD: tl.constexpr = (KSIZE - 1) // 2
        is_patch = row_ok & (rows >= num_prefix)
        p = tl.maximum(rows - num_prefix, 0)
        pi = p // grid_w
        pj = p % grid_w
        mixed = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
        for ab in range(KSIZE * KSIZE):
            # out[q] += w[:, a, b] · θ(h[q + (a − PAD, b − PAD)])
            ni = pi + (ab // KSIZE - PAD)
            nj = pj + (ab % KSIZE - PAD)
            ok = is_patch & (ni >= 0) & (ni < grid_h) & (nj >= 0) & (nj < grid_w)
            nrow = num_prefix + ni * grid_w + nj
            t = tl.load(taps_b + nrow[:, None].to(tl.int64) * stride_tn + ko,
                        mask=ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols * (KSIZE * KSIZE) + ab, mask=col_ok, other=0.0)
            mixed += _theta(_rank_k_dot(t, u_t, NATIVE_DOT, ACC), beta) * w.to(ACC)[None, :]
        if row0 < num_prefix:  # prefix rows (class token …) get θ(h) only
            t = tl.load(taps_b + rows[:, None].to(tl.int64) * stride_tn + ko,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            act = _theta(_rank_k_dot(t, u_t, NATIVE_DOT, ACC), beta)
            mixed = tl.where(is_patch[:, None], mixed, act)

    mask = row_ok[:, None] & col_ok[None, :]
    ro = b.to(tl.int64) * stride_yb + rows[:, None].to(tl.int64) * stride_yn
    y = tl.load(y_ptr + ro + cols[None, :] * stride_yd, mask=mask, other=0.0)
    out = y.to(ACC) + mixed
    oo = b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_on
    tl.store(out_ptr + oo + cols[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _side_bwd_kernel(
    g_ptr, stride_gb, stride_gn, stride_gd,  # (B, N, d) grad of out, any strides
    taps_ptr, stride_tb, stride_tn, stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous ups U
    w_ptr,  # (d, KSIZE·KSIZE) contiguous depthwise kernel (dummy when KSIZE == 0)
    gtaps_ptr,  # (n_dchunks, B, N, K) ACC partials of ∂L/∂T, one slab per d chunk
    gups_ptr,  # (P, d, K) ACC partials of ∂L/∂U, one slab per program row
    gw_ptr,  # (P, d, BLOCK_KK) ACC partials of ∂L/∂w (only when KSIZE > 0)
    N, D, K,  # tokens per image, features, taps width
    num_prefix, grid_h, grid_w,  # prefix tokens, patch grid
    beta,  # Swish β
    tiles_per_batch, total_tiles,  # cdiv(N, BLOCK_M); B · tiles_per_batch
    part_stride,  # B · N · K: elements per d-chunk slab of gtaps_ptr
    KSIZE: tl.constexpr,  # conv size k; 0 = DTL
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KK: tl.constexpr,  # next_pow2(k²) columns of the ∂L/∂w accumulator
    NATIVE_DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # Axis 0: P programs, each walking row tiles pid, pid + P, … (a fixed order, so the
    # fp32 partials it accumulates are deterministic). Axis 1: the d chunk.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < D
    k_ok = ks < K
    beta = tl.cast(beta, ACC)

    u_t = tl.load(ups_ptr + cols[None, :] * K + ks[:, None],
                  mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # Uᵀ (BK, BD)
    u_acc = tl.trans(u_t).to(ACC)  # U chunk (BD, BK) for S·U
    ko = ks[None, :] * stride_tk
    acc_u = tl.zeros((BLOCK_D, BLOCK_K), dtype=ACC)
    acc_w = tl.zeros((BLOCK_D, BLOCK_KK), dtype=ACC)
    kk = tl.arange(0, BLOCK_KK)

    for tile in range(pid, total_tiles, n_prog):
        b = tile // tiles_per_batch
        rows = (tile % tiles_per_batch) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        taps_b = taps_ptr + b.to(tl.int64) * stride_tb
        g_b = g_ptr + b.to(tl.int64) * stride_gb
        t = tl.load(taps_b + rows[:, None].to(tl.int64) * stride_tn + ko,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        h = _rank_k_dot(t, u_t, NATIVE_DOT, ACC)
        g = tl.load(g_b + rows[:, None].to(tl.int64) * stride_gn + cols[None, :] * stride_gd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        if KSIZE == 0:
            dmix = g
        else:
            PAD: tl.constexpr = (KSIZE - 1) // 2
            is_patch = row_ok & (rows >= num_prefix)
            p = tl.maximum(rows - num_prefix, 0)
            pi = p // grid_w
            pj = p % grid_w
            act = _theta(h, beta)
            dmix = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
            for ab in range(KSIZE * KSIZE):
                # G[p − s_ab], s_ab = (a − PAD, b − PAD): feeds gᵀ(G) and ∂L/∂w[:, a, b].
                qi = pi - (ab // KSIZE - PAD)
                qj = pj - (ab % KSIZE - PAD)
                ok = is_patch & (qi >= 0) & (qi < grid_h) & (qj >= 0) & (qj < grid_w)
                qrow = num_prefix + qi * grid_w + qj
                gs = tl.load(g_b + qrow[:, None].to(tl.int64) * stride_gn
                             + cols[None, :] * stride_gd,
                             mask=ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
                w = tl.load(w_ptr + cols * (KSIZE * KSIZE) + ab, mask=col_ok, other=0.0)
                dmix += gs * w.to(ACC)[None, :]
                part = tl.sum(act * gs, axis=0)  # (BD,) Σ_p A[p] G[p − s_ab]
                acc_w += tl.where(kk[None, :] == ab, part[:, None], 0.0)
            dmix = tl.where(is_patch[:, None], dmix, g)  # prefix rows: θ only
        s = _theta_grad(h, beta) * dmix  # zero on masked rows / cols
        gt = tl.dot(s, u_acc, input_precision="ieee", out_dtype=ACC)  # (BM, BK) S·U
        gt_row = pid_d.to(tl.int64) * part_stride + (b.to(tl.int64) * N + rows[:, None]) * K
        tl.store(gtaps_ptr + gt_row + ks[None, :], gt, mask=row_ok[:, None] & k_ok[None, :])
        acc_u += tl.dot(tl.trans(s), t.to(ACC), input_precision="ieee", out_dtype=ACC)

    slot = pid.to(tl.int64) * D + cols[:, None]
    tl.store(gups_ptr + slot * K + ks[None, :], acc_u, mask=col_ok[:, None] & k_ok[None, :])
    if KSIZE > 0:
        tl.store(gw_ptr + slot * BLOCK_KK + kk[None, :], acc_w, mask=col_ok[:, None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

_SIDE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check(
    name: str,
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
) -> int:
    """Validate the side-op inputs; return the conv size ``k`` (0 for DTL)."""
    if y.dim() != 3 or taps.dim() != 3 or ups.dim() != 2:
        raise ValueError(
            f"{name}: expected y (B, N, d), taps (B, N, K), ups (d, K); got "
            f"{tuple(y.shape)}, {tuple(taps.shape)}, {tuple(ups.shape)}"
        )
    bsz, n, d = y.shape
    kw = taps.shape[2]
    if tuple(taps.shape[:2]) != (bsz, n) or tuple(ups.shape) != (d, kw):
        raise ValueError(
            f"{name}: shapes disagree: y {tuple(y.shape)}, taps {tuple(taps.shape)}, "
            f"ups {tuple(ups.shape)} (need taps (B, N, K), ups (d, K))"
        )
    tensors = [y, taps, ups] + ([conv_weight] if conv_weight is not None else [])
    if any(t.dtype != y.dtype for t in tensors) or y.dtype not in _SIDE_DTYPES:
        raise TypeError(
            f"{name}: y, taps, ups, conv_weight must share one dtype of float32/float16/"
            f"bfloat16/float64; got {[t.dtype for t in tensors]}"
        )
    if any(t.device != y.device for t in tensors):
        raise ValueError(f"{name}: inputs on different devices {[t.device for t in tensors]}")
    if conv_weight is None:
        return 0
    k = conv_weight.shape[-1]
    if conv_weight.dim() != 4 or tuple(conv_weight.shape) != (d, 1, k, k) or k < 1:
        raise ValueError(f"{name}: conv_weight must be (d, 1, k, k) = ({d}, 1, k, k), got "
                         f"{tuple(conv_weight.shape)}")
    if num_prefix < 0 or grid_h < 1 or grid_w < 1 or n - num_prefix != grid_h * grid_w:
        raise ValueError(
            f"{name}: {n} tokens do not hold {num_prefix} prefix tokens plus a "
            f"{grid_h}x{grid_w} patch grid"
        )
    return k


def _interpreted() -> bool:
    """Whether the kernels were defined by Triton's interpreter (decided at import time)."""
    return type(_side_fwd_kernel).__name__ == "InterpretedFunction"


def _require_launchable(x: torch.Tensor) -> None:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    if triton is None:
        raise _ext.BackendUnavailable("the triton backend needs `pip install triton`")
    if not x.is_cuda and not _interpreted():
        raise _ext.BackendUnavailable(
            "the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
            "set before dtl_kernels.ops.triton_side is first imported)"
        )


def _config(d: int, kw: int, device: torch.device) -> dict:
    interpret = device.type != "cuda"
    block_k = max(16, _next_pow2(kw))
    if interpret:  # small tiles keep the interpreter's numpy work small
        return dict(BLOCK_M=32, BLOCK_D=32 if d > 16 else 16, BLOCK_K=block_k, num_warps=4)
    block_d = 64 if d >= 64 else max(16, _next_pow2(d))
    return dict(BLOCK_M=64, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=4)


def _programs(total_tiles: int, n_dchunks: int, device: torch.device) -> int:
    """Rows of programs of the backward grid: enough to fill the GPU a few times over, few
    enough that the (P, d, K) partials stay small. Fixed per device → deterministic."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, (4 * sms) // n_dchunks)
    else:
        target = 3
    return max(1, min(total_tiles, target))


def _native_dot(x: torch.Tensor) -> bool:
    """16-bit rank-K dots straight on the tensor cores (CUDA only: triton 3.8's
    interpreter computes wrong bfloat16 dots, so it gets the fp32 path)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def side_fwd(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    beta: float,
) -> torch.Tensor:
    """Launch :func:`_side_fwd_kernel`; returns ``out`` ``(B, N, d)`` in ``y``'s dtype."""
    k = _check("triton_side_forward", y, taps, ups, conv_weight, grid_h, grid_w, num_prefix)
    bsz, n, d = y.shape
    kw = taps.shape[2]
    if kw == 0:  # h = 0 and θ(0) = 0: nothing is added
        return y.clone(memory_format=torch.contiguous_format)
    out = torch.empty((bsz, n, d), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    _require_launchable(y)

    cfg = _config(d, kw, y.device)
    ups_c = ups.contiguous()
    w = conv_weight.reshape(d, k * k).contiguous() if k else ups_c
    tiles = -(-n // cfg["BLOCK_M"])
    grid = (bsz * tiles, -(-d // cfg["BLOCK_D"]))
    _side_fwd_kernel[grid](
        y, *y.stride(), taps, *taps.stride(), ups_c, w, out, *out.stride(),
        n, d, kw, num_prefix, max(grid_h, 1), max(grid_w, 1), float(beta), tiles,
        KSIZE=k, NATIVE_DOT=_native_dot(y),
        ACC=_acc_dtype(y.dtype), **cfg,
    )
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch :func:`_side_bwd_kernel`; returns ``(grad_taps, grad_ups, grad_conv)`` in the
    dtypes of ``taps``, ``ups`` and ``conv_weight`` (``grad_conv`` empty for DTL)."""
    k = _check("triton_side_backward", grad_out, taps, ups, conv_weight, grid_h, grid_w,
               num_prefix)
    bsz, n, d = grad_out.shape
    kw = taps.shape[2]
    dev = grad_out.device
    grad_conv = conv_weight.new_zeros(conv_weight.shape) if k else grad_out.new_empty((0,))
    if grad_out.numel() == 0 or kw == 0:
        return taps.new_zeros(taps.shape), ups.new_zeros(ups.shape), grad_conv
    _require_launchable(grad_out)

    cfg = _config(d, kw, dev)
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    tiles = -(-n // cfg["BLOCK_M"])
    total = bsz * tiles
    n_dchunks = -(-d // cfg["BLOCK_D"])
    progs = _programs(total, n_dchunks, dev)
    block_kk = _next_pow2(k * k) if k else 1
    part_taps = torch.empty((n_dchunks, bsz, n, kw), dtype=acc, device=dev)
    part_ups = torch.empty((progs, d, kw), dtype=acc, device=dev)
    part_w = torch.empty((progs, d, block_kk) if k else (1,), dtype=acc, device=dev)
    ups_c = ups.contiguous()
    w = conv_weight.reshape(d, k * k).contiguous() if k else ups_c
    _side_bwd_kernel[(progs, n_dchunks)](
        grad_out, *grad_out.stride(), taps, *taps.stride(), ups_c, w,
        part_taps, part_ups, part_w,
        n, d, kw, num_prefix, max(grid_h, 1), max(grid_w, 1), float(beta), tiles, total,
        bsz * n * kw,
        KSIZE=k, BLOCK_KK=block_kk, NATIVE_DOT=_native_dot(grad_out),
        ACC=_acc_dtype(grad_out.dtype), **cfg,
    )
    grad_taps = part_taps.sum(0).to(taps.dtype)
    grad_ups = part_ups.sum(0).to(ups.dtype)
    if k:
        grad_conv = part_w.sum(0)[:, : k * k].contiguous().view(d, 1, k, k).to(conv_weight.dtype)
    return grad_taps, grad_ups, grad_conv


# --------------------------------------------------------------------------------------
# Registered ops + autograd
# --------------------------------------------------------------------------------------


@torch.library.custom_op(OP_FORWARD, mutates_args=(), device_types="cuda")
def _forward_op(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    beta: float,
) -> torch.Tensor:
    return side_fwd(y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta)


@torch.library.custom_op(OP_BACKWARD, mutates_args=(), device_types="cuda")
def _backward_op(
    grad_out: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    conv_weight: torch.Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return side_bwd(grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta)


# CPU tensors run the same kernels through Triton's interpreter (TRITON_INTERPRET=1).
_forward_op.register_kernel("cpu")(side_fwd)
_backward_op.register_kernel("cpu")(side_bwd)


@_forward_op.register_fake
def _forward_fake(y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta):
    _check("triton_side_forward", y, taps, ups, conv_weight, grid_h, grid_w, num_prefix)
    return y.new_empty(y.shape)


@_backward_op.register_fake
def _backward_fake(grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta):
    _check("triton_side_backward", grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix)
    grad_conv = conv_weight.new_empty(conv_weight.shape) if conv_weight is not None else (
        grad_out.new_empty((0,)))
    return taps.new_empty(taps.shape), ups.new_empty(ups.shape), grad_conv


def _setup_context(ctx, inputs, output):
    # Only the K-wide taps, the ups and the conv kernel are saved: h is rebuilt in backward.
    _, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta = inputs
    ctx.save_for_backward(taps, ups, conv_weight)
    ctx.args = (grid_h, grid_w, num_prefix, beta)


def _autograd_backward(ctx, grad):
    taps, ups, conv_weight = ctx.saved_tensors
    grad_taps, grad_ups, grad_conv = _backward_op(grad, taps, ups, conv_weight, *ctx.args)
    grad_conv = grad_conv if conv_weight is not None else None
    # ∂L/∂y = G (residual); no gradient for the ints and β.
    return grad, grad_taps, grad_ups, grad_conv, None, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)
