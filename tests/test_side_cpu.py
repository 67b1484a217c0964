"""The fused CPU side op (csrc/cpu/side.cpp): the raw ops' own checks, gradcheck, opcheck,
determinism, dispatch and extreme β. Its accuracy over the shared case table is in
``test_side_backends.py``."""

from __future__ import annotations

import pytest
import torch

from dtl_kernels.ops import compiled_side, reference, side

pytestmark = pytest.mark.skipif(
    not compiled_side.available("cpu"), reason="the CPU extension is not built (make build)"
)

OP = torch.ops.dtl_kernels


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(batch, prefix, grid, d, k_cols, k, dtype, h_scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    y = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    taps = torch.randn(batch, n, k_cols, generator=g, dtype=torch.float64)
    ups = torch.randn(d, k_cols, generator=g, dtype=torch.float64) * (h_scale / k_cols**0.5)
    conv = torch.randn(d, 1, k, k, generator=g, dtype=torch.float64) / k if k else None

    def cast(t):
        return None if t is None else t.to(dtype)

    return cast(y), cast(taps), cast(ups), cast(conv)


def run_reference(y, taps, ups, beta, conv, grid, prefix, grad, dtype):
    """Reference output and gradients, computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (taps, ups)]
    w = None if conv is None else conv.detach().to(dtype).requires_grad_()
    out = reference.side_add(y.to(dtype), *leaves, beta, w, grid if w is not None else None, prefix)
    grads = torch.autograd.grad(out, leaves + ([w] if w is not None else []), grad.to(dtype))
    return [out.detach()] + list(grads)


def run_fused(y, taps, ups, beta, conv, grid, prefix, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (y, taps, ups)]
    w = None if conv is None else conv.detach().clone().requires_grad_()
    out = side.side_add(*leaves, beta, w, grid if w is not None else None, prefix, backend="cpu")
    wanted = leaves + ([w] if w is not None else [])
    grads = torch.autograd.grad(out, wanted, grad)
    assert grads[0] is grad or torch.equal(grads[0], grad)  # ∂y = G, pass-through
    return [out.detach()] + list(grads[1:])


# d = 16: whole float64 vectors, where DTL's kernels skip the tile (y / G read in place)
GRADCHECK_CASES = [(0, 0, (2, 3), 11), (0, 0, (3, 5), 16), (3, 1, (3, 3), 11), (4, 0, (2, 5), 11),
                   (5, 2, (3, 2), 11)]  # fmt: skip


@pytest.mark.parametrize("k,prefix,grid,d", GRADCHECK_CASES)
def test_gradcheck_float64(k, prefix, grid, d):
    y, taps, ups, conv = make_inputs(2, prefix, grid, d, 4, k, torch.float64, h_scale=0.5)
    gh, gw = grid

    def f(y, taps, ups, *w):
        return OP.side_forward(y, taps, ups, w[0] if w else None, gh, gw, prefix, 3.0)

    inputs = [t.requires_grad_() for t in (y, taps, ups)] + ([conv.requires_grad_()] if k else [])
    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(k, dtype):
    y, taps, ups, conv = make_inputs(2, 1, (3, 4), 20, 6, k, dtype)
    for t in (y, taps, ups) + ((conv,) if k else ()):
        t.requires_grad_()
    args = (y, taps, ups, conv, 3, 4, 1, 100.0)
    result = torch.library.opcheck(OP.side_forward.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    grad = torch.randn_like(y).detach()
    w = None if conv is None else conv.detach()
    bwd_args = (grad, taps.detach(), ups.detach(), w, 3, 4, 1, 100.0)
    result = torch.library.opcheck(
        OP.side_backward.default, bwd_args, test_utils=("test_schema", "test_faketensor")
    )
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize(
    "batch,prefix,grid,k,d,side_dtype",
    [(1, 0, (31, 33), 0, 72, None), (2, 0, (17, 19), 0, 192, None), (1, 3, (30, 34), 4, 72, None),
     (6, 1, (14, 14), 3, 72, None), (2, 0, (17, 19), 0, 192, torch.bfloat16),
     (1, 1, (14, 14), 3, 72, torch.bfloat16)],
)  # fmt: skip
def test_backward_is_deterministic(batch, prefix, grid, k, d, side_dtype):
    """Bit-identical gradients from run to run, and with 1 or 2 threads (set here: the
    suite's workers run one thread each). d = 192: DTL reads G in place, two full-width
    chunks split between two channel groups (∂T's partials summed across them). bf16 taps
    and ups beside a float32 y: the autocast mix (bf16 pairs where the CPU has AVX512-BF16)."""
    y, taps, ups, conv = make_inputs(batch, prefix, grid, d, 12, k, torch.float32, h_scale=1.0)
    if side_dtype is not None:
        taps, ups = taps.to(side_dtype), ups.to(side_dtype)
    grad = torch.randn(y.shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = run_fused(y, taps, ups, 100.0, conv, grid, prefix, grad)
        again = run_fused(y, taps, ups, 100.0, conv, grid, prefix, grad)
        torch.set_num_threads(1)
        single = run_fused(y, taps, ups, 100.0, conv, grid, prefix, grad)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


# (rtol, atol as a share of the largest reference value)
@pytest.mark.parametrize(
    "dtype, rtol, atol",
    [(torch.float32, 1e-4, None), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 4e-3, 4e-3)],
)
def test_dtl_wider_than_one_forward_chunk_mixes_in_place_and_tile_chunks(dtype, rtol, atol):
    """d = 2100 > the forward's widest chunk (2048 floats): the first chunk is written in
    place (out = y + θ(h) from the registers; 16-bit converted there), the last (52 channels)
    through the tile; the backward's chunks (512 channels here) read G in place but for the
    last. Against the float64 reference on the same values, forward and every gradient."""
    y, taps, ups, _ = make_inputs(1, 0, (4, 5), 2100, 6, 0, dtype, h_scale=1.0)
    grad = torch.randn(y.shape).to(dtype)
    ours = run_fused(y, taps, ups, 100.0, None, (4, 5), 0, grad)
    ref = run_reference(y, taps, ups, 100.0, None, (4, 5), 0, grad, torch.float64)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == dtype
        abs_tol = 1e-5 if atol is None else atol * b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=abs_tol)


def test_empty_batch():
    y, taps, ups, conv = make_inputs(1, 1, (2, 2), 8, 2, 3, torch.float32)
    y, taps = y[:0], taps[:0]
    out = OP.side_forward(y, taps, ups, conv, 2, 2, 1, 100.0)
    assert out.shape == y.shape
    gt, gu, gw = OP.side_backward(y, taps, ups, conv, 2, 2, 1, 100.0)
    assert gt.shape == taps.shape and not gu.any() and not gw.any()


# -- bad input: clear errors, never a crash --------------------------------------------
def _good():
    y, taps, ups, conv = make_inputs(2, 1, (3, 3), 8, 4, 3, torch.float32)
    return dict(y=y, taps=taps, ups=ups, beta=100.0, conv_weight=conv, grid=(3, 3), num_prefix=1)


BAD = [
    ("y", lambda a: a["y"][0], ValueError, "y must be"),
    ("taps", lambda a: a["taps"][:, :5], ValueError, "taps must be"),
    ("ups", lambda a: a["ups"][:7], ValueError, "ups must be"),
    ("ups", lambda a: a["ups"][:, :3], ValueError, "ups must be"),
    ("conv_weight", lambda a: a["conv_weight"][:, :, :2], ValueError, "conv_weight"),
    ("conv_weight", lambda a: a["conv_weight"][:4], ValueError, "conv_weight"),
    ("grid", lambda a: (2, 3), ValueError, "patch grid"),
    ("grid", lambda a: None, ValueError, "grid"),
    ("num_prefix", lambda a: 11, ValueError, "num_prefix"),
    ("num_prefix", lambda a: -1, ValueError, "num_prefix"),
    ("taps", lambda a: a["taps"].double(), TypeError, "dtype"),
    ("y", lambda a: a["y"].int(), TypeError, "floating"),
    ("ups", lambda a: a["ups"].tolist(), TypeError, "tensor"),
    ("beta", lambda a: float("nan"), TypeError, "beta"),
    ("ups", lambda a: a["ups"].to("meta"), ValueError, "device"),
    ("y", lambda a: a["y"].to(torch.float8_e4m3fn), TypeError, "float32, float16"),  # no kernel
    ("y", lambda a: a["y"].to_sparse(), TypeError, "dense"),
    ("taps", lambda a: a["taps"].to_sparse(), TypeError, "dense"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_width_dtl_plus_gives_the_empty_result(backend):
    """d = 0 (no channels to convolve): every backend returns y's empty shape (the
    reference's conv2d refuses zero groups, so it skips the convolution)."""
    y, taps = torch.randn(2, 5, 0), torch.randn(2, 5, 3, requires_grad=True)
    ups, conv = torch.randn(0, 3), torch.randn(0, 1, 3, 3)
    out = side.side_add(y, taps, ups, 100.0, conv, (2, 2), 1, backend=backend)
    assert out.shape == (2, 5, 0)
    out.sum().backward()
    assert taps.grad.shape == taps.shape and not taps.grad.any()


@pytest.mark.parametrize("name,make,exc,match", BAD)
def test_bad_inputs_raise_clear_errors(name, make, exc, match):
    args = _good()
    args[name] = make(args)
    with pytest.raises(exc, match=match):
        side.side_add(**args, backend="cpu")


def test_raw_op_checks_its_inputs():
    """The C++ op itself rejects inconsistent input with RuntimeError (no crash)."""
    a = _good()
    y, taps, ups, w = a["y"], a["taps"], a["ups"], a["conv_weight"]
    bad_calls = [
        (y[0], taps, ups, w, 3, 3, 1),
        (y, taps[:, :4], ups, w, 3, 3, 1),
        (y, taps, ups[:5], w, 3, 3, 1),
        (y, taps, ups.double(), w, 3, 3, 1),
        (y, taps, ups, w[:, :, :2], 3, 3, 1),
        (y, taps, ups, w, 2, 3, 1),
        (y, taps, ups, w, 3, 3, -1),
        (y, taps, ups, w, 0, 3, 1),
        (y.int(), taps.int(), ups.int(), None, 0, 0, 0),
        (y, taps[..., :0], ups[:, :0], None, 0, 0, 0),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            OP.side_forward(*call, 100.0)
        with pytest.raises(RuntimeError):
            OP.side_backward(*call, 100.0)


# -- dispatch -------------------------------------------------------------------------
def test_auto_dispatch_uses_the_cpu_kernel(monkeypatch):
    x = torch.zeros(1, 1, 4)
    monkeypatch.delenv("DTL_KERNELS_BACKEND", raising=False)
    assert side.resolve_backend(x) == "cpu"
    monkeypatch.setenv("DTL_KERNELS_BACKEND", "reference")
    assert side.resolve_backend(x) == "reference"
    monkeypatch.setenv("DTL_KERNELS_BACKEND", "cpu")
    assert side.resolve_backend(x) == "cpu"


def test_ups_in_float32_with_bfloat16_activations():
    """Parameters stay float32 under bfloat16 activations: ups is cast, its grad is fp32."""
    y, taps, ups, conv = make_inputs(1, 1, (3, 3), 16, 4, 3, torch.bfloat16)
    ups32 = ups.float().requires_grad_()
    conv32 = conv.float().requires_grad_()
    out = side.side_add(y, taps, ups32, 100.0, conv32, (3, 3), 1, backend="cpu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ups32.grad.dtype == torch.float32 and conv32.grad.dtype == torch.float32


# -- extreme β ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3])
def test_extreme_beta_multiplies_last_like_the_reference(k):
    """β = 1e38 (near float32's max): θ'(h) = s + β·(h·s·(1 − s)) stays finite because β
    multiplies last (side_math.h); the CPU vector code must follow the same order."""
    y, taps, ups, conv = make_inputs(2, 1, (3, 4), 24, 6, k, torch.float32, h_scale=10.0)
    grid = (3, 4)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    ours = run_fused(y, taps, ups, 1e38, conv, grid, 1, grad)
    ref = run_reference(y, taps, ups, 1e38, conv, grid, 1, grad, torch.float64)
    for o, r in zip(ours, ref, strict=True):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4)


def test_beta_beyond_the_compute_type_is_refused():
    y, taps, ups, _ = make_inputs(1, 0, (2, 2), 8, 2, 0, torch.float32)
    with pytest.raises(ValueError, match="beta"):
        side.side_add(y, taps, ups, 1e39, backend="cpu")  # inf in float32
    with pytest.raises(RuntimeError, match="beta"):
        OP.side_forward(y, taps, ups, None, 0, 0, 0, 1e39)
    out = side.side_add(y.double(), taps.double(), ups.double(), 1e39, backend="cpu")
    assert torch.isfinite(out).all()  # float64 computes in float64: 1e39 is fine


def test_raw_op_errors_name_the_numbers_without_overflow():
    """Integer arguments are bounded before any product (no wrap-around that would pass the
    check and crash in the kernel), and the message names the values (built without
    iostreams: see csrc/side_checks.h)."""
    z = torch.zeros
    with pytest.raises(
        RuntimeError,
        match=r"4 tokens do not hold 0 prefix tokens plus a "
        r"4611686018427387905x4 patch grid",
    ):
        OP.side_forward(z(1, 4, 8), z(1, 4, 1), z(8, 1), z(8, 1, 3, 3), 2**62 + 1, 4, 0, 100.0)
    with pytest.raises(RuntimeError, match=r"taps \[1, 3, 1\] do not match y \[1, 4, 8\]"):
        OP.side_forward(z(1, 4, 8), z(1, 3, 1), z(8, 1), None, 0, 0, 0, 100.0)
    with pytest.raises(RuntimeError, match=r"got 1e\+39"):
        OP.side_forward(z(1, 4, 8), z(1, 4, 1), z(8, 1), None, 0, 0, 0, 1e39)


@pytest.mark.parametrize("k", [0, 3])
def test_no_grad_calls_skip_autograd_and_agree(k):
    """Without anything to record (no grad mode, or no input requiring grad) the op's
    autograd kernel calls the kernel directly (csrc/autograd.cpp): same values as a
    recorded call, no graph; a recorded call still records; a forward-mode tangent is
    still refused, with or without grad mode."""
    import torch.autograd.forward_ad as fwad

    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 5, 8, generator=gen)
    taps = torch.randn(2, 5, 3, generator=gen)
    ups = torch.randn(8, 3, generator=gen, requires_grad=True)
    conv = torch.randn(8, 1, k, k, generator=gen) if k else None
    grid = (2, 2) if k else (0, 0)
    op = torch.ops.dtl_kernels.side_forward.default
    args = (y, taps, ups, conv, *grid, 1, 3.0)
    recorded = op(*args)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        plain = op(*args)
    frozen = op(y, taps, ups.detach(), conv, *grid, 1, 3.0)
    for out in (plain, frozen):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, recorded.detach())
    for grad_mode in (False, True):
        with fwad.dual_level(), torch.set_grad_enabled(grad_mode):
            dual = fwad.make_dual(y, torch.ones_like(y))
            with pytest.raises(RuntimeError, match="jvp is not implemented"):
                op(dual, taps, ups.detach(), conv, *grid, 1, 3.0)
