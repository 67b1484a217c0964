"""The Triton kernels of the fused side op ``out = y + mix(T·Uᵀ)``: launched by
:mod:`dtl_kernels.ops.triton_side`, with the tiles and grids of
:mod:`dtl_kernels.ops.triton_plan`.

Shapes and dtypes: those of the op (:mod:`dtl_kernels.ops.triton_side`). Math in fp32
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
  would leave SMs idle (:func:`triton_plan.plan`: at least ``BWD_CTAS_PER_SM`` programs
  per SM where the work allows, then the fewest chunks on the busiest SM); at large
  batches each item covers all of d.
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

Deterministic mode (:func:`dtl_kernels.ops.triton_side.deterministic_mode`:
``torch.use_deterministic_algorithms(True)`` or ``DTL_KERNELS_DETERMINISTIC=1``): the
same kernel without atomics. A persistent grid of
at most ``2·SMs`` programs, each owning a fixed set of row tiles over all of d (``∂T``
stored once) and its own slot of the buffer (``∂U`` / ``∂w`` added by load + store, one
writer, a fixed order); ``_bwd_finish_kernel`` sums the slots in slot order. Bit-identical
runs; fewer programs (as many slots as the temporaries rule allows).

Dots and σ. 16-bit taps / ups take the tensor cores: ``T·Uᵀ`` is exact (products of
16-bit values are exact in fp32 accumulation); ``S·U`` and ``Tᵀ·S`` (= ``∂Uᵀ``, so that the
tensor cores' M is ``BLOCK_K``) split the fp32 ``S`` into a 16-bit high part and a 16-bit
remainder (two dots, ~16 significant bits of ``S``).
float32 uses the exact ("ieee", FMA) dot, no TF32; float64 the fp64 dot. On CUDA σ runs on
the SFU's approximate ``ex2`` / ``rcp`` (``FAST``, a few ulp, saturating to exactly 0 / 1);
the interpreter and fp64 use ``tl.sigmoid``.

The kernels are defined only when triton is importable; ``TRITON_INTERPRET=1`` must be set
before this module is imported for them to run on CPU tensors.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; triton_side.available() says False
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


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
