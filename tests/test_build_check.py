"""An extension built for another torch or another CPU is refused with a message that says
how to rebuild, before it is imported (no SIGILL, no undefined-symbol traceback)."""

from __future__ import annotations

import platform

import pytest

from dtl_kernels import _build_check as bc


def test_matching_build_loads():
    info = {"torch": "2.14.1+cu130", "native_isa": ["avx2", "fma"]}
    assert bc.mismatch(info, "2.14.1+cpu", {"avx2", "fma", "sse4_2"}) is None
    assert bc.mismatch(None, "2.14.1", set()) is None  # no record: the import decides


def test_other_torch_is_refused():
    msg = bc.mismatch({"torch": "2.14.1+cu130", "native_isa": []}, "2.11.0", set())
    assert "built against torch 2.14.1+cu130 but torch 2.11.0" in msg and "rebuild" in msg


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
def test_missing_instructions_are_refused_not_crashed():
    info = {"torch": "2.14.1", "native_isa": ["avx2", "avx512f", "avx512_bf16"]}
    msg = bc.mismatch(info, "2.14.1", {"avx2", "fma"})
    assert "avx512_bf16, avx512f" in msg and "DTL_KERNELS_NATIVE=0" in msg
    assert bc.mismatch(info, "2.14.1", None) is None  # flags unknown: cannot tell


def test_this_build_matches_this_machine():
    """The record setup.py wrote for this checkout fits this machine and this torch."""
    import torch

    info = bc.build_info()
    if info is None:
        pytest.skip("no _build_info.json (not built by setup.py here)")
    assert bc.mismatch(info, torch.__version__, bc.cpu_flags()) is None
    assert set(info["native_isa"]) <= set(bc.ISA_FLAGS)


VARIANT_CHECK = """
import torch
from dtl_kernels.ops import _ext, reference, side
torch.manual_seed(0)
for k, grid, prefix in ((0, None, 0), (3, (4, 4), 1)):
    # y non-contiguous (a transposed view), an odd token count
    y = torch.randn(2, 40, 17, dtype=torch.float64).transpose(1, 2).requires_grad_()
    t = torch.randn(2, 17, 6, dtype=torch.float64, requires_grad=True)
    u = (torch.randn(40, 6, dtype=torch.float64) * 0.3).requires_grad_()
    w = (torch.randn(40, 1, k, k, dtype=torch.float64) / k).requires_grad_() if k else None
    leaves = [x for x in (y, t, u, w) if x is not None]
    g = torch.randn(2, 17, 40, dtype=torch.float64)
    ours = side.side_add(y, t, u, 100.0, w, grid, prefix, backend="cpu")
    ref = reference.side_add(y, t, u, 100.0, w, grid, prefix)
    for a, b in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
# 16-bit y read and written in place (d = 64: whole chunks in every variant), and autocast's
# mix (float32 y, bf16 taps), against float64 on the same values; K = 7 (odd)
for y_dt, s_dt in ((torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float32, torch.bfloat16)):
    y = torch.randn(2, 9, 64).to(y_dt).requires_grad_()
    t = torch.randn(2, 9, 7).to(s_dt).requires_grad_()
    u = (torch.randn(64, 7) * 0.3).to(s_dt).requires_grad_()
    g = torch.randn(2, 9, 64).to(y_dt)
    out = side.side_add(y, t, u, 100.0, None, None, 0, backend="cpu")
    got = [out, *torch.autograd.grad(out, (t, u), g)]
    leaves = [x.detach().double().requires_grad_() for x in (t, u)]
    ref = reference.side_add(y.detach().double(), *leaves, 100.0, None, None, 0)
    want = [ref, *torch.autograd.grad(ref, leaves, g.double())]
    for a, b, dt in zip(got, want, (y_dt, s_dt, s_dt)):
        assert a.dtype == dt, (a.dtype, dt)
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
print(_ext.CPU_VARIANT)
"""


@pytest.mark.parametrize("variant, module", [("avx2", "_C_cpu_avx2"), ("default", "_C_cpu")])
def test_every_cpu_kernel_variant_matches_the_reference(variant, module):
    """The portable build carries the CPU kernels per instruction set (setup.py); capped by
    DTL_KERNELS_CPU_VARIANT, a narrower one is loaded and must compute the same (the
    widest this CPU runs is what the rest of the suite tests)."""
    import os
    import subprocess
    import sys

    from dtl_kernels.ops import _ext

    if _ext.CPU_VARIANT is None or bc.build_info().get("native_isa"):
        pytest.skip("a -march=native build has one variant")
    if module not in _ext.cpu_variant_order() and variant != "default":
        pytest.skip(f"this CPU cannot run {module}")
    env = dict(os.environ, DTL_KERNELS_CPU_VARIANT=variant)
    out = subprocess.run(
        [sys.executable, "-c", VARIANT_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == module


def test_variant_order_follows_the_cpu_and_the_caps(monkeypatch):
    import torch

    from dtl_kernels.ops import _ext

    avx2 = {"avx2", "fma", "f16c", "bmi2", "sse4_2"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
    monkeypatch.delenv("DTL_KERNELS_CPU_VARIANT", raising=False)
    monkeypatch.setattr(_ext._build_check, "build_info", lambda: {"native_isa": []})  # portable
    for flags, capability, env, want in [
        (avx512, "AVX512", None, ["_C_cpu_avx512", "_C_cpu_avx2", "_C_cpu"]),
        (avx2, "AVX2", None, ["_C_cpu_avx2", "_C_cpu"]),
        (avx512, "AVX2", None, ["_C_cpu_avx2", "_C_cpu"]),  # torch capped (ATEN_CPU_CAPABILITY)
        (avx512, "AVX512", "avx2", ["_C_cpu_avx2", "_C_cpu"]),
        (avx512, "AVX512", "default", ["_C_cpu"]),
        (None, "AVX512", None, ["_C_cpu"]),  # flags unknown: only the baseline is safe
    ]:
        monkeypatch.setattr(_ext._build_check, "cpu_flags", lambda f=flags: f)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        if env:
            monkeypatch.setenv("DTL_KERNELS_CPU_VARIANT", env)
        else:
            monkeypatch.delenv("DTL_KERNELS_CPU_VARIANT", raising=False)
        assert _ext.cpu_variant_order() == want, (flags, capability, env)


def test_a_native_build_imports_its_one_variant_only(monkeypatch):
    """After a portable build, `DTL_KERNELS_NATIVE=1` builds `_C` and `_C_cpu` anew but
    leaves the portable `_C_cpu_avx2` / `_C_cpu_avx512` in the folder: built beside another
    `_C`, they must not be preferred to the native `_C_cpu`."""
    import torch

    from dtl_kernels.ops import _ext

    avx512 = {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl",
              "avx512cd"}  # fmt: skip
    monkeypatch.delenv("DTL_KERNELS_CPU_VARIANT", raising=False)
    monkeypatch.setattr(_ext._build_check, "cpu_flags", lambda: avx512)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(_ext._build_check, "build_info", lambda: {"native_isa": ["avx2"]})
    assert _ext.cpu_variant_order() == ["_C_cpu"]
    monkeypatch.setattr(_ext._build_check, "build_info", lambda: None)  # no record: portable
    assert _ext.cpu_variant_order()[0] == "_C_cpu_avx512"
