"""Dispatch details of the side op that hold on any machine."""

import dataclasses

import pytest
import torch

from dtl_kernels.ops import side
from dtl_kernels.ops.contract import SideArgs


def test_cuda_limits_come_from_the_extension():
    """The CUDA backend's shape limits are the extension's own (K ≤ MAX_K, k ≤ MAX_KSIZE)."""
    from dtl_kernels.ops import _ext

    mod = _ext.cuda_module()
    if mod is None:
        pytest.skip(f"the CUDA extension is not built here ({_ext.CUDA_ERROR})")
    y = torch.empty(1, 4, 8)

    def fits(k_cols: int, ksize: int) -> bool:
        conv = torch.empty(8, 1, ksize, ksize) if ksize else None
        taps, ups = torch.empty(1, 4, k_cols), torch.empty(8, k_cols)
        args = SideArgs.of(y, taps, ups, 1.0, conv, (2, 2), 0, check=False)
        return side.BACKENDS["cuda"].fits(args)

    assert fits(24, 0)
    assert fits(mod.MAX_K, mod.MAX_KSIZE)
    assert not fits(24, mod.MAX_KSIZE + 2)
    assert not fits(mod.MAX_K + 64, 0)  # e.g. ViT-L, 24 taps of r = 8


def test_cuda_plan_answers_shared_memory():
    """plan_fits: the launch plan of the kernels decides, per dtype and device limits."""
    from dtl_kernels.ops import _ext

    mod = _ext.cuda_module()
    if mod is None:
        pytest.skip(f"the CUDA extension is not built here ({_ext.CUDA_ERROR})")
    h100 = dict(sms=132, smem=227 * 1024)
    args = (32, 197, 768, 24, 3, 1, 14, 14)
    assert mod.plan_fits(*args, 2, 4, h100["sms"], h100["smem"])  # ViT-B, bf16
    assert mod.plan_fits(*args, 4, 4, h100["sms"], h100["smem"])  # ViT-B, fp32
    assert not mod.plan_fits(2, 50, 64, 128, 7, 1, 7, 7, 8, 8, 132, 227 * 1024)  # fp64, K=128
    assert not mod.plan_fits(*args, 2, 4, 132, 8 * 1024)  # a device with 8 KB per block
    assert not mod.plan_fits(32, 197, 768, 0, 0, 0, 0, 0, 2, 4, 132, 227 * 1024)  # K = 0


def test_auto_falls_back_when_a_backend_does_not_fit(monkeypatch):
    """auto skips a backend whose fits() says no, in AUTO_ORDER."""
    x = torch.zeros(1, 2, 8)
    taps = torch.zeros(1, 2, 4)
    monkeypatch.delenv("DTL_KERNELS_BACKEND", raising=False)
    real = side.BACKENDS["cpu"]
    monkeypatch.setitem(side.BACKENDS, "cpu", dataclasses.replace(real, fits=lambda *a: False))
    args = SideArgs.of(x, taps, torch.zeros(8, 4), 100.0, check=False)
    assert side.select(x, "auto", args) == "reference"
    assert side.select(x, "auto") == "cpu"  # no shapes given: fits is not asked


def test_fp32_parameters_beside_bf16_activations():
    y = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    taps = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    ups = torch.randn(8, 4, requires_grad=True)
    conv = torch.randn(8, 1, 3, 3, requires_grad=True)
    out = side.side_add(y, taps, ups, 100.0, conv, (2, 2), 1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ups.grad.dtype == torch.float32 and conv.grad.dtype == torch.float32


def test_auto_order_on_cuda_follows_the_h100_measurements():
    """Triton first for DTL and 16-bit DTL+ k ≤ 3, the CUDA C++ kernels first otherwise."""
    y32 = torch.empty(1, 1, 8, device="meta")  # a device type is all the rule reads
    cuda_like = type("X", (), {"device": torch.device("cuda"), "dtype": torch.float32})()
    bf16_like = type("X", (), {"device": torch.device("cuda"), "dtype": torch.bfloat16})()
    w3, w5 = torch.empty(8, 1, 3, 3), torch.empty(8, 1, 5, 5)
    assert side._auto_order(cuda_like, None)[0] == "triton"
    assert side._auto_order(bf16_like, w3)[0] == "triton"
    assert side._auto_order(bf16_like, w5)[0] == "cuda"
    assert side._auto_order(cuda_like, w3)[0] == "cuda"
    assert side._auto_order(y32, None) == ("reference",)
