"""Pure-PyTorch reference of every op of the Compact Side Network (CSN).

This module is the specification: every kernel backend is tested against it and the
benchmarks use it as the eager ``torch`` baseline. Everything here is plain autograd
and works in any floating dtype, float64 included (for ``gradcheck``).

Notation (see SPEC §1). Token tensors are ``(batch, tokens, d)``; the first
``num_prefix`` tokens (class / register / distillation tokens) are not on the patch
grid, the remaining ``H*W`` tokens are the patch grid in row-major order.

    t_i = z_i · A_iᵀ                        tap        (rows × r)
    h_i = h_{i-1} + t_i · B_iᵀ               accumulate (rows × d)
    θ(x) = x · σ(βx)                         theta
    out = y + g(θ(h))   (DTL+)  /  y + θ(h)  (DTL)      add_back

``side_add`` is the stateless form the fused kernels implement: ``h`` is rebuilt from
the concatenated taps ``T = [t_1 … t_i]`` and ups ``U = [B_1 … B_i]`` as ``T · Uᵀ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def theta(x: torch.Tensor, beta: float) -> torch.Tensor:
    """High-β Swish ``θ(x) = x · sigmoid(β·x)``, elementwise, any shape and float dtype."""
    return x * torch.sigmoid(beta * x)


def theta_grad(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``θ'(x) = σ(βx) + βx·σ(βx)·(1 − σ(βx))``, the derivative of :func:`theta`."""
    s = torch.sigmoid(beta * x)
    return s + beta * (x * s * (1 - s))  # β last: no inf·0 = NaN for |x| > max/β


def tap(z: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Low-rank tap ``t = z · Aᵀ``.

    Args:
        z: ``(..., d)`` block input.
        down: ``(r, d)`` the down projection ``A``.
    Returns:
        ``(..., r)`` in ``z``'s dtype.
    """
    return torch.matmul(z, down.t())


def accumulate(h: torch.Tensor | None, t: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Side state update ``h + t · Bᵀ`` (``h = None`` means ``h = 0``).

    Args:
        h: ``(..., d)`` or ``None``.
        t: ``(..., r)`` tap.
        up: ``(d, r)`` the up projection ``B``.
    """
    update = torch.matmul(t, up.t())
    return update if h is None else h + update


def depthwise_same(x: torch.Tensor, weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Depthwise ``k×k`` convolution with PyTorch's "same" padding on a token grid.

    Args:
        x: ``(batch, H*W, d)`` patch tokens in row-major grid order.
        weight: ``(d, 1, k, k)`` depthwise kernel (no bias). For even ``k`` the extra
            padding row/column goes to the bottom/right, as ``padding="same"`` does.
        grid: ``(H, W)``.
    Returns:
        ``(batch, H*W, d)``.
    """
    b, n, d = x.shape
    if d == 0:  # nothing to convolve (conv2d refuses zero groups); the compiled kernels agree
        return x.clone()
    hgt, wid = grid
    img = x.transpose(1, 2).reshape(b, d, hgt, wid)
    k = weight.shape[-1]
    lo = (k - 1) // 2  # PyTorch's "same": the odd extra pad goes bottom / right
    out = F.conv2d(F.pad(img, (lo, k - 1 - lo, lo, k - 1 - lo)), weight, groups=d)
    return out.reshape(b, d, n).transpose(1, 2)


def mix(
    h: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: Grid | None = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """What the CSN adds back: ``θ(h)`` (DTL), or ``g(θ(h))`` on the patch grid (DTL+).

    Args:
        h: ``(batch, tokens, d)`` side state.
        beta: the Swish β (the paper fixes 100).
        conv_weight: ``(d, 1, k, k)`` shared depthwise kernel, or ``None`` for DTL.
        grid: ``(H, W)`` with ``H*W == tokens - num_prefix``; needed for DTL+.
        num_prefix: leading tokens that bypass the convolution (they get ``θ(h)``).
    """
    act = theta(h, beta)
    if conv_weight is None:
        return act
    check_grid(h, grid, num_prefix)
    if conv_weight.dtype != act.dtype:  # a 16-bit h beside a float32 kernel: as autocast would
        conv_weight = conv_weight.to(act.dtype)
    patches = depthwise_same(act[:, num_prefix:], conv_weight, grid)
    return torch.cat([act[:, :num_prefix], patches], dim=1)


def add_back(
    y: torch.Tensor,
    h: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: Grid | None = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Residual add-back after an adapted block: ``y + mix(h)``; shapes as :func:`mix`."""
    return y + mix(h, beta, conv_weight, grid, num_prefix)


def side_add(
    y: torch.Tensor,
    taps: torch.Tensor,
    ups: torch.Tensor,
    beta: float,
    conv_weight: torch.Tensor | None = None,
    grid: Grid | None = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Stateless add-back: ``y + mix(T · Uᵀ)`` — the spec of the fused side op.

    Args:
        y: ``(batch, tokens, d)`` output of the frozen block.
        taps: ``(batch, tokens, K)`` concatenated taps ``T`` (``K = i·r``).
        ups: ``(d, K)`` concatenated up projections ``U``, used in the taps' dtype (as
            autocast would: 16-bit taps beside a float32 ``y`` make ``h`` 16-bit).
        other arguments as :func:`mix`.
    """
    h = torch.matmul(taps, ups.t() if ups.dtype == taps.dtype else ups.to(taps.dtype).t())
    return add_back(y, h, beta, conv_weight, grid, num_prefix)


def check_grid(x: torch.Tensor, grid: Grid | None, num_prefix: int) -> None:
    """Raise ``ValueError`` unless ``x``'s tokens are ``num_prefix`` + an ``H×W`` grid."""
    if grid is None:
        raise ValueError("a convolution (DTL+) needs the patch grid (H, W)")
    tokens = x.shape[1]
    if num_prefix < 0 or tokens - num_prefix != grid[0] * grid[1]:
        raise ValueError(
            f"{tokens} tokens do not hold {num_prefix} prefix tokens plus a "
            f"{grid[0]}x{grid[1]} patch grid"
        )
