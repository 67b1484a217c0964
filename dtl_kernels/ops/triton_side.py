"""Fused side op in Triton. Placeholder until the Triton kernels land: ``available`` is False."""

from __future__ import annotations


def available() -> bool:
    return False


def side_add(y, taps, ups, beta, conv_weight, grid, num_prefix):
    raise NotImplementedError
