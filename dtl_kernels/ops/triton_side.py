"""Fused side op ``out = y + mix(T·Uᵀ)`` in Triton: kernels → planning → launchers → op.

Shapes (as every backend, see :mod:`dtl_kernels.ops.side`): ``y`` ``(B, N, d)`` block
output; ``taps`` ``T`` ``(B, N, K)`` concatenated rank-r taps (``K = i·r``, a few dozen at
most); ``ups`` ``U`` ``(d, K)``; ``conv_weight`` ``w`` ``(d, 1, k, k)`` or ``None`` (DTL);
``grid = (H, W)`` with ``H·W = N − num_prefix`` for DTL+. ``y``, ``taps``, ``ups`` and
``conv_weight`` share one floating dtype (float32, float16, bfloat16; float64 computes in
float64, for ``gradcheck``). Math in fp32 (fp64 for fp64), stores in the I/O dtype.

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

Backward (three kernels, no atomics, deterministic, no temporary of the size of ``y``):

* ``_bwd_taps_kernel``: one program per row tile, looping over ALL d chunks; ``∂T`` of
  its rows accumulates in registers (fp32) and is stored once, in the taps dtype.
* ``_bwd_ups_kernel``: a grid of (row group × d chunk). The row groups are few: their
  fp32 partials of ``∂U`` and ``∂w`` (``groups × d × (K + k²)``) stay within
  :data:`PARTIAL_BUDGET` of ``y``'s bytes. Each program walks its group's rows in tiles
  in a fixed order, accumulating in registers (``∂w`` without per-tile cross-thread
  reductions, see the kernel).
* ``_sum_parts_kernel``: sums the group partials in a fixed order and casts.

Both backward kernels rebuild ``h`` (one dot) and gather the ``k²`` shifted tiles of ``G``
(global memory, mostly L1 / L2 hits), so ``G`` is read twice from DRAM; the only
temporary is the partial buffer (:func:`plan` reports its shape; ``~8–9 %`` of ``y`` at
ViT-B and Swin-B stage 3, the limit being 10 %).

Dots and σ. 16-bit inputs take the tensor cores: ``T·Uᵀ`` is exact (products of 16-bit
values are exact in fp32 accumulation); ``S·U`` and ``Sᵀ·T`` split the fp32 ``S`` into a
16-bit high part and a 16-bit remainder (two dots, ~16 significant bits of ``S``).
float32 uses the exact ("ieee", FMA) dot, no TF32; float64 the fp64 dot. On CUDA σ runs on
the SFU's approximate ``ex2`` / ``rcp`` (``FAST``, a few ulp, saturating to exactly 0 / 1);
the interpreter and fp64 use ``tl.sigmoid``.

Tiles are fixed per shape class (:func:`plan`; no autotuning, so no extra compiles and
the reduction order, hence the bits, never depend on timing). The table in :func:`plan`
comes from ahead-of-time compiles for sm_90: no register spills, shared memory well
within limits (the k² shifted loads are not software-pipelined), loop-body instruction
counts as low as the formulation allows.

Only ``taps``, ``ups`` and ``conv_weight`` are saved for backward (not ``h``, not ``y``).
"""

from __future__ import annotations

import torch

from . import _ext, contract

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
def _dot_acc_t(s, t, acc, NATIVE_DOT: tl.constexpr, ACC: tl.constexpr):
    # acc + sᵀ @ t (same operand rules as _dot_acc)
    if NATIVE_DOT:
        hi = s.to(t.dtype)
        lo = (s - hi.to(tl.float32)).to(t.dtype)
        acc = tl.dot(tl.trans(hi), t, acc, out_dtype=tl.float32)
        return tl.dot(tl.trans(lo), t, acc, out_dtype=tl.float32)
    else:
        return tl.dot(tl.trans(s), t.to(ACC), acc, input_precision="ieee", out_dtype=ACC)


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
    w_ptr,  # (KSIZE², d) contiguous depthwise kernel, transposed, ACC dtype
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
                w = tl.load(w_ptr + (a * KSIZE + bb) * D + cols, mask=col_ok, other=0.0)
                mixed += act * w[None, :]
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
def _dmix(
    g_ptr,
    g_row,
    stride_gd,
    cols,
    col_ok,
    row_ok,
    n,
    w_ptr,
    D,
    KSIZE: tl.constexpr,
    NPRE: tl.constexpr,
    GH: tl.constexpr,
    GW: tl.constexpr,
    SGN: tl.constexpr,
    ACC: tl.constexpr,
):
    # D = ∂L/∂θ(h) for a (rows × cols) tile: G on prefix rows / DTL, the transposed conv
    # Σ_ab w[:, a, b] · G[q − s_ab] on patch rows (SGN: G's row stride).
    g_p = g_ptr + g_row[:, None] + cols[None, :] * stride_gd
    g = tl.load(g_p, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
    if KSIZE == 0:
        return g
    else:
        PAD: tl.constexpr = (KSIZE - 1) // 2
        is_patch, pi, pj = _grid_pos(n, row_ok, NPRE, GW)
        dmix = tl.zeros(g.shape, dtype=ACC)
        for a in range(KSIZE):  # a runtime loop: k loads in flight, not k² (registers)
            ok_i = _axis_ok(pi, PAD - a, GH)
            g_a = g_p - (a - PAD) * (GW * SGN)
            for bb in tl.static_range(KSIZE):
                ok = ok_i & ((pj + (PAD - bb)).to(tl.uint32) < GW)  # _axis_ok, inlined
                gs = tl.load(g_a - (bb - PAD) * SGN, mask=ok[:, None] & col_ok[None, :], other=0.0)
                w = tl.load(w_ptr + (a * KSIZE + bb) * D + cols, mask=col_ok, other=0.0)
                dmix += gs.to(ACC) * w[None, :]
        return tl.where(is_patch[:, None], dmix, g)


@_jit
def _bwd_taps_kernel(
    g_ptr,
    stride_gb,
    stride_gn,
    stride_gd,  # (B, N, d) grad of out, any strides
    taps_ptr,
    stride_tb,
    stride_tn,
    stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous ups U
    w_ptr,  # (KSIZE², d) contiguous depthwise kernel, transposed, ACC dtype (DTL: dummy)
    gtaps_ptr,  # (B·N, K) contiguous ∂L/∂T, taps dtype
    R,
    N,
    D,
    K,  # rows B·N, tokens per image, features, taps width
    beta,  # Swish β
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
    NATIVE_DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # ∂T = S·U for one row tile over ALL of d (the reduction over d stays on chip).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    K = (K // K_VEC) * K_VEC  # == K: K_VEC divides it (aligned U rows, mask per vector)
    k_ok = ks < K
    beta = tl.cast(beta, ACC)
    if KSIZE > 0:
        N = NPRE + GH * GW
    g_row = _off(rows, N, stride_gb, stride_gn, FLAT)
    t = _load_t(taps_ptr, rows, N, stride_tb, stride_tn, stride_tk, ks, row_ok, k_ok, T_VEC, FLAT)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = _cols_ok(cols, D, EVEN_D)
        u = _load_u(ups_ptr, cols, col_ok, ks, k_ok, K)  # U chunk (BD, BK)
        h = _dot_in(t, tl.trans(u), NATIVE_DOT, ACC)
        dmix = _dmix(
            g_ptr,
            g_row,
            stride_gd,
            cols,
            col_ok,
            row_ok,
            rows % N,
            w_ptr,
            D,
            KSIZE,
            NPRE,
            GH,
            GW,
            SGN,
            ACC,
        )
        s = _theta_grad(h, beta, FAST) * dmix  # 0 on masked rows / columns
        acc = _dot_acc(s, u, acc, NATIVE_DOT, ACC)
    tl.store(
        gtaps_ptr + rows[:, None].to(tl.int64) * K + ks[None, :],
        acc.to(gtaps_ptr.dtype.element_ty),
        mask=row_ok[:, None] & k_ok[None, :],
    )


@_jit
def _bwd_ups_kernel(
    g_ptr,
    stride_gb,
    stride_gn,
    stride_gd,  # (B, N, d) grad of out, any strides
    taps_ptr,
    stride_tb,
    stride_tn,
    stride_tk,  # (B, N, K) concatenated taps T
    ups_ptr,  # (d, K) contiguous ups U
    w_ptr,  # (KSIZE², d) contiguous depthwise kernel, transposed, ACC dtype (DTL: dummy)
    part_ptr,  # (groups, d, K + KSIZE²) ACC partials: ∂U in [:K], ∂w in [K:]
    R,
    N,
    D,
    K,  # rows B·N, tokens per image, features, taps width
    beta,  # Swish β
    rows_per_group,  # a multiple of BLOCK_M
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
    BLOCK_KK: tl.constexpr,  # next_pow2(k²) (1 for DTL)
    CV: tl.constexpr,  # columns per load vector (2 for DTL+, see below; BLOCK_D for DTL)
    FOLD: tl.constexpr,  # rows of a tile the layout spreads over lanes and warps
    NATIVE_DOT: tl.constexpr,
    ACC: tl.constexpr,
):
    # Grid (row group, d chunk): ∂U = Sᵀ·T and ∂w[:, a, b] = Σ_p A[p] G[p − s_ab] over the
    # group's rows, in registers, in a fixed order; one ACC partial per group.
    #
    # ∂w without per-tile cross-thread reductions: G tiles are loaded as (rows, BD/CV, CV)
    # with CV = 2 contiguous columns per vector, so a thread holds 2 columns × several
    # rows and the lanes / warps tile FOLD rows. The products A ⊙ G[· − s_ab] of a tile
    # are summed over the rows a thread holds (reshape to (BM/FOLD, FOLD, ...), sum over
    # axis 0: in-thread adds) into a (BLOCK_KK, FOLD, ...) accumulator (2 registers per
    # shift); the lanes and warps are reduced once, after the last tile. (Correct for any
    # layout the compiler picks; FOLD only decides whether the sum is in-thread.)
    grp = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_D
    ks = tl.arange(0, BLOCK_K)
    K = (K // K_VEC) * K_VEC  # == K: K_VEC divides it (aligned U rows, mask per vector)
    k_ok = ks < K
    beta = tl.cast(beta, ACC)
    KK: tl.constexpr = KSIZE * KSIZE
    PAD: tl.constexpr = (KSIZE - 1) // 2
    if KSIZE > 0:
        N = NPRE + GH * GW
    cols3 = c0 + (tl.arange(0, BLOCK_D // CV) * CV)[:, None] + tl.arange(0, CV)[None, :]
    c_off3 = cols3[None, :, :] * stride_gd
    col_ok2 = _cols_ok(cols3, D, EVEN_D)
    col_ok3 = col_ok2[None, :, :]
    cols = c0 + tl.arange(0, BLOCK_D)
    col_ok = _cols_ok(cols, D, EVEN_D)
    u_t = tl.trans(_load_u(ups_ptr, cols, col_ok, ks, k_ok, K))  # Uᵀ chunk
    acc_u = tl.zeros((BLOCK_D, BLOCK_K), dtype=ACC)
    acc_w = tl.zeros((BLOCK_KK, FOLD, BLOCK_D // CV, CV), dtype=ACC)
    kk4 = tl.arange(0, BLOCK_KK)[:, None, None, None]
    r_begin = grp * rows_per_group
    r_end = tl.minimum(r_begin + rows_per_group, R)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        t = _load_t(
            taps_ptr, rows, N, stride_tb, stride_tn, stride_tk, ks, row_ok, k_ok, T_VEC, FLAT
        )
        act, dact = _theta_both(_dot_in(t, u_t, NATIVE_DOT, ACC), beta, FAST)
        g_p = g_ptr + _off(rows, N, stride_gb, stride_gn, FLAT)[:, None, None] + c_off3
        g3 = tl.load(g_p, mask=row_ok[:, None, None] & col_ok3, other=0.0).to(ACC)
        if KSIZE == 0:
            s = dact * tl.reshape(g3, (BLOCK_M, BLOCK_D))
        else:
            # the shift loop works in the (rows, BD/CV, CV) layout of the G loads; θ(h)
            # is brought into it once per tile
            is_patch, pi, pj = _grid_pos(rows % N, row_ok, NPRE, GW)
            act3 = tl.reshape(act, (BLOCK_M, BLOCK_D // CV, CV))
            dmix3 = tl.zeros((BLOCK_M, BLOCK_D // CV, CV), dtype=ACC)
            for a in tl.static_range(KSIZE):
                ok_i = _axis_ok(pi, PAD - a, GH)
                for bb in tl.static_range(KSIZE):
                    # G[p − s_ab] feeds both gᵀ(G) and ∂w[:, a, b]
                    ok = ok_i & ((pj + (PAD - bb)).to(tl.uint32) < GW)  # _axis_ok, inlined
                    gs3 = tl.load(
                        g_p - ((a - PAD) * GW + (bb - PAD)) * SGN,
                        mask=ok[:, None, None] & col_ok3,
                        other=0.0,
                    ).to(ACC)
                    w3 = tl.load(w_ptr + (a * KSIZE + bb) * D + cols3, mask=col_ok2, other=0.0)
                    dmix3 += gs3 * w3[None, :, :]
                    part = tl.sum(
                        tl.reshape(act3 * gs3, (BLOCK_M // FOLD, FOLD, BLOCK_D // CV, CV)), axis=0
                    )
                    acc_w = tl.where(kk4 == a * KSIZE + bb, acc_w + part[None, :, :, :], acc_w)
            dmix3 = tl.where(is_patch[:, None, None], dmix3, g3)
            s = dact * tl.reshape(dmix3, (BLOCK_M, BLOCK_D))
        acc_u = _dot_acc_t(s, t, acc_u, NATIVE_DOT, ACC)
    width = K + KK
    slot = part_ptr + (grp.to(tl.int64) * D + cols[:, None]) * width
    tl.store(slot + ks[None, :], acc_u, mask=col_ok[:, None] & k_ok[None, :])
    if KSIZE > 0:
        kk = tl.arange(0, BLOCK_KK)
        wsum = tl.reshape(tl.sum(acc_w, axis=1), (BLOCK_KK, BLOCK_D))  # lanes / warps, once
        tl.store(
            part_ptr + (grp.to(tl.int64) * D + cols[None, :]) * width + K + kk[:, None],
            wsum,
            mask=col_ok[None, :] & (kk[:, None] < KK),
        )


@_jit
def _sum_parts_kernel(
    part_ptr,  # (groups, d, K + KK) ACC partials
    gups_ptr,  # (d, K) ∂L/∂U out, ups dtype
    gw_ptr,  # (d, KK) ∂L/∂w out, conv dtype (dummy when KK == 0)
    groups,
    D,
    K,
    KK,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # ∂U, ∂w = Σ_g partial[g], g = 0, 1, … in order (deterministic), cast to the I/O dtype.
    width = K + KK
    numel = D * width
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for g in range(groups):  # the partials are small: int32 offsets suffice
        acc += tl.load(part_ptr + g * numel + idx, mask=ok, other=0.0)
    c = idx // width
    j = idx - c * width
    tl.store(gups_ptr + c * K + j, acc.to(gups_ptr.dtype.element_ty), mask=ok & (j < K))
    if KK > 0:
        tl.store(gw_ptr + c * KK + (j - K), acc.to(gw_ptr.dtype.element_ty), mask=ok & (j >= K))


# --------------------------------------------------------------------------------------
# Planning: tiles, grids and temporaries per shape class (no GPU needed)
# --------------------------------------------------------------------------------------

#: the backward's temporaries (the fp32 ∂U / ∂w partials of the row groups and the (k², d)
#: copy of the conv kernel) may take this share of y's bytes (the limit is 10 %)
PARTIAL_BUDGET = 0.095


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
) -> dict:
    """Tiles, grids and temporaries of the forward and backward launches for one shape.

    ``grid = (H, W)`` for DTL+ (the prefix is ``n − H·W``); contiguous inputs assumed for
    the stride-dependent constants (the launchers override them from the real strides).
    Pure arithmetic, no GPU: ``sms`` is the device's SM count (132 on an H100 SXM);
    ``device_type != "cuda"`` plans the small tiles used under the interpreter. Returns
    ``{"fwd", "bwd_taps", "bwd_ups", "sum"}`` launches (``kernel`` name, ``grid``,
    ``meta``: constexprs and ``num_warps`` / ``num_stages``, ``args``: extra runtime ints),
    ``fwd_scratch`` / ``bwd_partials`` (shapes of the fp32 temporaries, ``None`` if none),
    ``temporaries`` (those two and ``w_t``, the (k², d) copy of the conv kernel),
    ``fwd_temp_bytes`` / ``bwd_temp_bytes`` (the bytes of each pass's temporaries) and
    ``y_bytes``.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    acc_elem = 8 if dtype == torch.float64 else 4
    rows = bsz * n
    block_k = max(16, _next_pow2(kw))
    k_vec = 16 // elem if kw % (16 // elem) == 0 else 1  # U rows 16-byte aligned
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

    # backward ∂T: one program per row tile over all of d (rows per tile: the most that
    # still gives two programs per SM)
    stages = 1 if k else 3  # no software pipelining of the k² shifted loads (smem)
    if interp:
        bm1, bd1 = 32, 32
    else:
        bm1 = 16
        for cand in (64, 32):  # the (rows, BK) ∂T accumulator and taps tile stay small
            if _cdiv(rows, cand) >= 2 * sms and cand * block_k <= 2048:
                bm1 = cand
                break
        bd1 = [(128, 128), (64, 32), (32, 16)][cls][1 if k else 0]
    out["bwd_taps"] = dict(
        kernel="_bwd_taps_kernel",
        grid=(_cdiv(rows, bm1),),
        meta=dict(
            base,
            **geom,
            KSIZE=k,
            SGN=d if k else 0,
            BLOCK_M=bm1,
            BLOCK_D=bd1,
            EVEN_D=d % bd1 == 0,
            num_warps=4,
            num_stages=stages,
        ),
        args=(),
    )

    # backward ∂U / ∂w: a few row groups, their partials within the budget; as many d
    # chunks as it takes to give every SM a program
    width = kw + kk
    if interp:
        bm2, nw2, bd2_max = 32, 4, 32
    elif k:
        bm2, nw2, bd2_max = [(128, 8, 32 if kk <= 16 else 16), (64, 8, 16), (32, 4, 16)][cls]
    else:
        bm2, nw2, bd2_max = 64, 4, 64
    tiles = _cdiv(rows, bm2)
    per_group = d * width * acc_elem
    budget = PARTIAL_BUDGET * y_bytes - kk * d * acc_elem  # what the (k², d) w copy leaves
    groups = max(1, min(tiles, 64, int(budget) // per_group))
    if interp:
        groups = min(tiles, 3)
    bd2 = 32 if interp else 16
    for cand in (64, 32):
        if cand <= bd2_max and groups * _cdiv(d, cand) >= sms:
            bd2 = cand
            break
    rows_per_group = _cdiv(tiles, groups) * bm2
    groups = _cdiv(rows, rows_per_group)
    cv = 2 if k else bd2  # DTL+: 2 columns per thread (see _bwd_ups_kernel)
    fold = 2 if interp else min(bm2, max(1, 32 // (bd2 // cv)) * nw2)
    out["bwd_ups"] = dict(
        kernel="_bwd_ups_kernel",
        grid=(groups, _cdiv(d, bd2)),
        meta=dict(
            base,
            **geom,
            KSIZE=k,
            SGN=d if k else 0,
            BLOCK_M=bm2,
            BLOCK_D=bd2,
            EVEN_D=d % bd2 == 0,
            BLOCK_KK=_next_pow2(kk) if k else 1,
            CV=cv,
            FOLD=fold,
            num_warps=nw2,
            num_stages=stages,
        ),
        args=(rows_per_group,),
    )
    out["bwd_partials"] = (groups, d, width)
    block = 64 if interp else 512
    out["sum"] = dict(
        kernel="_sum_parts_kernel",
        grid=(_cdiv(d * width, block),),
        meta=dict(BLOCK=block, num_warps=4),
        args=(),
    )

    def nbytes(*shapes):
        total = 0
        for shape in shapes:
            numel = 1
            for size in shape or (0,):
                numel *= size
            total += numel * acc_elem
        return total

    w_t = (kk, d) if k else None  # the kernel, transposed to (k², d) in the compute dtype
    out["fwd_temp_bytes"] = nbytes(out["fwd_scratch"], w_t)
    out["bwd_temp_bytes"] = nbytes(out["bwd_partials"], w_t)
    out["temporaries"] = dict(
        fwd_scratch=out["fwd_scratch"], bwd_partials=out["bwd_partials"], w_t=w_t
    )
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


def _plan_for(x: torch.Tensor, kw: int, k: int, grid_h: int, grid_w: int) -> dict:
    bsz, n, d = x.shape
    sms = 132
    if x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SM_COUNT[index]
    return plan(bsz, n, d, kw, k, (grid_h, grid_w) if k else None, x.dtype, x.device.type, sms)


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


def _device_of(x: torch.Tensor):
    """Launch on the tensors' device, whatever the current device is."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def _launch(cfg: dict, *args, **consts) -> None:
    kernel = globals()[cfg["kernel"]]
    kernel[cfg["grid"]](*args, *cfg["args"], **{**cfg["meta"], **consts})


def _w_t(conv_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (d, 1, k, k) kernel as a contiguous (k², d) tensor in the compute dtype (one copy):
    the kernels read w[:, a, b] for consecutive channels as vectors, already converted."""
    d, kk = conv_weight.shape[0], conv_weight.shape[-1] ** 2
    w_t = torch.empty((kk, d), dtype=_acc_torch(dtype), device=conv_weight.device)
    return w_t.copy_(conv_weight.reshape(d, kk).t())


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
    """Launch the forward kernel; returns ``out`` ``(B, N, d)`` in ``y``'s dtype."""
    k = contract.check_kernel_inputs(
        "triton_side_forward", y, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta
    )
    bsz, n, d = y.shape
    kw = taps.shape[2]
    out = torch.empty((bsz, n, d), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    _require_launchable(y)

    p = _plan_for(y, kw, k, grid_h, grid_w)
    consts = _consts(y, taps, (y, taps, out))
    ups_c = ups.contiguous()
    rows = bsz * n
    with _device_of(y):
        if k == 0:
            _launch(
                p["fwd"],
                y,
                *y.stride(),
                taps,
                *taps.stride(),
                ups_c,
                out,
                *out.stride(),
                rows,
                n,
                d,
                kw,
                float(beta),
                **consts,
            )
        else:
            w_t = _w_t(conv_weight, y.dtype)
            scratch = torch.empty(p["fwd_scratch"], dtype=_acc_torch(y.dtype), device=y.device)
            _launch(
                p["fwd"],
                y,
                *y.stride(),
                taps,
                *taps.stride(),
                ups_c,
                w_t,
                out,
                *out.stride(),
                scratch,
                rows,
                d,
                kw,
                float(beta),
                **consts,
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
    """Launch the backward kernels; returns ``(grad_taps, grad_ups, grad_conv)`` in the
    dtypes of ``taps``, ``ups`` and ``conv_weight`` (``grad_conv`` empty for DTL)."""
    k = contract.check_kernel_inputs(
        "triton_side_backward", grad_out, taps, ups, conv_weight, grid_h, grid_w, num_prefix, beta
    )
    bsz, n, d = grad_out.shape
    kw = taps.shape[2]
    dev = grad_out.device
    if grad_out.numel() == 0:
        grad_conv = conv_weight.new_zeros(conv_weight.shape) if k else grad_out.new_empty((0,))
        return taps.new_zeros(taps.shape), ups.new_zeros(ups.shape), grad_conv
    _require_launchable(grad_out)

    p = _plan_for(grad_out, kw, k, grid_h, grid_w)
    consts = dict(_consts(grad_out, taps, (grad_out, taps)), SGN=grad_out.stride(1) if k else 0)
    ups_c = ups.contiguous()
    w_t = _w_t(conv_weight, grad_out.dtype) if k else ups_c
    grad_taps = torch.empty((bsz, n, kw), dtype=taps.dtype, device=dev)
    grad_ups = torch.empty((d, kw), dtype=ups.dtype, device=dev)
    grad_conv = (
        torch.empty((d, 1, k, k), dtype=conv_weight.dtype, device=dev)
        if k
        else grad_out.new_empty((0,))
    )
    parts = torch.empty(p["bwd_partials"], dtype=_acc_torch(grad_out.dtype), device=dev)
    common = (bsz * n, n, d, kw, float(beta))
    g_args = (grad_out, *grad_out.stride(), taps, *taps.stride(), ups_c, w_t)
    with _device_of(grad_out):
        _launch(p["bwd_taps"], *g_args, grad_taps, *common, **consts)
        _launch(p["bwd_ups"], *g_args, parts, *common, **consts)
        _launch(
            p["sum"],
            parts,
            grad_ups,
            grad_conv if k else grad_ups,
            p["bwd_partials"][0],
            d,
            kw,
            k * k,
            ACC=_acc_dtype(grad_out.dtype),
        )
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


contract.register_fakes("triton_side", _forward_op, _backward_op)
contract.register_python_autograd(_forward_op, _backward_op)
