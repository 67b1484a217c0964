"""Fused side op ``out = y + mix(T·Uᵀ)`` in Triton: kernels → planning → launchers → op.

Shapes (as every backend, see :mod:`dtl_kernels.ops.side`): ``y`` ``(B, N, d)`` block
output; ``taps`` ``T`` ``(B, N, K)`` concatenated rank-r taps (``K = i·r``, a few dozen at
most); ``ups`` ``U`` ``(d, K)``; ``conv_weight`` ``w`` ``(d, 1, k, k)`` or ``None`` (DTL);
``grid = (H, W)`` with ``H·W = N − num_prefix`` for DTL+. ``y`` (``grad_out``) and
``conv_weight`` share one floating dtype (float32, float16, bfloat16; float64 computes in
float64, for ``gradcheck``); ``taps`` and ``ups`` share ``y``'s dtype or, beside a float32
``y``, bfloat16 / float16 (the autocast mix, :func:`contract.side_dtypes_ok`). Math in fp32
(fp64 for fp64), stores in each output's own dtype.

Math. ``h = T·Uᵀ`` (never stored), ``A = θ(h)``, ``θ(x) = x·σ(βx)``. DTL: ``out = y + A``.
DTL+: the first ``num_prefix`` rows of each image get ``y + A``; patch rows get
``out[q] = y[q] + Σ_ab w[:, a, b] · A[q + s_ab]``, the depthwise ``k×k`` "same"
convolution, ``s_ab = (a − p, b − p)`` on the ``H×W`` grid, ``p = (k−1)//2`` (PyTorch puts
the extra pad of an even ``k`` bottom / right; ``q + s_ab`` outside the grid gives 0).
Backward, with ``G = ∂L/∂out``::

    ∂L/∂y   = G                                   (residual, pass-through)
    D       = G                                   on prefix rows and for DTL
    D[q]    = Σ_ab w[:, a, b] · G[q − s_ab]        on patch rows (the transposed conv)
    S       = θ'(h) ⊙ D                           θ'(x) = σ(βx) + βx·σ(βx)(1 − σ(βx))
    ∂L/∂T   = S · U                               (B·N × K)
    ∂L/∂U   = Sᵀ · T                              (d × K)
    ∂L/∂w[:, a, b] = Σ_p A[p] ⊙ G[p − s_ab]       (over batch and grid)

Rows. Every kernel walks the ``B·N`` rows as one flat range: a tile may span two images
(no padding of ``N`` up to the tile size). A row's offset is ``row·stride_n`` when every
``(B, N, ·)`` tensor of the launch has ``stride_b == N·stride_n`` (``FLAT``), else one
division per row; any strides work. On the patch grid the shift ``s_ab`` is the flat
offset ``(a−p)·W + (b−p)`` with a validity mask per row; the grid (prefix, ``H``, ``W``)
and ``G``'s row stride are compile-time constants of the DTL+ kernels, so the shifts are
load-instruction immediates and the masks one unsigned compare per axis.

Forward. DTL (``_fwd_kernel``): a 2-D grid over (row tile, d chunk); each program
rebuilds its ``h`` tile with one rank-``K`` dot. DTL+ (``_fwd_conv_kernel``): a
persistent grid (two programs per SM) walks (row tile, d chunk) items; per item it
computes ``θ(h)`` ONCE for the tile's rows plus a halo of ``p·W + p`` rows above and
``(k−1−p)·(W+1)`` below into its own slot of a small fp32 scratch (L1 / L2 resident),
waits on a CTA barrier, sums the ``k²`` shifted, masked reads of that slot, and waits
again before the next item rewrites the slot. DTL+ costs the halo rows' ``θ`` and ``k²``
on-chip reads per element, not ``k²`` rank-``K`` dots and ``θ`` evaluations.

Backward: ONE fused kernel (``_bwd_kernel``) and a tiny one (``_bwd_finish_kernel``).

* ``_bwd_kernel``: one program per item = (row tile of ``BLOCK_M`` rows, slice of d). Per
  ``BLOCK_D`` chunk of its slice it reads ``G`` once from DRAM (the ``k²`` shifted reads
  of its halo are L1 / L2 hits, shared with the neighbouring tiles that run alongside),
  rebuilds ``h`` with one rank-``K`` dot, takes ``θ(h)`` and ``θ'(h)`` from ONE ``σ``,
  forms ``D`` (the transposed conv on patch rows, ``G`` on prefix rows) and ``S``, and
  sends ``∂U = Sᵀ·T`` and ``∂w`` for its rows to a small zeroed fp32 buffer with fp32
  atomics (``red.global.add``; L2-resident: ``d·(K + k²)`` floats). ``∂T`` accumulates in
  registers over the slice and is written once: stored in the taps dtype when the slice
  is all of d, else added with one atomic per item (into the zeroed output for fp32 taps,
  into the buffer's tail for 16-bit taps). d is sliced only when the row tiles alone
  would leave SMs idle (:func:`plan`: at least :data:`BWD_CTAS_PER_SM` programs per SM
  where the work allows, then the fewest chunks on the busiest SM); at large batches each
  item covers all of d.
* DTL+ shift loop without barriers: inside the chunk the tile is held as
  ``(RL, NWD, R_IN, CW)`` = (rows, columns, rows, columns), ``CW = 2`` contiguous columns
  per load. Triton 3.6 lays a load out from its contiguous axis outwards (``CW``, then the
  other axes in index order): ``RL`` rows on lanes, ``NWD`` columns on lanes and all the
  warps, ``R_IN`` rows per thread. ``∂w[:, a, b] = Σ_p A[p] G[p − s_ab]`` over the tile's
  rows is then ``R_IN`` in-thread adds and ``log2 RL`` warp shuffles, accumulated into a
  ``(k², cols)`` register tensor whose ``k²`` axis is per thread (the per-shift select
  folds at compile time) and written once per chunk. ``θ(h)`` / ``θ'(h)`` enter that
  layout once per chunk; ``S`` leaves it through an opaque identity (``mov``, CUDA only)
  so the compiler cannot pull the dot operands' layout back into the shift loop.
* ``_bwd_finish_kernel``: ``∂U`` / ``∂w`` = the buffer's slot(s) in a fixed order, cast to
  the ups' / conv's dtype; ``∂T``'s buffer (if any) cast to the taps' dtype.

Deterministic mode (:func:`deterministic_mode`: ``torch.use_deterministic_algorithms(True)``
or ``DTL_KERNELS_DETERMINISTIC=1``): the same kernel without atomics. A persistent grid of
at most ``2·SMs`` programs, each owning a fixed set of row tiles over all of d (``∂T``
stored once) and its own slot of the buffer (``∂U`` / ``∂w`` added by load + store, one
writer, a fixed order); ``_bwd_finish_kernel`` sums the slots in slot order. Bit-identical
runs; fewer programs (as many slots as the temporaries rule allows).

Temporaries (:func:`plan` reports them: ``bwd_buffer``, ``bwd_temp_bytes``): at most
``max(TEMP_FLOOR, TEMP_SHARE · bytes of y)`` = ``max(4 MB, 0.25·y)``; with atomics at
ViT-B / Swin-B stage 3 (batch 32) 0.07–2 MB, in the deterministic mode up to the 4 MB
floor (that is what caps its slots). Nothing of the size of ``y``; the conv kernel is
read in place.

Dots and σ. 16-bit taps / ups take the tensor cores: ``T·Uᵀ`` is exact (products of
16-bit values are exact in fp32 accumulation); ``S·U`` and ``Tᵀ·S`` (= ``∂Uᵀ``, so that the
tensor cores' M is ``BLOCK_K``) split the fp32 ``S`` into a 16-bit high part and a 16-bit
remainder (two dots, ~16 significant bits of ``S``).
float32 uses the exact ("ieee", FMA) dot, no TF32; float64 the fp64 dot. On CUDA σ runs on
the SFU's approximate ``ex2`` / ``rcp`` (``FAST``, a few ulp, saturating to exactly 0 / 1);
the interpreter and fp64 use ``tl.sigmoid``.

Tiles are fixed per shape class (:func:`plan`; no autotuning, so no extra compiles; the
forward's and the deterministic backward's bits never depend on timing, the default
backward's fp32 atomics add in arrival order). The table in :func:`plan` comes from
ahead-of-time compiles for sm_90a with Triton 3.6.0 (``benchmarks/codegen_check.py``,
``benchmarks/results/codegen.md``): no register spills, at least two CTAs per SM, no
barrier in the shift loop, tensor-core instructions in every 16-bit dot.

Only ``taps``, ``ups`` and ``conv_weight`` are saved for backward (not ``h``, not ``y``).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import _env
from . import _ext, contract, triton_launch

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


def forward(args: contract.SideArgs) -> torch.Tensor:
    """``y + mix(taps · upsᵀ)`` on the Triton kernels, differentiable in every tensor."""
    return _forward_op(*args.kernel_args())


# --------------------------------------------------------------------------------------
# Kernels (defined only when triton is importable; TRITON_INTERPRET=1 must be set before
# this module is imported for them to run on CPU tensors)
# --------------------------------------------------------------------------------------


@_jit
def _sigmoid(z, FAST: tl.constexpr):
    # σ(z). FAST (CUDA, fp32): 1 / (1 + 2^(−z·log2 e)) with the approximate (ftz) ex2 and rcp
    # of the SFU, ~2 ulp; saturates to exactly 0 / 1 (2^+inf = inf, 1/inf = 0), no NaN.
    # Otherwise tl.sigmoid (the interpreter cannot run inline PTX; fp64).
    if FAST:
        e = tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;",
            "=r,r",
            [z * -1.4426950408889634],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.sigmoid(z)


@_jit
def _theta(x, beta, FAST: tl.constexpr):
    # θ(x) = x·σ(βx); σ saturates to exactly 0 / 1, no NaN for large |βx|.
    return x * _sigmoid(beta * x, FAST)


@_jit
def _theta_grad(x, beta, FAST: tl.constexpr):
    # θ'(x) = s + βx·s·(1 − s), s = σ(βx); β multiplies last, as in side_math.h: for
    # |x| > max/β, βx is inf and inf·0 would be NaN where σ saturates.
    s = _sigmoid(beta * x, FAST)
    return s + beta * (x * s * (1.0 - s))


@_jit
def _theta_both(x, beta, FAST: tl.constexpr):
    # (θ(x), θ'(x)) sharing one σ(βx)
    s = _sigmoid(beta * x, FAST)
    return x * s, s + beta * (x * s * (1.0 - s))


@_jit
def _rows(rows, N):
    # flat row → (image, token), both int64 for the address arithmetic
    b = rows // N
    return b.to(tl.int64), (rows - b * N).to(tl.int64)


@_jit
def _off(rows, N, stride_b, stride_n, FLAT: tl.constexpr):
    # int64 element offset of each flat row of a (B, N, ·) tensor. FLAT: the launcher
    # checked stride_b == N·stride_n for every (B, N, ·) input, so no division is needed.
    if FLAT:
        return rows.to(tl.int64) * stride_n
    else:
        b, n = _rows(rows, N)
        return b * stride_b + n * stride_n


@_jit
def _grid_pos(n, row_ok, NPRE: tl.constexpr, GW: tl.constexpr):
    # token → (is a patch, grid row, grid column); rows that are not patches get a grid
    # row far outside the grid, so that _axis_ok is False for every shift
    is_patch = row_ok & (n >= NPRE)
    p = tl.maximum(n - NPRE, 0).to(tl.int32)
    pi = p // GW
    return is_patch, tl.where(is_patch, pi, -(1 << 20)), p - pi * GW


@_jit
def _cols_ok(cols, D, EVEN_D: tl.constexpr):
    # column mask; all-true (folded away) when BLOCK_D divides D
    if EVEN_D:
        return tl.full(cols.shape, 1, tl.int1)
    else:
        return cols < D


@_jit
def _axis_ok(pos, delta, size):
    # whether pos + delta lies in [0, size): one unsigned compare
    return (pos + delta).to(tl.uint32) < size


@_jit
def _load_t(
    taps_ptr,
    rows,
    N,
    stride_tb,
    stride_tn,
    stride_tk,
    ks,
    row_ok,
    k_ok,
    T_VEC: tl.constexpr,
    FLAT: tl.constexpr,
):
    # taps tile (rows, BK); T_VEC > 1 promises 16-byte aligned rows with unit stride in K
    stride_tb = (stride_tb // T_VEC) * T_VEC  # unchanged values; known multiples of T_VEC
    stride_tn = (stride_tn // T_VEC) * T_VEC
    t_row = _off(rows, N, stride_tb, stride_tn, FLAT)
    return tl.load(
        taps_ptr + t_row[:, None] + ks[None, :] * stride_tk,
        mask=row_ok[:, None] & k_ok[None, :],
        other=0.0,
    )


@_jit
def _load_u(ups_ptr, cols, col_ok, ks, k_ok, K):
    # U chunk (BD, BK) of the contiguous (d, K) ups (vector loads when the caller's K is a
    # known multiple of 16 bytes: K = (K // K_VEC) * K_VEC)
    return tl.load(
        ups_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
    )


@_jit
def _dot_in(t, u, NATIVE_DOT: tl.constexpr, ACC: tl.constexpr):
    # h tile = t @ u of two input-dtype operands. 16-bit: tensor cores, exact products,
    # fp32 accumulation. fp32 / fp64: the exact ("ieee") dot, no TF32.
    if NATIVE_DOT:
        return tl.dot(t, u, out_dtype=tl.float32)
    else:
        return tl.dot(t.to(ACC), u.to(ACC), input_precision="ieee", out_dtype=ACC)


@_jit
def _dot_acc(s, u, acc, NATIVE_DOT: tl.constexpr, ACC: tl.constexpr):
    # acc + s @ u, s computed in ACC, u in the input dtype. 16-bit: s = hi + lo, both in
    # u's dtype (two tensor-core dots, ~16 significant bits of s).
    if NATIVE_DOT:
        hi = s.to(u.dtype)
        lo = (s - hi.to(tl.float32)).to(u.dtype)
        acc = tl.dot(hi, u, acc, out_dtype=tl.float32)
        return tl.dot(lo, u, acc, out_dtype=tl.float32)
    else:
        return tl.dot(s, u.to(ACC), acc, input_precision="ieee", out_dtype=ACC)


@_jit
def _dot_tacc(t, s):
    # tᵀ @ s on the tensor cores: t 16-bit, s fp32 split as in _dot_acc
    hi = s.to(t.dtype)
    lo = (s - hi.to(tl.float32)).to(t.dtype)
    acc = tl.dot(tl.trans(t), hi, out_dtype=tl.float32)
    return tl.dot(tl.trans(t), lo, acc, out_dtype=tl.float32)


@_jit
def _fwd_kernel(
    y_ptr,
    stride_yb,
    stride_yn,
    stride_yd,  # (B, N, d) block output, any strides
    taps_ptr,
    stride_tb,
    stride_tn,
    stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous concatenated ups U
    out_ptr,
    stride_ob,
    stride_on,
    stride_od,  # (B, N, d) output
    R,
    N,
    D,
    K,  # rows B·N, tokens per image, features, taps width
    beta,  # Swish β (host float; cast to ACC here)
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # tile; ≥ 16
    K_VEC: tl.constexpr,  # K % K_VEC == 0 (vector loads of U rows); 1 if unknown
    T_VEC: tl.constexpr,  # taps rows 16-byte aligned, unit stride in K (vector loads); else 1
    EVEN_D: tl.constexpr,  # BLOCK_D divides D (no column masks)
    FLAT: tl.constexpr,  # stride_b == N·stride_n for y, taps and out (rows need no division)
    FAST: tl.constexpr,  # σ on the SFU's approximate ex2 / rcp (CUDA, fp32 compute)
    NATIVE_DOT: tl.constexpr,  # rank-K dot straight on 16-bit inputs
    ACC: tl.constexpr,  # compute dtype (fp32; fp64 for fp64 I/O)
):
    # DTL forward: grid (row tiles, d chunks); out = y + θ(T·Uᵀ).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = _cols_ok(cols, D, EVEN_D)
    K = (K // K_VEC) * K_VEC  # == K: K_VEC divides it (aligned U rows, mask per vector)
    k_ok = ks < K
    mask = row_ok[:, None] & col_ok[None, :]
    y_row = _off(rows, N, stride_yb, stride_yn, FLAT)
    y = tl.load(y_ptr + y_row[:, None] + cols[None, :] * stride_yd, mask=mask, other=0.0)
    t = _load_t(taps_ptr, rows, N, stride_tb, stride_tn, stride_tk, ks, row_ok, k_ok, T_VEC, FLAT)
    u_t = tl.trans(_load_u(ups_ptr, cols, col_ok, ks, k_ok, K))  # Uᵀ chunk (BK, BD)
    out = y.to(ACC) + _theta(_dot_in(t, u_t, NATIVE_DOT, ACC), tl.cast(beta, ACC), FAST)
    o_row = _off(rows, N, stride_ob, stride_on, FLAT)
    tl.store(
        out_ptr + o_row[:, None] + cols[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@_jit
def _fwd_conv_kernel(
    y_ptr,
    stride_yb,
    stride_yn,
    stride_yd,  # (B, N, d) block output, any strides
    taps_ptr,
    stride_tb,
    stride_tn,
    stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous ups U
    w_ptr,  # (d, 1, KSIZE, KSIZE) contiguous depthwise kernel, y's dtype
    out_ptr,
    stride_ob,
    stride_on,
    stride_od,  # (B, N, d) output
    scr_ptr,  # (programs, N_SUB·SUB, BLOCK_D) ACC scratch: one slot per program
    R,
    D,
    K,  # rows B·N, features, taps width
    beta,  # Swish β
    n_dchunks,
    n_items,  # cdiv(D, BLOCK_D); row tiles · n_dchunks
    KSIZE: tl.constexpr,  # conv size k ≥ 1
    NPRE: tl.constexpr,
    GH: tl.constexpr,
    GW: tl.constexpr,  # prefix tokens, patch grid
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_VEC: tl.constexpr,
    T_VEC: tl.constexpr,
    EVEN_D: tl.constexpr,
    FLAT: tl.constexpr,
    FAST: tl.constexpr,
    SUB: tl.constexpr,  # rows per θ(h) block (≥ 16)
    N_SUB: tl.constexpr,  # SUB-row blocks per item: tile + halo
    NATIVE_DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # DTL+ forward, persistent: program pid takes items pid, pid + P, …; an item is
    # (row tile, d chunk), d chunk fastest (neighbouring programs share rows of T and y).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    PAD: tl.constexpr = (KSIZE - 1) // 2
    HALO: tl.constexpr = PAD * GW + PAD  # halo rows above a tile
    N: tl.constexpr = NPRE + GH * GW
    beta = tl.cast(beta, ACC)
    ks = tl.arange(0, BLOCK_K)
    K = (K // K_VEC) * K_VEC  # == K: K_VEC divides it (aligned U rows, mask per vector)
    k_ok = ks < K
    dl = tl.arange(0, BLOCK_D)
    sub = tl.arange(0, SUB)
    scr = scr_ptr + pid.to(tl.int64) * (N_SUB * SUB * BLOCK_D)
    centre = scr + (HALO + tl.arange(0, BLOCK_M))[:, None] * BLOCK_D + dl[None, :]
    for item in range(pid, n_items, n_prog):
        r0 = (item // n_dchunks) * BLOCK_M
        cols = (item % n_dchunks) * BLOCK_D + dl
        col_ok = _cols_ok(cols, D, EVEN_D)
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        mask = row_ok[:, None] & col_ok[None, :]
        y_row = _off(rows, N, stride_yb, stride_yn, FLAT)
        y = tl.load(y_ptr + y_row[:, None] + cols[None, :] * stride_yd, mask=mask, other=0.0)
        u_t = tl.trans(_load_u(ups_ptr, cols, col_ok, ks, k_ok, K))  # Uᵀ chunk
        # 1. θ(h) once per row of the tile and its halo → scratch slot (rows outside
        #    [0, R) get θ(0) = 0 and are never read unmasked)
        for s in range(N_SUB):
            hr = r0 - HALO + s * SUB + sub
            h_ok = (hr >= 0) & (hr < R)
            t = _load_t(
                taps_ptr,
                tl.minimum(tl.maximum(hr, 0), R - 1),
                N,
                stride_tb,
                stride_tn,
                stride_tk,
                ks,
                h_ok,
                k_ok,
                T_VEC,
                FLAT,
            )
            act = _theta(_dot_in(t, u_t, NATIVE_DOT, ACC), beta, FAST)
            tl.store(scr + (s * SUB + sub)[:, None] * BLOCK_D + dl[None, :], act)
        tl.debug_barrier()  # the slot's rows, written by all threads, are visible to all
        # 2. out[q] = y[q] + Σ_ab w[:, a, b] · θ(h)[q + s_ab] (patch rows)
        is_patch, pi, pj = _grid_pos(rows % N, row_ok, NPRE, GW)
        mixed = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
        for a in range(KSIZE):  # a runtime loop: k loads in flight, not k² (registers)
            ok_i = _axis_ok(pi, a - PAD, GH)
            row_a = centre + (a - PAD) * (GW * BLOCK_D)
            for bb in tl.static_range(KSIZE):
                ok = ok_i & ((pj + (bb - PAD)).to(tl.uint32) < GW)  # _axis_ok, inlined
                act = tl.load(row_a + (bb - PAD) * BLOCK_D, mask=ok[:, None], other=0.0)
                w = tl.load(w_ptr + cols * (KSIZE * KSIZE) + (a * KSIZE + bb), mask=col_ok)
                mixed += act * w.to(ACC)[None, :]
        if NPRE > 0:  # prefix rows (class token …) get θ(h) only
            act = tl.load(centre, mask=(row_ok & ~is_patch)[:, None], other=0.0)
            mixed = tl.where(is_patch[:, None], mixed, act)
        out = y.to(ACC) + mixed
        o_row = _off(rows, N, stride_ob, stride_on, FLAT)
        tl.store(
            out_ptr + o_row[:, None] + cols[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.debug_barrier()  # all reads of the slot done before the next item rewrites it


@_jit
def _put(ptr, val, mask, DETERMINISTIC: tl.constexpr):
    # ptr[...] += val: an fp32 atomic (relaxed; any order) or, DETERMINISTIC, a load and a
    # store into the caller's own slot (one writer, a fixed order, the same bits every run)
    if DETERMINISTIC:
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + val, mask=mask)
    else:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")


@_jit
def _bwd_item(
    item,
    g_ptr,
    stride_gb,
    stride_gn,
    stride_gd,
    taps_ptr,
    stride_tb,
    stride_tn,
    stride_tk,
    ups_ptr,
    w_ptr,
    gtaps_ptr,
    buf_ptr,
    wbuf_ptr,
    R,
    N,
    D,
    K,
    beta,
    n_tiles,
    d_per_item,
    ks,
    k_ok,
    KSIZE: tl.constexpr,
    NPRE: tl.constexpr,
    GH: tl.constexpr,
    GW: tl.constexpr,
    SGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_VEC: tl.constexpr,
    T_VEC: tl.constexpr,
    EVEN_D: tl.constexpr,
    FLAT: tl.constexpr,
    FAST: tl.constexpr,
    R_IN: tl.constexpr,
    RL: tl.constexpr,
    NWD: tl.constexpr,
    CW: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    SPLIT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # One item (row tile, d slice) of _bwd_kernel. Per BLOCK_D chunk: h = T·Uᵀ (one dot),
    # θ(h) and θ'(h) from one σ, D (G, or the transposed conv of G on patch rows),
    # S = θ'(h) ⊙ D; ∂T += S·U stays in registers over the slice and is written once;
    # ∂U = Sᵀ·T and ∂w go to buf.
    #
    # DTL+: the chunk is held as (RL, NWD, R_IN, CW) = (rows, cols, rows, cols), CW = 2
    # contiguous columns per load vector. Triton 3.6 lays a load out from the contiguous
    # axis outwards (CW, then the other axes in index order), so RL rows sit on lanes, NWD
    # columns on lanes and on every warp, R_IN rows in each thread: the row sum of
    # A ⊙ G[· − s_ab] for ∂w[:, a, b] is R_IN in-thread adds and log2(RL) warp shuffles
    # (no shared memory, no barrier), kept in acc_w's per-thread k² axis (the select on
    # kk4 == a·k + b folds at compile time) and written once per chunk. Correct for any
    # layout the compiler picks; the layout only decides the cost (codegen_check.py).
    KK: tl.constexpr = KSIZE * KSIZE
    PAD: tl.constexpr = (KSIZE - 1) // 2
    tile = item % n_tiles
    c_begin = (item // n_tiles) * d_per_item
    c_end = tl.minimum(c_begin + d_per_item, D)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    t = _load_t(taps_ptr, rows, N, stride_tb, stride_tn, stride_tk, ks, row_ok, k_ok, T_VEC, FLAT)
    if KSIZE == 0:
        g_row = _off(rows, N, stride_gb, stride_gn, FLAT)
    else:
        rows4 = (
            tile * BLOCK_M
            + tl.arange(0, RL)[:, None, None, None] * R_IN
            + tl.arange(0, R_IN)[None, None, :, None]
        )  # (RL, 1, R_IN, 1)
        row_ok4 = rows4 < R
        g_row4 = _off(rows4, N, stride_gb, stride_gn, FLAT)
        is_patch4, pi4, pj4 = _grid_pos(rows4 % N, row_ok4, NPRE, GW)
        kk4 = tl.arange(0, BLOCK_KK)[None, None, :, None]
        cl4 = tl.arange(0, NWD)[None, :, None, None] * CW + tl.arange(0, CW)[None, None, None, :]
    acc_t = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for c0 in range(c_begin, c_end, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = _cols_ok(cols, D, EVEN_D)
        u = _load_u(ups_ptr, cols, col_ok, ks, k_ok, K)  # U chunk (BD, BK)
        h = _dot_in(t, tl.trans(u), NATIVE_DOT, ACC)
        if KSIZE == 0:
            g = tl.load(
                g_ptr + g_row[:, None] + cols[None, :] * stride_gd,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            s = _theta_grad(h, beta, FAST) * g.to(ACC)  # 0 on masked rows / columns
        else:
            cols4 = c0 + cl4  # (1, NWD, 1, CW)
            col_ok4 = _cols_ok(cols4, D, EVEN_D)
            h4 = tl.permute(tl.reshape(h, (RL, R_IN, NWD, CW)), (0, 2, 1, 3))
            act4, dact4 = _theta_both(h4, beta, FAST)
            g_p4 = g_ptr + g_row4 + cols4 * stride_gd
            dmix4 = tl.zeros((RL, NWD, R_IN, CW), dtype=ACC)
            acc_w = tl.zeros((1, NWD, BLOCK_KK, CW), dtype=ACC)  # ∂w[cols, s] of the tile
            for a in tl.static_range(KSIZE):
                ok_i = _axis_ok(pi4, PAD - a, GH)
                for bb in tl.static_range(KSIZE):
                    # G[p − s_ab] feeds both gᵀ(G) and ∂w[:, a, b]
                    ok = ok_i & ((pj4 + (PAD - bb)).to(tl.uint32) < GW)  # _axis_ok, inlined
                    gs4 = tl.load(
                        g_p4 - ((a - PAD) * GW + (bb - PAD)) * SGN,
                        mask=ok & col_ok4,
                        other=0.0,
                    ).to(ACC)
                    w4 = tl.load(w_ptr + cols4 * KK + (a * KSIZE + bb), mask=col_ok4)
                    dmix4 += gs4 * w4.to(ACC)
                    part = tl.sum(
                        tl.sum(act4 * gs4, axis=2, keep_dims=True), axis=0, keep_dims=True
                    )  # (1, NWD, 1, CW): in-thread adds, then warp shuffles
                    acc_w = tl.where(kk4 == a * KSIZE + bb, acc_w + part, acc_w)
            if NPRE > 0:  # prefix rows (class token …): D = G
                g4 = tl.load(g_p4, mask=row_ok4 & ~is_patch4 & col_ok4, other=0.0).to(ACC)
                dmix4 = tl.where(is_patch4, dmix4, g4)
            s4 = dact4 * dmix4
            if FAST:  # an opaque identity: the dots' operand layout stays out of the loop
                s4 = tl.inline_asm_elementwise(
                    "mov.b32 $0, $1;", "=r,r", [s4], dtype=tl.float32, is_pure=False, pack=1
                )
            s = tl.reshape(tl.permute(s4, (0, 2, 1, 3)), (BLOCK_M, BLOCK_D))
            _put(wbuf_ptr + kk4 * D + cols4, acc_w, (kk4 < KK) & col_ok4, DETERMINISTIC)
        acc_t = _dot_acc(s, u, acc_t, NATIVE_DOT, ACC)
        if NATIVE_DOT:  # ∂Uᵀ = Tᵀ·S: M = BLOCK_K rows for the tensor cores
            du_p = buf_ptr + cols[None, :] * K + ks[:, None]
            _put(du_p, _dot_tacc(t, s), k_ok[:, None] & col_ok[None, :], DETERMINISTIC)
        else:  # ∂U = Sᵀ·T, the exact dot
            du = tl.dot(tl.trans(s), t.to(ACC), input_precision="ieee", out_dtype=ACC)
            du_p = buf_ptr + cols[:, None] * K + ks[None, :]
            _put(du_p, du, col_ok[:, None] & k_ok[None, :], DETERMINISTIC)
    t_ptr = gtaps_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    t_mask = row_ok[:, None] & k_ok[None, :]
    if SPLIT == 1:
        tl.store(t_ptr, acc_t.to(gtaps_ptr.dtype.element_ty), mask=t_mask)
    else:
        tl.atomic_add(t_ptr, acc_t, mask=t_mask, sem="relaxed")


@_jit
def _bwd_kernel(
    g_ptr,
    stride_gb,
    stride_gn,
    stride_gd,  # (B, N, d) grad of out, any strides
    taps_ptr,
    stride_tb,
    stride_tn,
    stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous ups U
    w_ptr,  # (d, 1, KSIZE, KSIZE) contiguous depthwise kernel, y's dtype (DTL: dummy)
    gtaps_ptr,  # (B·N, K) contiguous ∂T: taps dtype (SPLIT == 1), else a zeroed ACC buffer
    buf_ptr,  # (slots, d·K + KSIZE²·d) zeroed ACC: ∂U as (d, K), then ∂w as (KSIZE², d)
    R,
    N,
    D,
    K,  # rows B·N, tokens per image, features, taps width
    beta,  # Swish β
    n_tiles,  # cdiv(R, BLOCK_M)
    n_items,  # n_tiles · SPLIT
    d_per_item,  # columns of d per item (a multiple of BLOCK_D)
    KSIZE: tl.constexpr,  # conv size k; 0 = DTL
    NPRE: tl.constexpr,
    GH: tl.constexpr,
    GW: tl.constexpr,  # DTL+ geometry (0 for DTL)
    SGN: tl.constexpr,  # DTL+: stride_gn as a constant (shift offsets); 0 for DTL
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_VEC: tl.constexpr,
    T_VEC: tl.constexpr,
    EVEN_D: tl.constexpr,
    FLAT: tl.constexpr,
    FAST: tl.constexpr,
    R_IN: tl.constexpr,  # DTL+ shift layout: BLOCK_M = RL · R_IN rows, BLOCK_D = NWD · CW
    RL: tl.constexpr,
    NWD: tl.constexpr,
    CW: tl.constexpr,
    BLOCK_KK: tl.constexpr,  # next_pow2(KSIZE²) (1 for DTL)
    SPLIT: tl.constexpr,  # d slices per row tile (> 1: ∂T through atomics)
    DETERMINISTIC: tl.constexpr,  # each program adds into its own slot of buf, no atomics
    NATIVE_DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # The whole backward (module docstring). An item is (row tile, d slice), the row tile
    # fastest (programs running together share G's halo rows in L2): one item per program,
    # or (DETERMINISTIC) a persistent grid, program pid taking items pid, pid + P, … into its
    # own slot of buf. _bwd_item holds the per-item code; the two calls keep the atomic
    # kernel free of loop state (registers: the unrolled shift loop keeps its loads in
    # flight).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    ks = tl.arange(0, BLOCK_K)
    K = (K // K_VEC) * K_VEC  # == K: K_VEC divides it (aligned U rows, mask per vector)
    k_ok = ks < K
    beta = tl.cast(beta, ACC)
    KK: tl.constexpr = KSIZE * KSIZE
    if KSIZE > 0:
        N = NPRE + GH * GW
    if DETERMINISTIC:  # one slot per program; its items, in a fixed order
        buf_ptr += pid.to(tl.int64) * D * (K + KK)
        wbuf_ptr = buf_ptr + D * K
        for item in range(pid, n_items, n_prog):
            _bwd_item(
                item,
                g_ptr,
                stride_gb,
                stride_gn,
                stride_gd,
                taps_ptr,
                stride_tb,
                stride_tn,
                stride_tk,
                ups_ptr,
                w_ptr,
                gtaps_ptr,
                buf_ptr,
                wbuf_ptr,
                R,
                N,
                D,
                K,
                beta,
                n_tiles,
                d_per_item,
                ks,
                k_ok,
                KSIZE,
                NPRE,
                GH,
                GW,
                SGN,
                BLOCK_M,
                BLOCK_D,
                BLOCK_K,
                K_VEC,
                T_VEC,
                EVEN_D,
                FLAT,
                FAST,
                R_IN,
                RL,
                NWD,
                CW,
                BLOCK_KK,
                SPLIT,
                DETERMINISTIC,
                NATIVE_DOT,
                ACC,
            )
    else:  # one item per program: no loop state beside the shift loop's registers
        wbuf_ptr = buf_ptr + D * K
        _bwd_item(
            pid,
            g_ptr,
            stride_gb,
            stride_gn,
            stride_gd,
            taps_ptr,
            stride_tb,
            stride_tn,
            stride_tk,
            ups_ptr,
            w_ptr,
            gtaps_ptr,
            buf_ptr,
            wbuf_ptr,
            R,
            N,
            D,
            K,
            beta,
            n_tiles,
            d_per_item,
            ks,
            k_ok,
            KSIZE,
            NPRE,
            GH,
            GW,
            SGN,
            BLOCK_M,
            BLOCK_D,
            BLOCK_K,
            K_VEC,
            T_VEC,
            EVEN_D,
            FLAT,
            FAST,
            R_IN,
            RL,
            NWD,
            CW,
            BLOCK_KK,
            SPLIT,
            DETERMINISTIC,
            NATIVE_DOT,
            ACC,
        )


@_jit
def _bwd_finish_kernel(
    buf_ptr,  # (slots, d·K + KK·d) ACC: ∂U as (d, K), ∂w as (KK, d), one slot per program
    gups_ptr,  # (d, K) ∂L/∂U out, ups dtype
    gw_ptr,  # (d, KK) ∂L/∂w out, conv dtype (dummy when KK == 0)
    tbuf_ptr,  # (B·N·K,) ACC ∂T buffer (dummy when n_t == 0)
    gtaps_ptr,  # (B·N·K,) ∂L/∂T out, taps dtype (dummy when n_t == 0)
    slots,
    D,
    K,
    KK,
    n_t,  # B·N·K when ∂T went through tbuf, else 0
    w_progs,  # programs of the ∂U / ∂w part: cdiv(d·(K + KK), BLOCK)
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # ∂U, ∂w = Σ_slot buf[slot], slot = 0, 1, … in order (deterministic), cast to the I/O
    # dtypes; then (programs w_progs …) ∂T's buffer cast to the taps dtype.
    pid = tl.program_id(0)
    if pid < w_progs:
        numel = D * (K + KK)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        ok = idx < numel
        acc = tl.zeros((BLOCK,), dtype=ACC)
        for sl in range(slots):  # the slots are small: int32 offsets suffice
            acc += tl.load(buf_ptr + sl * numel + idx, mask=ok, other=0.0)
        n_u = D * K
        tl.store(gups_ptr + idx, acc.to(gups_ptr.dtype.element_ty), mask=ok & (idx < n_u))
        if KK > 0:
            kk = (idx - n_u) // D
            c = idx - n_u - kk * D
            tl.store(gw_ptr + c * KK + kk, acc.to(gw_ptr.dtype.element_ty), mask=ok & (idx >= n_u))
    else:
        t_idx = (pid - w_progs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        t_ok = t_idx < n_t
        val = tl.load(tbuf_ptr + t_idx, mask=t_ok, other=0.0)
        tl.store(gtaps_ptr + t_idx, val.to(gtaps_ptr.dtype.element_ty), mask=t_ok)


# --------------------------------------------------------------------------------------
# Planning: tiles, grids and temporaries per shape class (no GPU needed)
# --------------------------------------------------------------------------------------

#: the backward's temporaries (its zeroed ACC buffer: ∂U / ∂w slots, and ∂T when d is split
#: over programs with 16-bit taps) may take max(TEMP_FLOOR, TEMP_SHARE · bytes of y)
TEMP_FLOOR, TEMP_SHARE = 4 << 20, 0.25
#: programs per SM of the atomic backward (the compiled kernel's occupancy, codegen.csv)
BWD_CTAS_PER_SM = 2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def plan(
    bsz: int,
    n: int,
    d: int,
    kw: int,
    k: int = 0,
    grid: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cuda",
    sms: int = 132,
    side_dtype: torch.dtype | None = None,
    deterministic: bool = False,
) -> dict:
    """Tiles, grids and temporaries of the forward and backward launches for one shape.

    ``grid = (H, W)`` for DTL+ (the prefix is ``n − H·W``); contiguous inputs assumed for
    the stride-dependent constants (the launchers override them from the real strides).
    Pure arithmetic, no GPU: ``sms`` is the device's SM count (132 on an H100 SXM);
    ``device_type != "cuda"`` plans the small tiles used under the interpreter.
    ``side_dtype``: the taps' / ups' dtype (default ``dtype``; 16-bit beside a float32 ``y``
    in the autocast mix). ``deterministic``: the backward without atomics (one ∂U / ∂w slot
    per program, summed in a fixed order). Returns ``{"fwd", "bwd", "finish"}`` launches
    (``kernel`` name, ``grid``, ``meta``: constexprs and ``num_warps`` / ``num_stages``,
    ``args``: extra runtime ints), ``fwd_scratch`` / ``bwd_buffer`` (shapes of the ACC
    temporaries, ``None`` if none; ``bwd_buffer`` = ``bwd_slots`` ∂U / ∂w slots then
    ``bwd_tbuf`` elements of ∂T), ``temporaries`` (those two; the conv kernel is read in
    place, no copy), ``fwd_temp_bytes`` / ``bwd_temp_bytes`` (the bytes of each pass's
    temporaries), ``temp_budget`` (the bytes the backward may allocate) and ``y_bytes``.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    side_elem = torch.empty((), dtype=side_dtype or dtype).element_size()
    acc_elem = 8 if dtype == torch.float64 else 4
    rows = bsz * n
    block_k = max(16, _next_pow2(kw))
    k_vec = 16 // side_elem if kw % (16 // side_elem) == 0 else 1  # U rows 16-byte aligned
    kk = k * k
    interp = device_type != "cuda"
    y_bytes = rows * d * elem
    out: dict = {"y_bytes": y_bytes}
    base = dict(BLOCK_K=block_k, K_VEC=k_vec, T_VEC=k_vec)  # T_VEC: for contiguous taps
    if k:
        grid_h, grid_w = grid
        geom = dict(NPRE=n - grid_h * grid_w, GH=grid_h, GW=grid_w)
    else:
        grid_h = grid_w = 0
        geom = dict(NPRE=0, GH=0, GW=0)

    # Tiles per dtype class: 16-bit / fp32 / fp64 (fp64 is for gradcheck: compiles, not tuned).
    # The values come from ahead-of-time compiles for sm_90 (no spills, smem well under the
    # limit, instruction counts of the loop bodies); see the module docstring.
    cls = {2: 0, 4: 1, 8: 2}[elem]

    # forward
    if k == 0:
        bm, bd = (32, 32) if interp else [(64, 128), (64, 64), (32, 32)][cls]
        out["fwd"] = dict(
            kernel="_fwd_kernel",
            grid=(_cdiv(rows, bm), _cdiv(d, bd)),
            meta=dict(base, BLOCK_M=bm, BLOCK_D=bd, EVEN_D=d % bd == 0, num_warps=4),
            args=(),
        )
        out["fwd_scratch"] = None
    else:
        pad = (k - 1) // 2
        halo = pad * grid_w + pad + (k - 1 - pad) * (grid_w + 1)  # rows above + below
        if interp:
            bm, bd, sub, progs, nw = 32, 32, 32, 2, 4
        else:
            bm = min(256, max(128, _next_pow2(2 * halo)))  # halo ≤ ~1/2 of the tile's rows
            bd, sub, progs = [32, 32, 16][cls], [64, 32, 32][cls], 2 * sms
            nw = 8 if bm >= 256 else 4
        n_sub = _cdiv(bm + halo, sub)
        n_dchunks = _cdiv(d, bd)
        items = _cdiv(rows, bm) * n_dchunks
        progs = max(1, min(progs, items))
        out["fwd"] = dict(
            kernel="_fwd_conv_kernel",
            grid=(progs,),
            meta=dict(
                base,
                **geom,
                KSIZE=k,
                BLOCK_M=bm,
                BLOCK_D=bd,
                SUB=sub,
                N_SUB=n_sub,
                EVEN_D=d % bd == 0,
                num_warps=nw,
                num_stages=1,
            ),
            args=(n_dchunks, items),
        )
        out["fwd_scratch"] = (progs, n_sub * sub, bd)

    # backward: one fused kernel (_bwd_kernel) over items = (row tile, d slice), then a
    # tiny one (_bwd_finish_kernel) that sums the ∂U / ∂w slots in order and casts
    if k == 0:
        r_in, rl, nwd, cw = 1, 1, 1, 1  # no shift loop: the 4-D layout is unused
        bm, bd, nw = (32, 32, 4) if interp else [(64, 64, 4), (64, 32, 4), (32, 32, 4)][cls]
    else:
        # (R_IN, RL, NWD, CW): RL · NWD / num_warps = 32 lanes (see _bwd_kernel); the ∂T
        # accumulator and taps tile grow with BLOCK_K, so wide taps get fewer rows
        if interp:
            r_in, rl, nwd, cw = 2, 16, 16, 2
        elif block_k <= 32 and cls == 0:
            r_in, rl, nwd, cw = 8, 8, 16, 2
        elif block_k <= 64 and cls < 2:
            r_in, rl, nwd, cw = 4, 16, 8, 2
        else:
            r_in, rl, nwd, cw = 2, 16, 8, 2
        bm, bd, nw = r_in * rl, nwd * cw, 4
    n_tiles = _cdiv(rows, bm)
    n_chunks = _cdiv(d, bd)
    slot = d * (kw + kk)  # ∂U (d, K) and ∂w (k², d) of one slot, ACC elements
    budget = max(TEMP_FLOOR, TEMP_SHARE * y_bytes)  # bytes the backward may allocate
    t_buffered = side_elem != acc_elem  # ∂T atomics need an ACC buffer (16-bit taps)
    t_elems = _cdiv(rows * kw, 4) * 4
    if deterministic:  # one slot per program, at most what the budget holds
        split = 1
        progs = 3 if interp else 2 * sms
        progs = max(1, min(n_tiles, progs, int(budget) // (slot * acc_elem)))
        slots = progs
    else:  # one slot, fp32 atomics; d slices until every SM has programs
        target = 3 if interp else BWD_CTAS_PER_SM * sms
        split = 1
        if interp:
            split = min(n_chunks, 2)
        else:
            # d slices: programs for every SM (≥ target where the work allows), then the
            # least work on the busiest SM slot (waves × (chunks per item + ~1 chunk of
            # per-item cost: the taps tile, ∂T's store)); ∂T's buffer within budget
            need = min(target, n_tiles * n_chunks)
            best = None
            for s in range(1, n_chunks + 1):
                if s > 1 and t_buffered and (slot + t_elems) * acc_elem > budget:
                    break
                span = _cdiv(n_tiles * s, target) * (_cdiv(n_chunks, s) + 1)
                key = (n_tiles * s < need, span)
                if best is None or key < best:
                    best, split = key, s
        split = _cdiv(n_chunks, _cdiv(n_chunks, split))  # no empty slice
        progs = n_tiles * split  # one item per program
        slots = 1
    per_item = _cdiv(n_chunks, split) * bd
    tbuf = t_elems if split > 1 and t_buffered else 0
    out["bwd"] = dict(
        kernel="_bwd_kernel",
        grid=(progs,),
        meta=dict(
            base,
            **geom,
            KSIZE=k,
            SGN=d if k else 0,
            BLOCK_M=bm,
            BLOCK_D=bd,
            EVEN_D=d % bd == 0,
            R_IN=r_in,
            RL=rl,
            NWD=nwd,
            CW=cw,
            BLOCK_KK=_next_pow2(kk) if k else 1,
            SPLIT=split,
            DETERMINISTIC=deterministic,
            num_warps=nw,
            num_stages=1,
        ),
        args=(n_tiles, n_tiles * split, per_item),
    )
    block = 64 if interp else 512
    w_progs = _cdiv(slot, block)
    out["finish"] = dict(
        kernel="_bwd_finish_kernel",
        grid=(w_progs + _cdiv(tbuf, block),),
        meta=dict(BLOCK=block, num_warps=4),
        args=(w_progs,),
    )
    out["bwd_slots"] = slots
    out["bwd_tbuf"] = tbuf
    out["bwd_buffer"] = (slots * slot + tbuf,)  # one zeroed ACC allocation

    def nbytes(*shapes):
        total = 0
        for shape in shapes:
            numel = 1
            for size in shape or (0,):
                numel *= size
            total += numel * acc_elem
        return total

    out["fwd_temp_bytes"] = nbytes(out["fwd_scratch"])
    out["bwd_temp_bytes"] = nbytes(out["bwd_buffer"])
    out["temp_budget"] = budget
    out["temporaries"] = dict(fwd_scratch=out["fwd_scratch"], bwd_buffer=out["bwd_buffer"])
    return out


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the kernels were defined by Triton's interpreter (decided at import time)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _require_launchable(x: torch.Tensor) -> None:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    if triton is None:
        raise _ext.BackendUnavailable("the triton backend needs `pip install triton`")
    if not x.is_cuda and not _interpreted():
        raise _ext.BackendUnavailable(
            "the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
            "set before dtl_kernels.ops.triton_side is first imported)"
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
    triton_launch.launch(globals()[cfg["kernel"]], cfg, args, consts)


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
if LAUNCHER_PATH == "bridge":
    _ext.BINDING.register_launchers("triton_side_forward", side_fwd, "triton_side_backward",
                                    side_bwd)  # fmt: skip
else:
    for _key in ("CUDA", "CPU"):
        _LIB.impl("triton_side_forward", side_fwd, _key)
        _LIB.impl("triton_side_backward", side_bwd, _key)
_forward_op = torch.ops.dtl_kernels.triton_side_forward.default
_backward_op = torch.ops.dtl_kernels.triton_side_backward.default

contract.register_fakes("triton_side", OP_FORWARD, OP_BACKWARD)
contract.register_python_autograd(OP_FORWARD, _backward_op)
