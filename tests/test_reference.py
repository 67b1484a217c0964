"""The pure-PyTorch reference ops (``dtl_kernels.ops.reference``): the specification.

float64 gradcheck of every op, DTL and DTL+ (k = 3, 4, 5), prefix tokens 0 / 1 / 5,
square and non-square grids; the stateless ``side_add`` against the stepwise
``accumulate`` + ``add_back``; PyTorch's "same" padding for even k; θ' against autograd;
clear errors for a grid that does not hold the tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from dtl_kernels.ops import reference as ref

BETA = 100.0
F64 = dict(dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _side_state(shape, scale=0.03):
    """Values around θ's knee (|βx| ~ 3) so both sides of the sigmoid are exercised."""
    return (torch.randn(shape, **F64) * scale).requires_grad_(True)


def _spec_mix(h, beta, weight, grid, num_prefix):
    """SPEC §1 written out: θ on every token, then the depthwise conv on the patch grid."""
    act = h * torch.sigmoid(beta * h)
    if weight is None:
        return act
    b, _, d = h.shape
    patches = act[:, num_prefix:].transpose(1, 2).reshape(b, d, *grid)
    conv = F.conv2d(patches, weight, padding="same", groups=d)
    return torch.cat([act[:, :num_prefix], conv.flatten(2).transpose(1, 2)], dim=1)


# ------------------------------------------------------------------------------ theta


@pytest.mark.parametrize("beta", [1.0, 10.0, BETA])
def test_theta_gradcheck(beta):
    x = _side_state((3, 7, 5), scale=3.0 / beta)
    assert gradcheck(lambda t: ref.theta(t, beta), (x,))
    assert gradgradcheck(lambda t: ref.theta(t, beta), (x,))


@pytest.mark.parametrize("beta", [0.5, BETA])
def test_theta_value_and_derivative(beta):
    x = torch.linspace(-0.2, 0.2, 401, **F64).requires_grad_(True)
    y = ref.theta(x, beta)
    torch.testing.assert_close(y, x * torch.sigmoid(beta * x))
    (auto,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ref.theta_grad(x.detach(), beta), auto)
    assert ref.theta(torch.zeros(3, **F64), beta).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_theta_saturates_without_nan(dtype):
    big = torch.finfo(dtype).max / 2
    x = torch.tensor([-big, -1e30, -1e4, -1.0, 1.0, 1e4, 1e30, big], dtype=dtype)
    y = ref.theta(x, BETA)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.where(x > 0, x, torch.zeros_like(x)))
    d = ref.theta_grad(x, BETA)
    assert torch.isfinite(d).all(), d
    torch.testing.assert_close(d, (x > 0).to(dtype))


# ------------------------------------------------------------------- tap / accumulate


def test_tap_and_accumulate_gradcheck():
    z = torch.randn(2, 7, 6, **F64).requires_grad_(True)
    a = torch.randn(3, 6, **F64).requires_grad_(True)
    b = torch.randn(6, 3, **F64).requires_grad_(True)
    h0 = torch.randn(2, 7, 6, **F64).requires_grad_(True)
    assert gradcheck(ref.tap, (z, a))
    assert gradcheck(lambda t, u: ref.accumulate(None, t, u), (ref.tap(z, a).detach(), b))
    assert gradcheck(lambda h, zz, aa, bb: ref.accumulate(h, ref.tap(zz, aa), bb), (h0, z, a, b))


def test_tap_and_accumulate_values():
    z = torch.randn(2, 5, 4, **F64)
    a = torch.randn(2, 4, **F64)
    b = torch.randn(4, 2, **F64)
    t = ref.tap(z, a)
    assert t.shape == (2, 5, 2)
    torch.testing.assert_close(t, torch.einsum("btd,rd->btr", z, a))
    h = ref.accumulate(None, t, b)
    torch.testing.assert_close(h, torch.einsum("btr,dr->btd", t, b))
    torch.testing.assert_close(ref.accumulate(h, t, b), 2 * h)


# ------------------------------------------------------------------- mix / add_back

MIX_CASES = [
    # (conv k or 0, grid, num_prefix)
    (0, (3, 4), 0),
    (0, (3, 4), 5),
    (3, (3, 4), 0),
    (3, (4, 4), 1),
    (4, (3, 4), 1),
    (4, (4, 3), 5),
    (4, (2, 5), 0),
    (5, (3, 4), 5),
    (5, (2, 3), 1),  # kernel larger than the grid
    (5, (1, 6), 0),  # one-row grid
]


@pytest.mark.parametrize("k,grid,num_prefix", MIX_CASES)
def test_mix_and_add_back_gradcheck(k, grid, num_prefix):
    d, batch = 3, 2
    tokens = num_prefix + grid[0] * grid[1]
    h = _side_state((batch, tokens, d))
    y = torch.randn(batch, tokens, d, **F64).requires_grad_(True)
    w = torch.randn(d, 1, k, k, **F64).requires_grad_(True) if k else None
    if w is None:
        assert gradcheck(lambda hh: ref.mix(hh, BETA, None, grid, num_prefix), (h,))
        assert gradcheck(lambda yy, hh: ref.add_back(yy, hh, BETA), (y, h))
    else:
        assert gradcheck(lambda hh, ww: ref.mix(hh, BETA, ww, grid, num_prefix), (h, w))
        assert gradcheck(
            lambda yy, hh, ww: ref.add_back(yy, hh, BETA, ww, grid, num_prefix), (y, h, w)
        )


@pytest.mark.parametrize("k,grid,num_prefix", MIX_CASES)
def test_mix_matches_spec(k, grid, num_prefix):
    d, batch = 5, 2
    tokens = num_prefix + grid[0] * grid[1]
    h = torch.randn(batch, tokens, d, **F64) * 0.03
    y = torch.randn(batch, tokens, d, **F64)
    w = torch.randn(d, 1, k, k, **F64) if k else None
    expected = _spec_mix(h, BETA, w, grid, num_prefix)
    torch.testing.assert_close(ref.mix(h, BETA, w, grid, num_prefix), expected)
    torch.testing.assert_close(ref.add_back(y, h, BETA, w, grid, num_prefix), y + expected)
    # Prefix tokens get θ(h) only, with or without a convolution.
    torch.testing.assert_close(
        ref.mix(h, BETA, w, grid, num_prefix)[:, :num_prefix], ref.theta(h[:, :num_prefix], BETA)
    )


def test_conv_does_not_mix_batch_or_channels():
    grid, d = (3, 4), 4
    h = torch.randn(2, 12, d, **F64) * 0.03
    w = torch.randn(d, 1, 3, 3, **F64)
    full = ref.mix(h, BETA, w, grid, 0)
    torch.testing.assert_close(ref.mix(h[1:], BETA, w, grid, 0), full[1:])
    torch.testing.assert_close(ref.mix(h[..., 2:3], BETA, w[2:3], grid, 0), full[..., 2:3])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("grid", [(3, 5), (2, 3), (6, 6)])
def test_depthwise_same_matches_torch_padding_same(k, grid):
    d = 3
    x = torch.randn(2, grid[0] * grid[1], d, **F64)
    w = torch.randn(d, 1, k, k, **F64)
    img = x.transpose(1, 2).reshape(2, d, *grid)
    expected = F.conv2d(img, w, padding="same", groups=d).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ref.depthwise_same(x, w, grid), expected)


def test_even_kernel_pads_bottom_right():
    # A 2×2 kernel that only reads the bottom-right tap: output p = input p + (1, 1),
    # zero outside — the extra padding row/column is at the bottom/right.
    grid = (3, 4)
    x = torch.arange(12, **F64).reshape(1, 12, 1)
    w = torch.zeros(1, 1, 2, 2, **F64)
    w[0, 0, 1, 1] = 1
    out = ref.depthwise_same(x, w, grid).reshape(3, 4)
    img = x.reshape(3, 4)
    expected = torch.zeros(3, 4, **F64)
    expected[:-1, :-1] = img[1:, 1:]
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------- side_add


@pytest.mark.parametrize("k,grid,num_prefix", [(0, (3, 4), 1), (3, (3, 4), 0), (4, (2, 5), 5)])
def test_side_add_equals_stepwise_accumulation(k, grid, num_prefix):
    d, r, blocks, batch = 6, 2, 4, 2
    tokens = num_prefix + grid[0] * grid[1]
    zs = [torch.randn(batch, tokens, d, **F64) for _ in range(blocks)]
    downs = [torch.randn(r, d, **F64) / d**0.5 for _ in range(blocks)]
    ups = [torch.randn(d, r, **F64) * 0.05 for _ in range(blocks)]
    y = torch.randn(batch, tokens, d, **F64)
    w = torch.randn(d, 1, k, k, **F64) if k else None
    h = None
    for z, a, b in zip(zs, downs, ups, strict=False):
        h = ref.accumulate(h, ref.tap(z, a), b)
    stepwise = ref.add_back(y, h, BETA, w, grid, num_prefix)
    taps = torch.cat([ref.tap(z, a) for z, a in zip(zs, downs, strict=False)], dim=-1)
    stateless = ref.side_add(y, taps, torch.cat(ups, dim=1), BETA, w, grid, num_prefix)
    torch.testing.assert_close(stateless, stepwise)


@pytest.mark.parametrize("k,num_prefix", [(0, 0), (3, 1), (4, 5), (5, 0)])
def test_side_add_gradcheck(k, num_prefix):
    grid, d, kk = (2, 3), 3, 4
    tokens = num_prefix + grid[0] * grid[1]
    y = torch.randn(2, tokens, d, **F64).requires_grad_(True)
    taps = torch.randn(2, tokens, kk, **F64).requires_grad_(True)
    ups = (torch.randn(d, kk, **F64) * 0.03).requires_grad_(True)
    args = [y, taps, ups]
    if k:
        args.append(torch.randn(d, 1, k, k, **F64).requires_grad_(True))
        fn = lambda a, t, u, w: ref.side_add(a, t, u, BETA, w, grid, num_prefix)  # noqa: E731
    else:
        fn = lambda a, t, u: ref.side_add(a, t, u, BETA)  # noqa: E731
    assert gradcheck(fn, tuple(args))


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "grid,num_prefix",
    [((3, 3), 0), ((3, 4), 1), ((4, 3), 2), ((2, 6), 13), ((3, 4), -1)],
)
def test_grid_that_does_not_hold_the_tokens_is_an_error(grid, num_prefix):
    h = torch.randn(2, 12, 3, **F64)  # 12 tokens
    w = torch.randn(3, 1, 3, 3, **F64)
    with pytest.raises(ValueError, match="tokens"):
        ref.mix(h, BETA, w, grid, num_prefix)
    with pytest.raises(ValueError, match="tokens"):
        ref.add_back(h, h, BETA, w, grid, num_prefix)
    with pytest.raises(ValueError, match="tokens"):
        ref.side_add(h, h, torch.randn(3, 3, **F64), BETA, w, grid, num_prefix)


def test_conv_without_grid_is_an_error():
    h = torch.randn(1, 4, 3, **F64)
    with pytest.raises(ValueError, match="grid"):
        ref.mix(h, BETA, torch.randn(3, 1, 3, 3, **F64), None, 0)
