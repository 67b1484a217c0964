"""Dispatch details of the side op that hold on any machine."""

import torch

from dtl_kernels.ops import side


def test_cuda_limits_route_large_shapes_elsewhere():
    taps = torch.empty(1, 4, 24)
    assert side._cuda_fits(taps, None)
    assert side._cuda_fits(taps, torch.empty(8, 1, 7, 7))
    assert not side._cuda_fits(taps, torch.empty(8, 1, 9, 9))
    assert not side._cuda_fits(torch.empty(1, 4, 192), None)  # ViT-L, 24 taps of r = 8


def test_fp32_parameters_beside_bf16_activations():
    y = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    taps = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    ups = torch.randn(8, 4, requires_grad=True)
    conv = torch.randn(8, 1, 3, 3, requires_grad=True)
    out = side.side_add(y, taps, ups, 100.0, conv, (2, 2), 1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ups.grad.dtype == torch.float32 and conv.grad.dtype == torch.float32
