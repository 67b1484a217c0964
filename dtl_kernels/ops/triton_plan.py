"""Tiles, grids and temporaries of the Triton side op's launches, per shape class: pure
arithmetic, no GPU (:func:`plan`; the kernels are :mod:`dtl_kernels.ops.triton_kernels`).

Temporaries (:func:`plan` reports them: ``bwd_buffer``, ``bwd_temp_bytes``): at most
``max(TEMP_FLOOR, TEMP_SHARE · bytes of y)`` = ``max(4 MB, 0.25·y)``; with atomics at
ViT-B / Swin-B stage 3 (batch 32) 0.07–2 MB, in the deterministic mode up to the 4 MB
floor (that is what caps its slots). Nothing of the size of ``y``; the conv kernel is
read in place.

Tiles are fixed per shape class (no autotuning, so no extra compiles; the forward's and
the deterministic backward's bits never depend on timing, the default backward's fp32
atomics add in arrival order). The table in :func:`plan` comes from
ahead-of-time compiles for sm_90a with Triton 3.6.0 (``benchmarks/codegen_check.py``,
``benchmarks/results/codegen.md``): no register spills, at least two CTAs per SM, no
barrier in the shift loop, tensor-core instructions in every 16-bit dot.
"""

from __future__ import annotations

import torch

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
