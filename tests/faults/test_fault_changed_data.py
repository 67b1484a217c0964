"""Data that changes under a run: each checkpoint stores the data's fingerprint (sample
count, and per file its size, modification time and a sampled hash of its bytes); a
``--resume`` on other data is refused, and ``--force-resume`` continues on the new data
with the schedule rebuilt for it, saying so."""

from __future__ import annotations

import io
import os
import shutil

import pytest
import torch
from fault_kit import flags, options
from PIL import Image, PngImagePlugin

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")


@pytest.fixture
def data(toy, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy, root)
    return root


def one_epoch_then(data, out, capsys) -> list[str]:
    """Train one epoch of three, return the ``--resume`` flags."""
    assert main(flags(options(data, out, stop_after=1))) == 0
    capsys.readouterr()
    return flags(options(data, out, resume=True))


def test_resume_on_added_images_is_refused_and_force_resume_rebuilds_the_schedule(
    data, tmp_path, capsys
):
    out = tmp_path / "run"
    resume = one_epoch_then(data, out, capsys)
    for k, src in enumerate(sorted((data / "train" / "class0").glob("*.png"))[:3]):
        shutil.copy(src, src.with_name(f"added{k}.png"))  # 12 → 15 images: 4 steps per epoch

    assert main(resume) == 1
    err = capsys.readouterr().err
    assert "the data changed since" in err and "train: 12 → 15 samples" in err, err[-2000:]
    assert "--force-resume" in err and len(ckpt.list_checkpoints(out)) == 1

    assert main([*resume, "--force-resume"]) == 0
    said = capsys.readouterr().out
    assert "--force-resume: continuing on changed data (train: 12 → 15 samples)" in said
    assert "rebuilt for 4 steps per epoch (the checkpoint had 3) and continues at step 4" in said
    last = torch.load(ckpt.list_checkpoints(out)[-1], weights_only=True)
    assert last["scheduler"]["last_epoch"] == 3 * 4  # every epoch on the new data's steps
    assert last["data"]["train"]["samples"] == 15


def _png_of_size(size: int, color: int) -> bytes:
    """A valid 32×32 PNG of one colour, padded with a text chunk to exactly ``size`` bytes."""
    img = Image.new("RGB", (32, 32), (color, 255 - color, 60))
    for pad in range(size):
        info = PngImagePlugin.PngInfo()
        info.add_text("pad", "x" * pad)
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=info)
        if len(buf.getvalue()) == size:
            return buf.getvalue()
    raise AssertionError(f"no padding gives {size} bytes")


def test_resume_on_a_same_size_replacement_with_its_mtime_put_back_is_refused(
    data, tmp_path, capsys
):
    out = tmp_path / "run"
    resume = one_epoch_then(data, out, capsys)
    victim = sorted((data / "train" / "class1").glob("*.png"))[0]
    st = victim.stat()
    victim.write_bytes(_png_of_size(st.st_size, color=200))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before
    assert main(resume) == 1
    err = capsys.readouterr().err
    assert "train: the same 12 samples, other content" in err, err[-2000:]
