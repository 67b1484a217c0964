"""dtl_kernels.optim: the lean fused AdamW step equals torch's fused AdamW exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from dtl_kernels.optim import LeanFusedAdamW, adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 7), (7, 2), (5, 1, 3, 3), (3,), (4, 5)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _groups(params, lr):
    return [
        {"params": params[:3], "weight_decay": 0.05},
        {"params": params[3:], "weight_decay": 0.0, "lr": lr * 3},
    ]


def _run(opt_cls, steps: int = 6, **kwargs):
    params = _params(0)
    opt = opt_cls(_groups(params, 1e-2), lr=1e-2, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for j, p in enumerate(params):
            # a parameter without a gradient at some steps (it must keep its state untouched)
            p.grad = None if (step + j) % 4 == 3 else torch.randn(p.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] *= 0.9  # a schedule changes lr between steps
        opt.step()
    return params, opt


def test_adamw_builds_the_lean_optimizer_for_cpu_parameters():
    assert isinstance(adamw(_params(0), lr=1e-3), LeanFusedAdamW)


def test_torch_adamw_step_runs_only_to_create_state(monkeypatch):
    """The short path is the one taken once the state exists (else the equality below would
    only compare torch with itself)."""
    calls = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, c=None: calls.append(1) or real(self, c)
    )
    _run(LeanFusedAdamW, steps=5)
    # steps 0 and 1 each meet a parameter with a gradient but no state yet (_run leaves
    # parameter 3 without one at step 0); steps 2-4 take the short path
    assert len(calls) == 2


@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True}, {"maximize": True}])
def test_lean_step_equals_torch_fused_adamw(kwargs):
    ours, opt_a = _run(LeanFusedAdamW, **kwargs)
    ref, opt_b = _run(torch.optim.AdamW, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sb["state"]:
        for name, value in sb["state"][k].items():
            torch.testing.assert_close(sa["state"][k][name], value, rtol=0, atol=0)


def test_state_dict_moves_between_lean_and_torch_adamw():
    """A checkpoint of either loads into the other and the runs continue identically."""
    params, opt = _run(LeanFusedAdamW, steps=3)
    state = opt.state_dict()
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(2)]
    opts = []
    for cls, ps in zip((LeanFusedAdamW, torch.optim.AdamW), copies, strict=True):
        o = cls(_groups(ps, 1e-2), lr=1e-2, fused=True)
        o.load_state_dict(copy.deepcopy(state))  # load_state_dict may keep state's tensors
        opts.append(o)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for ps, o in zip(copies, opts, strict=True):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            o.step()
    for a, b in zip(*copies, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_closure_runs_through_torch_adamw():
    params = _params(2)
    opt = LeanFusedAdamW(params, lr=1e-2, fused=True)
    calls = []

    def closure():
        calls.append(1)
        for p in params:
            p.grad = torch.ones_like(p)
        return torch.tensor(0.0)

    before = [p.detach().clone() for p in params]
    assert opt.step(closure) is not None and calls
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_amp_grad_scaler_tensors_send_the_step_to_torch(monkeypatch):
    """GradScaler hands the fused optimizer ``grad_scale`` / ``found_inf`` tensors: the short
    path (which takes neither) must leave such a step to torch, whatever their values."""
    params, opt = _run(LeanFusedAdamW, steps=3)  # the state exists: the short path applies
    calls = []
    real = torch.optim.AdamW.step
    counted = lambda self, closure=None: calls.append(1) or real(self, closure)  # noqa: E731
    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.zeros(())  # found_inf reads False
    opt.step()
    assert calls == [1]
