"""--resume compares the checkpoint's options with the current ones: a changed --lr /
--epochs recomputes the schedule (said in one line); any other option that defines the
run is refused, naming it, unless --force-resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from toy_images import make_toy_folder

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run
from dtl_kernels.train.loop import WarmupCosine

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
STEPS = 3  # 12 images, batch 4


pytestmark = pytest.mark.usefixtures("one_thread")


def options(toy: Path, out: Path, **kw) -> dict:
    base = dict(
        model="vit_tiny_patch16_224", pretrained="none", method="dtl+", dataset="folder",
        data_root=str(toy), img_size=32, epochs=2, batch_size=4, lr=1e-2, warmup_epochs=1,
        output=str(out), progress=False, cache_trunk="ram",
    )  # fmt: skip
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def one_epoch(toy, tmp_path_factory) -> Path:
    """A run stopped after epoch 1 of 2 (copy it before resuming)."""
    out = tmp_path_factory.mktemp("one-epoch") / "run"
    run(make_config(options(toy, out, stop_after=1)))
    return out


def lrs(out: Path) -> list[float]:
    return [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_more_epochs_and_a_new_lr_extend_the_schedule(toy, tmp_path, capsys):
    out = tmp_path / "run"
    run(make_config(options(toy, out)))  # 2 epochs, finished: lr is at its floor
    capsys.readouterr()
    run(make_config(options(toy, out, resume=True, epochs=4, lr=3e-2)))
    said = capsys.readouterr().out
    assert "--lr 0.01 → 0.03, --epochs 2 → 4: the warm-up/cosine schedule is recomputed" in said
    new = WarmupCosine(3e-2, 1e-7, 1e-8, STEPS, 4 * STEPS)
    got = lrs(out)
    assert got[2:] == pytest.approx([3e-2 * new(3 * STEPS), 3e-2 * new(4 * STEPS)], rel=1e-12)
    assert got[2] > 1e-3  # not the old schedule's floor (1e-8)


def test_other_backbone_weights_under_the_same_path_are_refused(toy, tmp_path, capsys):
    """``--pretrained PATH`` whose file was replaced by other weights: the checkpoint
    keeps the frozen backbone's fingerprint, and ``--resume`` refuses (it continued on
    the new weights without a word); ``--force-resume`` continues, saying so."""
    import torch

    from dtl_kernels import create_model

    weights = tmp_path / "backbone.pth"

    def write_weights(seed: int) -> None:
        torch.manual_seed(seed)
        backbone = create_model("vit_tiny_patch16_224", "linear", num_classes=3,
                                img_size=32).backbone  # fmt: skip
        torch.save({"state_dict": backbone.state_dict()}, weights)

    write_weights(0)
    out = tmp_path / "run"
    run(make_config(options(toy, out, pretrained=str(weights), stop_after=1)))
    assert len(torch.load(ckpt.list_checkpoints(out)[-1])["backbone_sha256"]) == 64
    write_weights(1)
    with pytest.raises(ckpt.CheckpointError, match="frozen backbone weights differ"):
        run(make_config(options(toy, out, pretrained=str(weights), resume=True)))
    capsys.readouterr()
    run(make_config(options(toy, out, pretrained=str(weights), resume=True, force_resume=True)))
    assert "--force-resume: continuing on other backbone weights" in capsys.readouterr().out


def test_a_new_lr_step_is_said(toy, tmp_path, one_epoch, capsys):
    """``--lr-step`` changed on ``--resume``: the schedule is recomputed (as it was), and
    now said so like a new ``--lr`` or ``--epochs`` (it was taken without a word)."""
    out = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    capsys.readouterr()
    run(make_config(options(toy, out, resume=True, lr_step="epoch")))
    assert "--lr-step step → epoch: the warm-up/cosine schedule is recomputed" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "change,flag",
    [(dict(batch_size=6), "--batch-size"), (dict(max_train=9), "--max-train"),
     (dict(method="dtl"), "--method"), (dict(seed=1), "--seed"),
     (dict(grad_accum=2), "--grad-accum"), (dict(hflip=0.5), "--hflip")],
)  # fmt: skip
def test_changed_run_options_are_refused(toy, tmp_path, one_epoch, change, flag):
    out = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    before = ckpt.list_checkpoints(out)[-1].read_bytes()
    with pytest.raises(ckpt.CheckpointError, match=f"{flag} was .*--force-resume"):
        run(make_config(options(toy, out, resume=True, **change)))
    assert ckpt.list_checkpoints(out)[-1].read_bytes() == before


def test_changed_dataset_is_refused_and_force_resume_overrides(toy, tmp_path, one_epoch, capsys):
    out = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    other = make_toy_folder(tmp_path / "other", 12, 6)
    with pytest.raises(ckpt.CheckpointError, match="--data-root was"):
        run(make_config(options(toy, out, resume=True, data_root=str(other))))
    s = run(make_config(options(toy, out, resume=True, data_root=str(other), force_resume=True)))
    assert "--force-resume: continuing with --data-root was" in capsys.readouterr().out
    assert s["epochs_run_here"] == 1


def test_fewer_epochs_than_done_is_refused(toy, tmp_path):
    out = tmp_path / "run"
    run(make_config(options(toy, out, epochs=3, stop_after=2)))
    with pytest.raises(ckpt.CheckpointError, match="--epochs 1 is below the 2 epochs"):
        run(make_config(options(toy, out, resume=True, epochs=1)))


def test_resume_plan_ignores_free_options():
    saved = dict(options(Path("/d"), Path("/o")), workers=0, keep_checkpoints=2)
    current = dict(saved, workers=4, output="/elsewhere", cache_trunk="disk", eval_every=2)
    assert ckpt.resume_plan(saved, current, 1, force=False) == []
