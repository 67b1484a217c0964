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
    """AdamW over ``params`` (tensors or param groups): :class:`LeanFusedAdamW` when every
    parameter is a floating tensor on a device with the fused kernel, else
    ``torch.optim.AdamW``."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in tensors
    )
    if fused:
        return LeanFusedAdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


class LeanFusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` whose ``step`` calls the fused kernel straight from
    per-group lists: the same kernel, arguments and state (``state_dict`` is AdamW's), without
    the per-parameter Python of ``torch.optim``'s step (≈ 5 µs per parameter on the host; a
    DTL side network has two per tapped block).

    Anything the short path does not cover (the first step, which creates the state; a
    closure; amsgrad, maximize, capturable, differentiable; a tensor ``lr``; AMP's
    ``GradScaler``; sparse or complex gradients; a group mixing devices or dtypes) runs
    ``torch.optim.AdamW.step`` itself.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            work = self._fused_work()
            if work is not None:
                for params, grads, avgs, sqs, steps, group in work:
                    torch._foreach_add_(steps, 1)
                    torch._fused_adamw_(
                        params, grads, avgs, sqs, [], steps, amsgrad=False, lr=group["lr"],
                        beta1=group["betas"][0], beta2=group["betas"][1],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                        grad_scale=None, found_inf=None,
                    )  # fmt: skip
                return None
        return super().step(closure)

    def _fused_work(self) -> list | None:
        """Per group, the lists the fused kernel takes; ``None`` when the short path does
        not apply (see the class docstring)."""
        # GradScaler hands these over as tensors: test for presence, never their truth
        # value (a device sync on CUDA)
        if any(getattr(self, name, None) is not None for name in ("grad_scale", "found_inf")):
            return None
        work = []
        for group in self.param_groups:
            if (group["amsgrad"] or group["maximize"] or group.get("capturable")
                    or group.get("differentiable") or not group.get("fused")
                    or isinstance(group["lr"], torch.Tensor)):  # fmt: skip
                return None
            params, grads, avgs, sqs, steps = [], [], [], [], []
            kind = None
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state.get(p)
                if not state or g.is_sparse or p.is_complex():
                    return None
                if kind is None:
                    kind = (p.device, p.dtype)
                elif (p.device, p.dtype) != kind:
                    return None
                params.append(p)
                grads.append(g)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                work.append((params, grads, avgs, sqs, steps, group))
        return work
