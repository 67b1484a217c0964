"""NaN injected into the training loss at a chosen step: one bad step is skipped (no
update) and training goes on; a run of them stops with a clear error and exit status 3,
keeping the last finite checkpoint and writing no adapter. Every JSON file stays strict
JSON (no bare NaN / Infinity)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fault_kit import flags, metric_rows, options, strict_json

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import loop, make_config, run
from dtl_kernels.train import step as train_step
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
STEPS_PER_EPOCH = 3  # 12 training images, batch 4


class PoisonedLoss:
    """``torch.nn.functional`` whose training loss (the mean cross-entropy) is NaN at the
    given 1-based steps; the evaluation loss (``reduction="sum"``) is ``eval_value``."""

    def __init__(self, bad_steps, eval_value=None):
        self.bad_steps, self.eval_value, self.step = set(bad_steps), eval_value, 0

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, logits, target, **kw):
        loss = F.cross_entropy(logits, target, **kw)
        if kw.get("reduction") == "sum":
            return loss if self.eval_value is None else loss * 0 + self.eval_value
        self.step += 1
        return loss * float("nan") if self.step in self.bad_steps else loss


def test_one_nan_step_is_skipped(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(train_step, "F", PoisonedLoss({5}, eval_value=float("inf")))
    summary = run(make_config(options(toy, out)))
    rows = metric_rows(out)  # strict JSON: the infinite test loss is null
    assert [r["skipped_steps"] for r in rows] == [0, 1, 0]
    assert all(r["test_loss"] is None for r in rows)
    assert strict_json((out / "summary.json").read_text())["skipped_steps"] == 1
    assert summary["skipped_steps"] == 1
    from safetensors.torch import load_file

    for name, t in load_file(str(out / "adapter.safetensors")).items():
        assert torch.isfinite(t).all(), name


def test_persistent_nan_stops_with_the_last_finite_checkpoint(toy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(train_step, "F", PoisonedLoss(range(STEPS_PER_EPOCH + 1, 100)))
    code = main(flags(options(toy, out, max_nonfinite_steps=2, keep_checkpoints=1)))
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    assert "training diverged: 3 consecutive steps" in err and "epoch_0001.pt" in err
    assert "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0001.pt"]
    payload = torch.load(ckpt.list_checkpoints(out)[0], weights_only=True)
    assert all(torch.isfinite(t).all() for t in payload["trained"].values())
    assert not (out / "adapter.safetensors").exists() and not (out / "summary.json").exists()
    assert [r["epoch"] for r in metric_rows(out)] == [1]


def test_zero_tolerance_stops_at_the_first_nan(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(train_step, "F", PoisonedLoss({2}))
    with pytest.raises(loop.DivergenceError, match="no checkpoint was written"):
        run(make_config(options(toy, tmp_path / "run", max_nonfinite_steps=0)))
