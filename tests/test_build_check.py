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
