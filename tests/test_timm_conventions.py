"""Where a timm user looks (issue 20, items 4 and 5): ``pretrained_cfg`` for
``resolve_model_data_config``, ``get_classifier`` / ``reset_classifier``, timm's
transforms (the default pipeline unchanged, timm's crop on request, augmentation by
timm's names that the trunk cache refuses), timm's checkpoint formats, and the hub
refused at once when it cannot be reached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from dtl_kernels import create_model
from dtl_kernels.train import make_config
from dtl_kernels.train.cli import main
from dtl_kernels.train.data import build_datasets
from dtl_kernels.train.transforms import HALF, Augmentation, Preprocessing

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
VIT = "vit_tiny_patch16_224"


def test_wrappers_carry_pretrained_cfg_and_classifier_api():
    m = create_model(VIT, "dtl", 3, img_size=32, adapt_from=11)
    cfg = resolve_model_data_config(m)  # timm's generic defaults would say 224 px, ImageNet
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5)
    assert m.get_classifier() is m.head and m.default_cfg is m.pretrained_cfg
    m.class_names = ["a", "b", "c"]
    m.reset_classifier(5)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5) and m.num_classes == 5
    assert m.class_names is None and all(p.requires_grad for p in m.head.parameters())
    own = create_model(VIT, "linear", 3, img_size=32, head="backbone")
    assert own.get_classifier() is own.backbone.head
    own.reset_classifier(4)
    assert own(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    trainable = {id(p) for p in own.trainable_parameters()}
    assert {id(p) for p in own.backbone.head.parameters()} <= trainable
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(2, global_pool="avg")


def _folder(root, sizes=((40, 24), (24, 40), (33, 33))):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, (w, h) in enumerate(sizes):
            path = root / split / f"c{k % 2}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(path)
    return root


def test_the_default_pipeline_is_the_published_whole_image_resize(tmp_path):
    root = _folder(tmp_path)
    cfg = make_config({"dataset": "folder", "data_root": str(root)})
    _, test, _ = build_datasets(cfg, Preprocessing(16, *HALF), need_train=False)
    for i, path in enumerate(test.paths):  # the earlier pipeline, written out
        img = Image.open(path).convert("RGB").resize((16, 16), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(test[i][0], (x - 0.5) / 0.5), path
    crop = Preprocessing(16, *HALF, crop_pct=0.875, crop_mode="center")  # timm's ImageNet eval
    _, test, _ = build_datasets(cfg, crop, need_train=False)
    timm_eval = create_transform(16, crop_pct=0.875, crop_mode="center", interpolation="bicubic",
                                 mean=HALF[0], std=HALF[1])  # fmt: skip
    for i, path in enumerate(test.paths):
        assert torch.equal(test[i][0], timm_eval(Image.open(path).convert("RGB"))), path


def test_augmentation_is_timms_and_off_by_default(toy, tmp_path, capsys):
    cfg = make_config({"dataset": "folder", "data_root": str(toy)})
    prep = Preprocessing(32, *HALF)
    plain, _, _ = build_datasets(cfg, prep)
    flipped, test, _ = build_datasets(cfg, prep, Augmentation(hflip=1.0))
    for i in range(3):
        assert torch.equal(flipped[i][0], plain[i][0].flip(-1))
    assert Augmentation.from_config(cfg).flags() == []
    assert Augmentation.from_config(cfg).image_transform(prep) is None
    base = ["--model", VIT, "--img-size", "32", "--adapt-from", "11", "--pretrained", "none",
            "--data-root", str(toy), "--epochs", "1", "--batch-size", "4"]  # fmt: skip
    aug = ["--hflip", "0.5", "--aa", "rand-m9-mstd0.5", "--scale", "0.5", "1", "--mixup", "0.2",
           "--cutmix", "0.2"]  # fmt: skip
    capsys.readouterr()
    assert main(base + aug + ["--cache-trunk", "ram", "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "--cache-trunk ram: the input is augmented (--hflip 0.5 --aa rand-m9-mstd0.5 " in err
    assert main(base + aug + ["--output", str(tmp_path / "a")]) == 0  # auto: trains uncached
    assert "trunk cache: off (the input is augmented" in capsys.readouterr().out
    assert main(base + ["--aa", "no-such-policy", "--output", str(tmp_path / "b")]) == 2


def test_timm_checkpoints_and_ddp_prefixes_load(tmp_path):
    ref = create_model(VIT, "linear", 3, img_size=32).backbone
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    path = tmp_path / "checkpoint.pth.tar"  # timm's train.py writes these
    torch.save(wrapped, path)
    model = create_model(VIT, "dtl", 3, img_size=32, adapt_from=11, pretrained=path)
    for k, v in ref.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(model.backbone.state_dict()[k], v), k
    torch.save({"model": {"_orig_mod.x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unexpected \\['x'\\]"):
        create_model(VIT, "dtl", 3, img_size=32, pretrained=tmp_path / "other.pth")


def test_the_hub_is_refused_at_once_when_unreachable(tmp_path, monkeypatch):
    import timm

    from dtl_kernels.models import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(hub, "_cached", lambda cfg: False)  # whatever this machine has cached
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)

    def no_download(*a, **k):
        raise AssertionError("timm's download (and its retries) was reached")

    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(RuntimeError) as info:
        create_model(VIT, "dtl", 3, pretrained=True)
    text = str(info.value)
    assert "127.0.0.1:9 cannot be reached" in text and "pretrained=PATH" in text
    assert "efficientnet-lite0 (for tf_efficientnet_lite0)" in text
