"""A run that diverges slowly ends: an epoch without a finite step, weights that exploded
(``--lr 1e30``) or non-finite evaluation outputs stop it with exit status 3, keeping the
last good checkpoint (and any earlier adapter), writing no adapter or summary, and never
reporting an accuracy computed from non-finite outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fault_kit import flags, metric_rows, options

from dtl_kernels import DTLViT
from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import step as train_step
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
STEPS_PER_EPOCH = 3  # 12 training images, batch 4


def diverged(argv: list[str], capsys) -> str:
    """Run the CLI: exit status 3, one error line, no accuracy printed; the error line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("dtl-train: error:")]
    assert code == 3 and len(lines) == 1, captured.err[-3000:]
    assert "accuracy" not in captured.out and "Traceback" not in captured.err
    return lines[0]


def assert_last_good_checkpoint_kept(out, epochs: list[int]) -> None:
    files = ckpt.list_checkpoints(out)
    assert [int(p.stem.split("_")[1]) for p in files] == epochs
    for p in files:
        trained = torch.load(p, weights_only=True)["trained"]
        assert all(t.isfinite().all() and t.abs().max() < 1e8 for t in trained.values())
    assert not (out / "adapter.safetensors").exists() and not (out / "summary.json").exists()


def test_exploded_weights_after_a_huge_lr_stop_the_run(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(flags(options(toy, out, stop_after=1))) == 0  # one good epoch
    capsys.readouterr()
    line = diverged(flags(options(toy, out, resume=True, lr=1e30)), capsys)
    assert "the trained weights exploded" in line and "epoch_0001.pt" in line
    assert_last_good_checkpoint_kept(out, [1])
    assert [r["epoch"] for r in metric_rows(out)] == [1]


class NaNInEpoch:
    """``torch.nn.functional`` whose training loss is NaN in every step of one epoch."""

    def __init__(self, epoch: int):
        self.bad = range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1)
        self.step = 0

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, logits, target, **kw):
        loss = F.cross_entropy(logits, target, **kw)
        if kw.get("reduction") == "sum":
            return loss
        self.step += 1
        return loss * float("nan") if self.step in self.bad else loss


def test_an_epoch_without_a_finite_step_stops_the_run(toy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(train_step, "F", NaNInEpoch(2))
    line = diverged(flags(options(toy, out, max_nonfinite_steps=100)), capsys)
    assert "no step of epoch 2 had a finite loss" in line and "epoch_0001.pt" in line
    assert_last_good_checkpoint_kept(out, [1])


class NaNInSteps(NaNInEpoch):
    """``torch.nn.functional`` whose training loss is NaN in the given steps (1-based)."""

    def __init__(self, steps):
        self.bad, self.step = set(steps), 0


def test_a_checkpoint_of_an_epoch_that_skipped_steps_never_rotates_the_last_clean_one_out(
    toy, tmp_path, monkeypatch, capsys
):
    """Epoch 2 skips one step (its weights stay finite: it is checkpointed), epoch 3 none
    finite. With ``--keep-checkpoints 1`` epoch 2's checkpoint had deleted epoch 1's, the
    only one to resume from when epoch 2's weights diverge on every batch."""
    out = tmp_path / "run"
    epoch = STEPS_PER_EPOCH
    monkeypatch.setattr(
        train_step, "F", NaNInSteps([epoch + 1, *range(2 * epoch + 1, 3 * epoch + 1)])
    )
    line = diverged(flags(options(toy, out, max_nonfinite_steps=100, keep_checkpoints=1)), capsys)
    assert "no step of epoch 3 had a finite loss" in line
    assert "newest checkpoint" in line and "epoch_0002.pt" in line and "skipped steps" in line
    assert "delete the checkpoints after" in line and "epoch_0001.pt" in line
    assert_last_good_checkpoint_kept(out, [1, 2])
    # the next clean epoch lets the older one go as --keep-checkpoints says
    monkeypatch.setattr(train_step, "F", F)
    (out / "checkpoints" / "epoch_0002.pt").unlink()
    assert main(flags(options(toy, out, resume=True, keep_checkpoints=1))) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0003.pt"]


@pytest.fixture
def nan_outputs_in_eval(monkeypatch):
    """The model's outputs are NaN in evaluation (eval mode) only."""
    head = DTLViT.forward_head

    def forward_head(self, x):
        logits = head(self, x)
        return logits if self.training else logits * float("nan")

    monkeypatch.setattr(DTLViT, "forward_head", forward_head)


def test_non_finite_evaluation_outputs_are_never_an_accuracy(
    toy, tmp_path, reference, nan_outputs_in_eval, capsys
):
    out = tmp_path / "run"
    line = diverged(flags(options(toy, out)), capsys)
    assert "6 of 6 evaluation images got non-finite outputs" in line
    assert_last_good_checkpoint_kept(out, [])

    adapter = reference / "adapter.safetensors"
    ev = tmp_path / "eval"
    line = diverged(flags(options(toy, ev, eval_only=True, adapter=str(adapter))), capsys)
    assert f"--eval-only {adapter}" in line and "non-finite outputs" in line
    assert not (ev / "summary.json").exists()


def test_an_lr_beyond_float32_arithmetic_is_an_option_error(toy, tmp_path, capsys):
    assert main(flags(options(toy, tmp_path / "run", lr=1e300))) == 2
    assert "--lr must be ≤ 1e+30, got 1e+300" in capsys.readouterr().err
