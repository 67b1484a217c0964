"""A checkpoint's trained tensors and optimizer state are untrusted on ``--resume``
(``checkpoint.restore``): what does not fit the model and its optimizer is refused by name,
and the optimizer's settings are the current configuration's, never the file's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dtl_kernels.optim import adamw
from dtl_kernels.train import checkpoint as ckpt


def _trained(tmp_path):
    """A tiny model (one frozen, two trained parameters) after one AdamW step, saved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, [dict(loss=1.0)], dict(lr=1e-2))
    return model, opt, sched, path, ckpt.load_latest(tmp_path)[1]


def _fresh(model):
    """The model, optimizer and schedule a resuming run builds from its configuration."""
    model = copy.deepcopy(model)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _states(payload):
    return payload["optimizer"]["state"].values()


def _set_all(key, value):
    def change(payload):
        for s in _states(payload):
            s[key] = value(s[key]) if callable(value) else value

    return change


BAD = {
    "moment-0-dim": (_set_all("exp_avg", torch.tensor(1.0)), "'exp_avg' of shape \\(\\)"),
    "moment-int": (_set_all("exp_avg", lambda t: t.long()), "'exp_avg' .* torch.int64"),
    "moment-nan": (_set_all("exp_avg", lambda t: t * float("nan")), "non-finite"),
    "square-negative": (_set_all("exp_avg_sq", lambda t: -t - 1), "< 0"),
    "moment-missing": (lambda p: [s.pop("exp_avg_sq") for s in _states(p)], "no 'exp_avg_sq'"),
    "step-negative": (_set_all("step", torch.tensor(-1.0)), "whole number of steps >= 0"),
    "step-fraction": (_set_all("step", torch.tensor(1.5)), "whole number of steps"),
    "step-str": (_set_all("step", "x"), "'step' of parameter 0 is str"),
    "trained-int": (
        lambda p: p["trained"].update({k: v.long() for k, v in p["trained"].items()}),
        "of another dtype",
    ),
    "frozen-param": (lambda p: p["trained"].update({"0.weight": torch.zeros(3, 4)}), "frozen"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_state_that_does_not_fit_is_refused_by_name(tmp_path, case):
    model, _, _, path, payload = _trained(tmp_path)
    change, match = BAD[case]
    change(payload)
    fresh, opt, sched = _fresh(model)
    frozen_before = fresh[0].weight.clone()
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.restore(payload, path, fresh, opt, sched)
    assert torch.equal(fresh[0].weight, frozen_before)  # the backbone is never written


def test_the_optimizer_settings_are_the_configurations(tmp_path):
    """A file's settings (maximize, betas, weight decay, amsgrad ...) are not taken: the
    restored optimizer steps exactly as one restored from the untouched file."""
    model, _, _, path, payload = _trained(tmp_path)
    bad = copy.deepcopy(payload)
    for g in bad["optimizer"]["param_groups"]:
        g.update(maximize=True, betas=(5.0, 0.999), weight_decay=0.5, amsgrad=True, eps=-1.0)
    results = []
    for p in (payload, bad):
        fresh, opt, sched = _fresh(model)
        ckpt.restore(p, path, fresh, opt, sched)
        assert opt.param_groups[0]["weight_decay"] == 0.05 and not opt.param_groups[0]["maximize"]
        fresh(torch.ones(2, 4)).sum().backward()
        opt.step()
        results.append([t.detach().clone() for t in fresh.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_fifo_named_like_the_newest_checkpoint_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO blocks until something writes to it: ``--resume`` hung."""
    import os
    import signal

    _trained(tmp_path)
    os.mkfifo(ckpt.checkpoint_path(tmp_path, 2))
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on the FIFO"))
    signal.alarm(30)
    try:
        with pytest.raises(ckpt.CheckpointError, match="epoch_0002.pt is not a regular file"):
            ckpt.load_latest(tmp_path)
    finally:
        signal.alarm(0)


def test_a_step_count_of_zero_resumes(tmp_path):
    """fp16's GradScaler skips a step whose gradients overflowed after the fused kernel
    made the state: every step skipped so far leaves step 0, a checkpoint that resumes."""
    model, _, _, path, payload = _trained(tmp_path)
    for s in _states(payload):
        s["step"] = torch.tensor(0.0)
        s["exp_avg"].zero_()
        s["exp_avg_sq"].zero_()
    fresh, opt, sched = _fresh(model)
    ckpt.restore(payload, path, fresh, opt, sched)
    fresh(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert all(p.isfinite().all() for p in fresh.parameters())


def test_a_non_fused_optimizers_checkpoint_resumes_on_the_fused_one(tmp_path):
    """A file written by torch's non-fused AdamW (older versions, the fallback): its
    groups' flags are replaced by the current optimizer's before load_state_dict places
    the steps, so the fused kernel gets them where it needs them."""
    model, _, _, _, _ = _trained(tmp_path / "a")
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                              weight_decay=0.05, foreach=False)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1.0)
    model(torch.randn(5, 4)).sum().backward()
    plain.step()
    sched.step()
    path = ckpt.save_checkpoint(tmp_path / "b", 1, model, plain, sched, [dict(loss=1.0)],
                                dict(lr=1e-2))  # fmt: skip
    payload = ckpt.load_latest(tmp_path / "b")[1]
    assert not payload["optimizer"]["param_groups"][0].get("fused")
    fresh, opt, sched2 = _fresh(model)
    ckpt.restore(payload, path, fresh, opt, sched2)
    assert opt.param_groups[0]["fused"] and opt.param_groups[0]["weight_decay"] == 0.05
    for p in opt.param_groups[0]["params"]:
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device and float(step) == 1
    fresh(torch.ones(2, 4)).sum().backward()
    opt.step()
