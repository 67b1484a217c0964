"""dtl-train end to end on a tiny image folder: outputs, resume, eval-only, checkpoints, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_images import make_toy_folder
from train_cli import train_cli

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run
from dtl_kernels.train.cli import main

MODEL = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """3 classes of 32×32 images (16 train / 8 test), told apart by colour and texture."""
    return make_toy_folder(tmp_path_factory.mktemp("toy"), 16, 8)


def options(toy: Path, out: Path, **kw) -> dict:
    base = dict(
        model=MODEL, pretrained="none", method="dtl+", dataset="folder", data_root=str(toy),
        img_size=64, epochs=2, batch_size=8, lr=1e-2, warmup_epochs=1, output=str(out),
        progress=False,
    )  # fmt: skip
    base.update(kw)
    return base


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter.safetensors"))


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in rows]


def test_run_writes_everything(toy, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run(make_config(options(toy, out)))
    for name in (
        "summary.json",
        "metrics.jsonl",
        "metrics.csv",
        "curves.png",
        "adapter.safetensors",
        "config.json",
    ):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    for key in ("test_acc", "method", "model", "trainable_params", "total_params",
                "peak_memory_bytes", "images_per_s", "epochs", "seed", "wall_time_s"):  # fmt: skip
        assert s[key] is not None, key
    assert s["method"] == "dtl+" and s["model"] == MODEL and s["seed"] == 42 and s["epochs"] == 2
    assert 0 <= s["test_acc"] <= 1 and s["peak_memory_bytes"] >= 0
    assert 0 < s["trainable_params"] < s["total_params"] / 50
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["test_acc"] == s["test_acc"]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0001.pt", "epoch_0002.pt"]
    # a checkpoint holds only trained tensors (CSN + head), not the frozen backbone
    payload = torch.load(ckpt.list_checkpoints(out)[-1], weights_only=True)
    assert all(k.startswith(("csn.", "head.")) for k in payload["trained"])
    assert "random backbone" in capsys.readouterr().err.lower()

    # eval-only: the adapter alone reproduces the test accuracy
    ev = tmp_path / "eval"
    s2 = run(
        make_config(options(toy, ev, eval_only=True, adapter=str(out / "adapter.safetensors")))
    )
    assert s2["eval_only"] and s2["test_acc"] == pytest.approx(s["test_acc"])
    assert json.loads((ev / "summary.json").read_text())["test_acc"] == pytest.approx(s["test_acc"])


@pytest.mark.parametrize("cache", ["on", "off", "off, flips in a worker"])
def test_resume_is_bit_identical(toy, tmp_path, cache):
    """Also with random augmentations drawn in a loader worker, whose seed comes from the
    loader's generator each epoch (it was seeded once per process: a resumed epoch 2 drew
    epoch 1's flips)."""
    extra = dict(hflip=0.5, workers=1) if "worker" in cache else {}
    cache = cache.split(",")[0]
    full, part = tmp_path / "full", tmp_path / "part"
    run(make_config(options(toy, full, cache_trunk=cache, drop_path=0.0, **extra)))
    stopped = run(make_config(options(toy, part, cache_trunk=cache, stop_after=1, **extra)))
    assert stopped == {"stopped_after_epoch": 1}
    assert not (part / "adapter.safetensors").exists()
    run(make_config(options(toy, part, cache_trunk=cache, resume=True, **extra)))
    a, b = adapter(full), adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip_timing(rows(full)) == strip_timing(rows(part))


def test_cached_trunk_matches_uncached(toy, tmp_path):
    run(make_config(options(toy, tmp_path / "on", cache_trunk="on", epochs=1)))
    run(make_config(options(toy, tmp_path / "off", cache_trunk="off", epochs=1)))
    a, b = adapter(tmp_path / "on"), adapter(tmp_path / "off")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_corrupt_checkpoint(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(make_config(options(toy, out, stop_after=1)))
    good = ckpt.list_checkpoints(out)[-1]
    good_bytes = good.read_bytes()

    # a failing write never replaces the last good checkpoint
    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(out, 1, model, opt, sched, [], {})
    monkeypatch.undo()
    assert good.read_bytes() == good_bytes
    assert [p.name for p in good.parent.iterdir()] == [good.name]  # no temp file left

    # a corrupt latest checkpoint is a clear error naming the file
    good.write_bytes(good_bytes[: len(good_bytes) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"epoch_0001\.pt is corrupt"):
        run(make_config(options(toy, out, resume=True)))
    assert main([f"--{k.replace('_', '-')}={v}" for k, v in options(toy, out).items()
                 if k != "progress"] + ["--resume", "--no-progress"]) == 1  # fmt: skip


def test_cli_flags_and_yaml(toy, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {MODEL}\nepochs: 5\ndataset: folder\ndata-root: {toy}\nimg_size: 64\n")
    out = tmp_path / "cli"
    code = main(["--config", str(cfg), "--epochs", "1", "--pretrained", "none", "--batch-size", "8",
                 "--output", str(out), "--no-progress", "--method", "linear"])  # fmt: skip
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs"] == 1 and s["method"] == "linear"
    assert "test accuracy" in capsys.readouterr().out
    assert main(["--method", "prompt-tuning"]) == 2
    fp16_on_cpu = ["--precision", "fp16", "--dataset", "folder", "--data-root", str(toy),
                   "--pretrained", "none", "--output", str(tmp_path / "x")]  # fmt: skip
    assert main(fp16_on_cpu) != 0


def test_ddp_two_processes_match_one(toy, tmp_path, one_thread):
    """torchrun with 2 CPU processes (gloo) ≈ 1 process (here, one thread as the ranks run)
    with the same global batch."""
    common = [
        "--model", MODEL, "--pretrained", "none", "--method", "dtl+",
        "--dataset", "folder", "--data-root", str(toy), "--img-size", "64", "--epochs", "2",
        "--batch-size", "8", "--lr", "1e-2", "--no-progress",
    ]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "one")]) == 0  # one process, here
    train_cli([*common, "--output", str(tmp_path / "two")], nproc=2)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_vit_with_bf16_autocast(toy, tmp_path):
    """A ViT through the same loop (img_size goes to timm, mean/std 0.5), bf16 on CPU."""
    out = tmp_path / "vit"
    s = run(
        make_config(
            options(toy, out, model="vit_tiny_patch16_224", img_size=32, epochs=1, precision="bf16")
        )
    )
    assert s["method"] == "dtl+" and s["img_size"] == 32 and 0 <= s["test_acc"] <= 1
    assert s["cached_trunk_blocks"] == 7  # taps before M = 7 and block 7's output are cached
