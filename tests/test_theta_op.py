"""The compiled ``dtl_kernels::theta`` op (CPU kernel here; CUDA kernel registered when built).

Forward and backward against the reference for float32 / float64 / bfloat16 (relative
rule for low precision), odd sizes, non-contiguous inputs, saturation for large |x|,
float64 gradcheck, ``torch.library.opcheck``, ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from dtl_kernels.ops import BackendUnavailable, _ext, reference, theta

pytestmark = pytest.mark.skipif(not _ext.cpu_built(), reason=f"CPU extension: {_ext.CPU_ERROR}")

BETA = 100.0
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SHAPES = [(1,), (7,), (1023,), (7, 197, 3), (2, 1023)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly when the cores
    are shared), so this module runs on one thread and restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _op(x, beta=BETA):
    return torch.ops.dtl_kernels.theta(x, beta)


def _ref64(x, beta=BETA):
    """Reference value and derivative in float64 (the 'truth')."""
    x64 = x.detach().to(torch.float64)
    return reference.theta(x64, beta), reference.theta_grad(x64, beta)


def _sample(shape, dtype, scale=0.05):
    """Values around θ's knee plus a tail; exact zeros included."""
    x = torch.randn(shape, dtype=torch.float64) * scale
    x.view(-1)[::5] *= 20
    x.view(-1)[::11] = 0
    return x.to(dtype)


def _assert_within_rule(got, eager, truth, dtype, what):
    """flash-attention's rule: kernel error ≤ 2 × the eager PyTorch error at that precision."""
    if dtype == torch.float64:
        torch.testing.assert_close(got.double(), truth, rtol=1e-12, atol=1e-14, msg=what)
        return
    tiny = torch.finfo(dtype).eps * 1e-3
    err = (got.double() - truth).abs().max().item()
    eager_err = (eager.double() - truth).abs().max().item()
    assert err <= 2 * eager_err + tiny, f"{what}: kernel error {err} vs eager {eager_err}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(shape, dtype):
    x = _sample(shape, dtype).requires_grad_(True)
    y = _op(x)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(y, x, g)
    assert dx.dtype == dtype

    truth, dtruth = _ref64(x)
    # Eager PyTorch at the same precision: the baseline of the relative rule.
    xe = x.detach().clone().requires_grad_(True)
    ye = reference.theta(xe, BETA)
    (dxe,) = torch.autograd.grad(ye, xe, g)
    _assert_within_rule(y.detach(), ye.detach(), truth, dtype, "forward")
    _assert_within_rule(dx, dxe, dtruth * g.double(), dtype, "backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_wrapper_backends_agree(dtype):
    x = _sample((7, 33), dtype)
    auto = theta(x, BETA)
    torch.testing.assert_close(theta(x, BETA, backend="compiled"), auto, rtol=0, atol=0)
    torch.testing.assert_close(theta(x, BETA, backend="reference"), auto)


NON_CONTIGUOUS_VIEWS = {
    "transposed": lambda t: t.t(),
    "strided": lambda t: t[:, ::3],
    "offset": lambda t: t[::2, 5:17],
    "expanded": lambda t: t.unsqueeze(0).expand(3, 64, 40),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("view", list(NON_CONTIGUOUS_VIEWS))
def test_non_contiguous_input(dtype, view):
    make = NON_CONTIGUOUS_VIEWS[view]
    base = _sample((64, 40), dtype)
    src = base.clone().requires_grad_(True)
    x = make(src)
    assert not x.is_contiguous()
    y = _op(x)
    src_ref = base.clone().requires_grad_(True)
    y_ref = reference.theta(make(src_ref), BETA)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn(tuple(reversed(y.shape)), dtype=dtype).transpose(0, -1)  # strided grad
    (dsrc,) = torch.autograd.grad(y, src, g)
    (dsrc_ref,) = torch.autograd.grad(y_ref, src_ref, g)
    torch.testing.assert_close(dsrc, dsrc_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [1.0, BETA])
def test_large_inputs_saturate_without_nan(dtype, beta):
    big = torch.finfo(dtype).max
    vals = [-1e4, -1e2, -1.0, 1.0, 1e2, 1e4, -1e30, 1e30, -big / 4, big / 4, -big, big]
    x = torch.tensor(vals, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = _op(x, beta)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all(), y
    assert torch.isfinite(dx).all(), dx
    xd = x.detach()
    pos = xd > 0
    sat = xd.abs() >= 1e2  # |βx| ≥ 100: σ(βx) is 0 or 1 in every dtype here
    # θ(x) → x for x ≫ 0, → 0 for x ≪ 0; θ' → 1 and 0.
    torch.testing.assert_close(y.detach()[sat], torch.where(pos, xd, torch.zeros_like(xd))[sat])
    torch.testing.assert_close(dx[sat], pos[sat].to(dtype))
    truth, dtruth = _ref64(xd[~sat], beta)
    torch.testing.assert_close(y.detach()[~sat].double(), truth, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(dx[~sat].double(), dtruth, rtol=1e-2, atol=1e-6)


def test_nan_propagates():
    x = torch.tensor([float("nan"), 0.0, 1.0])
    assert torch.isnan(_op(x)[0]) and not torch.isnan(_op(x)[1:]).any()


@pytest.mark.parametrize("beta", [0.7, BETA])
def test_gradcheck_float64(beta):
    x = (torch.randn(3, 37, dtype=torch.float64) * 3 / beta).requires_grad_(True)
    assert gradcheck(lambda t: _op(t, beta), (x,))
    assert gradcheck(lambda t: theta(t, beta), (x,))


def test_beta_is_used_in_double_precision():
    # Inductor passes scalars as Python floats (fp64): a β that is not an fp32 number
    # must still be used as-is for float64 tensors.
    beta = 100.000000001
    x = torch.randn(1023, dtype=torch.float64) * 0.05
    torch.testing.assert_close(_op(x, beta), reference.theta(x, beta), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x = _sample((5, 7), dtype).requires_grad_(True)
    torch.library.opcheck(torch.ops.dtl_kernels.theta.default, (x, BETA))
    g = torch.randn(5, 7, dtype=dtype)
    torch.library.opcheck(torch.ops.dtl_kernels.theta_backward.default, (g, x.detach(), BETA))


def test_torch_compile_fullgraph():
    x = _sample((4, 33), torch.float32).requires_grad_(True)
    fn = torch.compile(lambda t: _op(t) * 2, fullgraph=True, backend="aot_eager")
    y = fn(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, 2 * reference.theta(x.detach(), BETA))
    torch.testing.assert_close(dx, 2 * reference.theta_grad(x.detach(), BETA))


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        theta(torch.arange(4), BETA)
    with pytest.raises(TypeError, match="floating"):
        theta([0.1, 0.2], BETA)
    with pytest.raises(ValueError, match="backend"):
        theta(torch.zeros(3), BETA, backend="magic")
    with pytest.raises(RuntimeError, match="floating"):
        _op(torch.arange(4), BETA)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.dtl_kernels.theta_backward(torch.zeros(3), torch.zeros(4), BETA)


def test_cuda_kernel_registered_when_built():
    if not _ext.cuda_built():
        pytest.skip(f"CUDA extension not built: {_ext.CUDA_ERROR}")
    for op in ("dtl_kernels::theta", "dtl_kernels::theta_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def test_compiled_backend_on_cuda_tensor_without_extension_is_clear():
    if _ext.cuda_built():
        pytest.skip("the CUDA extension is built")
    if not torch.cuda.is_available():
        pytest.skip("no GPU: cannot make a CUDA tensor")
    with pytest.raises(BackendUnavailable, match="not built"):
        theta(torch.zeros(3, device="cuda"), BETA, backend="compiled")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here (the CUDA kernel is only checked to be registered)")
    if not _ext.cuda_built():
        pytest.skip(f"CUDA extension not built: {_ext.CUDA_ERROR}")
    x = _sample((7, 1023), dtype).cuda().requires_grad_(True)
    y = _op(x)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xc = x.detach().cpu().requires_grad_(True)
    yc = reference.theta(xc, BETA)
    (dxc,) = torch.autograd.grad(yc, xc, g.cpu())
    truth, dtruth = _ref64(xc)
    _assert_within_rule(y.detach().cpu(), yc.detach(), truth, dtype, "cuda forward")
    _assert_within_rule(dx.cpu(), dxc, dtruth * g.cpu().double(), dtype, "cuda backward")
    # Non-contiguous and saturating inputs on the GPU too.
    xt = _sample((64, 40), dtype).cuda().t()
    torch.testing.assert_close(_op(xt).cpu(), reference.theta(xt.cpu(), BETA))
    big = torch.tensor([-1e30, 1e30], dtype=torch.float64).to(dtype).cuda().requires_grad_(True)
    (dbig,) = torch.autograd.grad(_op(big).sum(), big)
    assert torch.isfinite(dbig).all()
