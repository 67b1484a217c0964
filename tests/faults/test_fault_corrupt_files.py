"""Corrupt each kind of file the package reads — checkpoint, adapter, trunk cache, list
file, image, idx file, YAML — and check the run ends in the right result (a rebuilt cache)
or one clear line naming the file, without a traceback."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_kit import assert_same_adapter, flags, options

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")


def error_of(argv: list[str], capsys, code: int = 1) -> str:
    """Run the CLI, expect ``code`` and one error line (no traceback); return that line."""
    got = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("dtl-train: error:")]
    assert got == code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# -- checkpoint --------------------------------------------------------------------------------
def test_damaged_checkpoints(toy, tmp_path, capsys):
    out = tmp_path / "run"
    run(make_config(options(toy, out, stop_after=2)))
    first, second = ckpt.list_checkpoints(out)
    resume = flags(options(toy, out, resume=True))

    torch.save({"format": ckpt.FORMAT, "epoch": 2}, second)  # loads, but keys are missing
    assert "epoch_0002.pt is damaged" in error_of(resume, capsys)
    second.write_bytes(np.random.default_rng(0).bytes(4096))
    line = error_of(resume, capsys)
    assert "epoch_0002.pt is corrupt" in line and "delete it to resume from" in line
    second.unlink()
    assert main(resume) == 0  # falls back to epoch 1 once the bad file is gone


def test_a_checkpoint_renamed_to_a_later_epoch_is_refused(toy, tmp_path, capsys):
    """A copy of epoch 1's checkpoint named epoch 9: --resume took it (over the real newer
    epoch 2) and rotation then deleted epoch 2."""
    out = tmp_path / "run"
    run(make_config(options(toy, out, stop_after=2)))
    first, second = ckpt.list_checkpoints(out)
    shutil.copy(first, first.with_name("epoch_0009.pt"))
    line = error_of(flags(options(toy, out, resume=True)), capsys)
    assert "epoch_0009.pt holds epoch 1, not the epoch 9 its name says" in line
    assert second.is_file() and "delete it to resume from" in line


# -- adapter -----------------------------------------------------------------------------------
def rewrite_adapter(src: Path, dst: Path, edit_config=None, edit_tensors=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_config:
        config = json.loads(meta["config"])
        edit_config(config)
        meta["config"] = json.dumps(config)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_damaged_adapters(toy, tmp_path, reference, capsys):
    good = reference / "adapter.safetensors"

    def eval_only(path: Path, out: str) -> list[str]:
        return flags(options(toy, tmp_path / out, eval_only=True, adapter=str(path)))

    no_method = rewrite_adapter(good, tmp_path / "a.safetensors", lambda c: c.pop("method"))
    line = error_of(eval_only(no_method, "a"), capsys)
    assert "a.safetensors" in line and "config has no 'method'" in line

    def poison(tensors):
        next(iter(tensors.values()))[0] = float("nan")

    nan = rewrite_adapter(good, tmp_path / "b.safetensors", edit_tensors=poison)
    assert "NaN or infinite" in error_of(eval_only(nan, "b"), capsys)

    cut = tmp_path / "c.safetensors"
    cut.write_bytes(good.read_bytes()[:300])
    assert "c.safetensors is not a readable safetensors" in error_of(eval_only(cut, "c"), capsys)
    assert main(eval_only(good, "d")) == 0


# -- trunk cache -------------------------------------------------------------------------------
def test_damaged_disk_cache_is_rebuilt(toy, tmp_path, capsys):
    cache = tmp_path / "cache"
    opts = dict(cache_trunk="disk", cache_dir=str(cache), epochs=1)
    run(make_config(options(toy, tmp_path / "a", **opts)))
    data = bytearray((cache / "trunk-train.bin").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # NaNs in a middle sample
    (cache / "trunk-train.bin").write_bytes(bytes(data))
    (cache / "trunk-test.key.json").write_text("{ not json")
    capsys.readouterr()
    run(make_config(options(toy, tmp_path / "b", **opts)))
    out = capsys.readouterr().out
    assert "trunk-train.bin is damaged" in out and "unreadable key file" in out
    assert_same_adapter(tmp_path / "a", tmp_path / "b")


# -- list file, image ----------------------------------------------------------------------------
def test_list_file_that_is_not_text(toy, tmp_path, capsys):
    base = tmp_path / "lists" / "toy"
    base.mkdir(parents=True)
    pngs = sorted((toy / "train").rglob("*.png"))
    (base / "train800val200.txt").write_text(
        "".join(f"{p} {int(p.parent.name[-1])}\n" for p in pngs)
    )
    (base / "test.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary junk")
    line = error_of(flags(options(toy, tmp_path / "o", dataset="vtab:toy",
                                  data_root=str(tmp_path / "lists"))), capsys)  # fmt: skip
    assert "test.txt is not UTF-8 text" in line


def test_truncated_image_body_streamed_in_a_worker(toy, tmp_path, capsys):
    root = tmp_path / "toy"
    shutil.copytree(toy, root)
    bad = sorted((root / "train").rglob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:80])  # the header is intact, the pixels are not
    argv = flags(options(toy, tmp_path / "o", data_root=str(root), cache_trunk="off", workers=1,
                         epochs=1))  # fmt: skip
    line = error_of(argv, capsys)
    assert f"cannot read image {bad}" in line


# -- idx file ----------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, cut: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data[: len(data) - cut]))


def test_truncated_idx_file(tmp_path, capsys):
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (3, 28, 28)), cut=100)
    argv = ["--dataset", "fashion-mnist", "--data-root", str(root), "--model",
            "vit_tiny_patch16_224", "--pretrained", "none",
            "--output", str(tmp_path / "o")]  # fmt: skip
    line = error_of(argv, capsys)
    assert "t10k-images-idx3-ubyte.gz is truncated" in line


# -- YAML --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("epochs: 3\nlr: [1e-3\n", "is not valid YAML"),
        ("- epochs\n- 3\n", "must hold a mapping of options"),
        ("epochs: three\n", "--epochs: expected a whole number, got 'three'"),
        ("warmup_lr: -1e-7\n", "--warmup-lr must be ≥ 0"),
        ("lr: 1e-3\nepoch: 3\n", "'epoch' (did you mean 'epochs'?)"),
        (b"lr: \xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_bad_yaml(tmp_path, capsys, text, expected):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in error_of(["--config", str(path)], capsys, code=2)
