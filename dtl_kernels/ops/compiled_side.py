"""Fused side op on the compiled C++ (CPU) and CUDA C++ kernels: autograd + fake kernels.

Placeholder until the compiled kernels land: ``available`` is False.
"""

from __future__ import annotations


def available(device_type: str) -> bool:
    return False


def side_add(y, taps, ups, beta, conv_weight, grid, num_prefix):
    raise NotImplementedError
