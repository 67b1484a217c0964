"""The optimiser every training path uses (``dtl-train``, the memory estimator, the
benchmarks): AdamW, fused where PyTorch has the fused kernel for the parameters.

Fused AdamW updates all parameters in one kernel per dtype and device instead of a Python
loop over them (PyTorch's CPU default) or a handful of multi-tensor ops (its CUDA default):
the same algorithm, with far less host time per step — which is the step time of a DTL
model at the batch sizes where the host is the bottleneck (``benchmarks/bench_host.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or param groups), fused when every
    parameter is a floating tensor on a device with the fused kernel."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in tensors
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
