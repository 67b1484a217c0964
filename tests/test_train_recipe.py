"""``dtl-train --recipe published``: the published protocol as a YAML file shipped in the
package (defaults ← recipe ← --config ← flags), and its per-epoch lr steps
(``--lr-step epoch``), which must be timm's CosineLRScheduler stepped once per epoch."""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import pytest
import torch

from dtl_kernels.train import config as C
from dtl_kernels.train.cli import main
from dtl_kernels.train.step import EpochWarmupCosine, WarmupCosine, lr_schedule

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = dict(
    epochs=100, warmup_epochs=10.0, warmup_lr=1e-7, min_lr=1e-8, lr=1e-3, lr_step="epoch",
    weight_decay=0.05, drop_path=0.1, normalize="half", batch_size=32, seed=42,
)  # fmt: skip


def test_the_recipe_loads_the_published_values():
    cfg = C.load_config(["--recipe", "published"])
    assert {k: getattr(cfg, k) for k in PUBLISHED} == PUBLISHED
    assert C.load_config([]).lr_step == "step"  # the defaults are unchanged without it


def test_flags_win_over_the_config_file_which_wins_over_the_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 30\ndrop_path: 0.2\n")
    cfg = C.load_config(["--recipe", "published", "--config", str(path), "--epochs", "5",
                         "--lr-step", "step"])  # fmt: skip
    assert (cfg.epochs, cfg.drop_path, cfg.lr_step) == (5, 0.2, "step")  # flag, file, flag
    assert (cfg.warmup_epochs, cfg.normalize) == (10.0, "half")  # the recipe's
    with pytest.raises(SystemExit):
        C.load_config(["--recipe", "unpublished"])


def test_help_says_how_the_recipe_differs_from_the_defaults():
    text = " ".join(C.build_parser().format_help().split())
    for part in ("--epochs 100 (default 10)", "--warmup-epochs 10 (default 1)",
                 "--lr-step epoch (default step)", "--drop-path 0.1 (default 0)",
                 "--normalize half (default auto)",
                 "--lr 0.001 (default: per method)"):  # fmt: skip
        assert part in text, part
    assert set(C.recipe_changes("published")) == {
        "epochs", "warmup_epochs", "lr_step", "drop_path", "normalize", "lr"
    }  # fmt: skip


def test_the_recipe_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["dtl_kernels"]
    for path in C.RECIPES.glob("*.yaml"):
        inside = path.relative_to(ROOT / "dtl_kernels").as_posix()
        assert any(fnmatch.fnmatch(inside, p) for p in patterns), inside


def timm_lrs(lr: float, epochs: int) -> list[float]:
    """The published loop: timm's scheduler, ``step(epoch)`` after each epoch; epoch ``t``
    (0-based) trains at the lr set after epoch ``t`` - 1 (at construction for t = 0)."""
    from timm.scheduler import CosineLRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=epochs, warmup_t=10, warmup_lr_init=1e-7,
                              lr_min=1e-8)  # fmt: skip
    out = []
    for t in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        sched.step(t + 1)
    return out


def by_hand(lr: float, t: int) -> float:
    if t < 10:
        return 1e-7 + t * (lr - 1e-7) / 10
    return 1e-8 + 0.5 * (lr - 1e-8) * (1 + math.cos(math.pi * t / 100))


def test_per_epoch_schedule_is_piecewise_constant_and_matches_timm():
    lr, steps = 1e-2, 3
    cfg = C.make_config({**PUBLISHED, "lr": lr})
    schedule = lr_schedule(cfg, steps)
    assert isinstance(schedule, EpochWarmupCosine)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    per_step = []
    for _ in range(100 * steps):  # as the Stepper: lr of this step, then scheduler.step()
        per_step.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    epochs = [per_step[t * steps : (t + 1) * steps] for t in range(100)]
    assert all(len(set(e)) == 1 for e in epochs)  # constant within an epoch
    per_epoch = [e[0] for e in epochs]
    assert per_epoch == pytest.approx([by_hand(lr, t) for t in range(100)], rel=1e-12)
    assert per_epoch == pytest.approx(timm_lrs(lr, 100), rel=1e-12)
    assert per_epoch[0] == pytest.approx(1e-7) and per_epoch[10] < lr  # timm: no shift
    assert isinstance(lr_schedule(C.make_config({}), steps), WarmupCosine)


def test_two_epoch_run_with_the_recipe(toy, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--recipe", "published", "--epochs", "2", "--model", "vit_tiny_patch16_224",
                 "--pretrained", "none", "--dataset", "folder", "--data-root", str(toy),
                 "--img-size", "32", "--batch-size", "4", "--output", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["epochs"], config["lr_step"], config["drop_path"]) == (2, "epoch", 0.1)
    assert config["warmup_epochs"] == 10 and config["normalize"] == "half"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the lr logged after epoch t is the one epoch t + 1 starts with: still warming up
    assert [r["lr"] for r in rows] == pytest.approx([by_hand(1e-3, 1), by_hand(1e-3, 2)])
    assert 0 <= json.loads((out / "summary.json").read_text())["test_acc"] <= 1
