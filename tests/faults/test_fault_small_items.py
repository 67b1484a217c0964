"""The smaller defects of issue 22, one test each: option values beyond any byte count,
a DTL+ kernel wider than its token grid, a negative class count, 32-bit integer TIFFs, an
empty class folder, a one-class dataset, a folder named like an image, and bad sizes for
``estimate_memory``. (``--lr 1e300`` and YAML keys given twice are tested with divergence
and hostile files.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from fault_kit import flags, options
from fuzz_kit import AllocationGuard
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from dtl_kernels import DTLViT, estimate_memory
from dtl_kernels.train.cli import main
from dtl_kernels.train.data import load_image

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
MIB = 2**20


def error_line(argv: list[str], capsys, code: int) -> str:
    got = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("dtl-train: error:")]
    assert got == code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("budget", ["inf", "nan", "1e400", "-inf"])
def test_cache_budget_that_is_no_byte_count_is_an_option_error(toy, tmp_path, capsys, budget):
    argv = flags(options(toy, tmp_path / "run")) + [f"--cache-max-bytes={budget}"]
    assert "--cache-max-bytes: cannot read" in error_line(argv, capsys, 2)


def test_conv_kernel_wider_than_the_token_grid_is_refused_before_it_is_built(toy, tmp_path, capsys):
    with AllocationGuard(256 * MIB):  # main built a 770 MB kernel, then ran 160 s a step
        line = error_line(flags(options(toy, tmp_path / "a", conv_kernel=1001)), capsys, 2)
    assert "--conv-kernel 1001 is wider than the token grids" in line
    line = error_line(flags(options(toy, tmp_path / "b", conv_kernel=5)), capsys, 2)
    assert "largest token grid of an adapted block is 2×2" in line and "≤ 3" in line


def test_crop_pct_past_the_resize_limit_at_the_model_s_own_size_is_an_option_error(
    toy, tmp_path, capsys, monkeypatch
):
    """Without --img-size the model's own size counts: a run would otherwise write an
    adapter whose preprocessing no longer loads (timm's resize side past 16384 px)."""
    from dtl_kernels.train import setup

    monkeypatch.setattr(setup, "input_size", lambda cfg: 8192)  # a model of that size
    opts = {k: v for k, v in options(toy, tmp_path / "run", crop_pct=0.25).items()
            if k != "img_size"}  # fmt: skip
    assert "--img-size 8192 with --crop-pct 0.25 resizes images to 32768" in error_line(
        flags(opts), capsys, 2
    )


def test_class_count_other_than_the_named_classes_is_refused_before_training(toy, tmp_path, capsys):
    """Three class folders and --num-classes 5: the adapter could not record the names for
    the head (found when it was written, after the whole run, before)."""
    out = tmp_path / "run"
    line = error_line(flags(options(toy, out, num_classes=5)), capsys, 1)
    assert "3 names for a head of --num-classes 5" in line and "drop --num-classes" in line
    assert not (out / "checkpoints").exists()


def test_capped_splits_keep_every_named_class(toy, tmp_path, monkeypatch):
    """--max-train / --max-test keeping only the first class's images: the head still has
    one output per class folder ("one class only" was refused before; with the last
    classes missing, a head too small for the class names failed at the adapter)."""
    from dtl_kernels.train import data
    from dtl_kernels.train.config import make_config
    from dtl_kernels.train.setup import backbone_family, preprocessing
    from dtl_kernels.train.transforms import Augmentation

    monkeypatch.setattr(data, "_keep", lambda length, n: torch.arange(n))  # the first n
    cfg = make_config(options(toy, tmp_path / "o", max_train=2, max_test=2))
    prep = preprocessing(cfg, backbone_family(cfg.model), None)
    train, test, n = data.build_datasets(cfg, prep, Augmentation.from_config(cfg))
    assert int(train.labels.max()) == int(test.labels.max()) == 0  # what the caps kept
    assert len(test.classes) == 3 and n == 3


def test_negative_class_count_is_refused():
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="num_classes must be a whole number ≥ 0, got -1"):
        DTLViT(backbone, num_classes=-1, adapt_from=1)


def test_32_bit_integer_tiff_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 1000).astype(np.int32)
    path = tmp_path / "deep.tif"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I" and ramp.max() > 65535
    gray = load_image(path, 64)[0].numpy().astype(int)
    assert gray.min() == 0 and gray.max() == 255
    assert (gray == 255).mean() < 0.01  # main clipped everything above 65535 to white
    assert np.all(np.diff(gray.reshape(-1)[:: 64 * 4]) >= 0)  # the ramp stays a ramp


@pytest.fixture
def data(toy, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    return root


def test_empty_class_folder_is_refused(data, tmp_path, capsys):
    (data / "train" / "class0_empty").mkdir()  # sorted before class1: would shift its label
    (data / "test" / "class0_empty").mkdir()
    line = error_line(flags(options(data, tmp_path / "run")), capsys, 1)
    assert f"class folder {data / 'train' / 'class0_empty'} holds no images" in line


def test_one_class_dataset_is_refused(data, tmp_path, capsys):
    for split in ("train", "test"):
        for name in ("class1", "class2"):
            shutil.rmtree(data / split / name)
    line = error_line(flags(options(data, tmp_path / "run")), capsys, 1)
    assert "one class only" in line and "100 %" in line
    assert "--num-classes must be ≥ 2" in error_line(
        flags(options(data, tmp_path / "run", num_classes=1)), capsys, 2
    )


def test_a_folder_named_like_an_image_is_not_an_image(data, tmp_path, capsys):
    (data / "train" / "class0" / "x.jpg").mkdir()
    assert main(flags(options(data, tmp_path / "run", epochs=1))) == 0, capsys.readouterr().err
    assert "12 train / 6 test images" in capsys.readouterr().out


@pytest.mark.parametrize("size", [-32, 0, (32, -1), (32,), 2.5, True])
def test_estimate_memory_refuses_bad_image_sizes(size):
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    model = DTLViT(backbone, num_classes=3, adapt_from=1)
    with pytest.raises(ValueError, match="image_size must be a positive int or"):
        estimate_memory(model, 2, size)
