"""The Triton launchers' allocations in one call (``_C_bind.forward_buffers`` /
``backward_buffers``, csrc/bind/launch_buffers.cpp) against the Python fallback
(``triton_side._forward_buffers_py`` / ``_backward_buffers_py``) that runs where _C_bind is
not built: the same tensors (shape, strides, dtype, device, zeroed where promised, the
buffer's tail a view of it), and bad arguments refused by name."""

from __future__ import annotations

import pytest
import torch

from dtl_kernels.ops import _ext

pytestmark = pytest.mark.skipif(_ext.BINDING is None, reason=f"no _C_bind: {_ext.BINDING_ERROR}")
ts = pytest.importorskip("dtl_kernels.ops.triton_side")


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def _poison(numel: int, dtype: torch.dtype) -> None:
    """Leave NaNs in freed blocks of this size, which the allocator is likely (measured:
    one call in two or more) to hand out for the next allocation of the size."""
    blocks = [torch.full((numel,), float("nan"), dtype=dtype) for _ in range(64)]
    del blocks


@pytest.mark.parametrize("scratch", [0, 37])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_forward_buffers_match_the_python_fallback(scratch, acc):
    y = torch.randn(3, 5, 8).transpose(0, 1)  # non-contiguous: out is contiguous anyway
    got = ts._forward_buffers(y, scratch, acc)
    want = ts._forward_buffers_py(y, scratch, acc)
    assert all(_same_kind(a, b) for a, b in zip(got, want, strict=True))
    assert got[0].is_contiguous() and got[0].shape == y.shape and got[0].dtype == y.dtype
    assert got[1].shape == (scratch,) and got[1].dtype == acc


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("zero_taps", [False, True])
@pytest.mark.parametrize("tbuf_start", [0, 24])
def test_backward_buffers_match_the_python_fallback(conv, zero_taps, tbuf_start):
    grad_out = torch.randn(2, 5, 8)
    taps = torch.randn(2, 7, 5).transpose(1, 2)[:, :, :6].bfloat16()  # strided, 16-bit
    ups = torch.randn(6, 8).t()
    weight = torch.randn(8, 1, 3, 3) if conv else None
    args = (grad_out, taps, ups, weight, zero_taps, 40, tbuf_start, torch.float32)
    for _ in range(8):  # memory handed out again holds NaNs: zeroed means written here
        _poison(40, torch.float32)
        _poison(taps.numel(), taps.dtype)
        got = ts._backward_buffers(*args)
        want = ts._backward_buffers_py(*args)
        assert all(_same_kind(a, b) for a, b in zip(got, want, strict=True))
        grad_taps, grad_ups, grad_conv, buf, tbuf = got
        assert grad_taps.is_contiguous() and grad_taps.dtype == taps.dtype
        assert grad_ups.is_contiguous() and grad_ups.shape == ups.shape
        assert grad_conv.shape == (weight.shape if conv else (0,))
        assert torch.equal(buf, torch.zeros(40))
        if zero_taps:
            assert torch.equal(grad_taps, torch.zeros_like(taps))
        assert tbuf.data_ptr() == buf.data_ptr() + 4 * tbuf_start
        assert tbuf.numel() == 40 - tbuf_start and (tbuf is buf) == (tbuf_start == 0)


def test_bad_arguments_are_refused_by_name():
    y, taps, ups = torch.randn(2, 5, 8), torch.randn(2, 5, 6), torch.randn(8, 6)
    fwd, bwd = _ext.BINDING.forward_buffers, _ext.BINDING.backward_buffers
    with pytest.raises(TypeError, match="takes 3 arguments"):
        fwd(y, 0)
    with pytest.raises(TypeError, match="y must be a Tensor, got list"):
        fwd([1], 0, torch.float32)
    with pytest.raises(TypeError, match="scratch_numel must be an int, got bool"):
        fwd(y, True, torch.float32)
    with pytest.raises(ValueError, match="scratch_numel must be a size"):
        fwd(y, -1, torch.float32)
    with pytest.raises(ValueError, match="scratch_numel must be a size"):
        fwd(y, 1 << 70, torch.float32)
    with pytest.raises(TypeError, match="accumulator dtype must be a torch.dtype"):
        fwd(y, 0, "float32")
    for acc in (torch.uint8, torch.bfloat16, torch.complex64):  # no accumulator of theirs
        with pytest.raises(ValueError, match="must be torch.float32 or torch.float64, got"):
            fwd(y, 4, acc)
        with pytest.raises(ValueError, match="must be torch.float32 or torch.float64, got"):
            bwd(y, taps, ups, None, False, 10, 0, acc)
    good = (y, taps, ups, None, False, 10, 0, torch.float32)
    with pytest.raises(TypeError, match="takes 8 arguments"):
        bwd(*good[:7])
    with pytest.raises(TypeError, match="conv_weight must be a Tensor, got int"):
        bwd(*good[:3], 3, *good[4:])
    with pytest.raises(TypeError, match="zero_taps must be a bool"):
        bwd(*good[:4], 1, *good[5:])
    with pytest.raises(ValueError, match="tbuf_start 11 is past the buffer's 10 elements"):
        bwd(*good[:6], 11, torch.float32)
    with pytest.raises(ValueError, match="buf_numel must be a size"):
        bwd(*good[:5], -3, 0, torch.float32)
