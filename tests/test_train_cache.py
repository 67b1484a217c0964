"""Trunk feature cache (dtl_kernels/train/cache.py): key, rebuilds, atomic disk files,
refusals, size estimate and budget, and training identical to the uncached run."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cli import train_cli

from dtl_kernels import create_model
from dtl_kernels.train import cache as tc
from dtl_kernels.train import cache_store, make_config, run
from dtl_kernels.train.cli import main
from dtl_kernels.train.data import HALF, TensorImages

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")

VIT = "vit_tiny_patch16_224"
CNN = "tf_efficientnet_lite0"


pytestmark = pytest.mark.usefixtures("one_thread")


def options(toy: Path, out: Path, **kw) -> dict:
    base = dict(
        model=VIT, pretrained="none", method="dtl+", dataset="folder", data_root=str(toy),
        img_size=32, epochs=2, batch_size=4, lr=1e-2, warmup_epochs=1, output=str(out),
        progress=False,
    )  # fmt: skip
    base.update(kw)
    return base


def images(n=6, size=32, seed=0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return TensorImages(x, torch.arange(n) % 3, HALF, HALF)


def vit(**kw):
    torch.manual_seed(0)
    return create_model(VIT, method=kw.pop("method", "dtl+"), num_classes=3, img_size=32, **kw)


IDENT = {"name": "toy", "split": "train"}


# -- key -----------------------------------------------------------------------------------------
def test_key_changes_with_everything_that_changes_the_values():
    base = tc.TrunkCache(vit(), images(), "train", IDENT).key_hash
    assert tc.TrunkCache(vit(), images(), "train", IDENT).key_hash == base  # reproducible
    m = vit()
    with torch.no_grad():
        m.backbone.blocks[0].mlp.fc1.weight[0, 0] += 1e-3
    variants = {
        "weights": tc.TrunkCache(m, images(), "train", IDENT),
        "M": tc.TrunkCache(vit(adapt_from=5), images(), "train", IDENT),
        "taps": tc.TrunkCache(vit(tap_from=3), images(), "train", IDENT),
        "content": tc.TrunkCache(vit(), images(seed=1), "train", IDENT),
        "count": tc.TrunkCache(vit(), images(n=5), "train", IDENT),
        "identity": tc.TrunkCache(vit(), images(), "train", {**IDENT, "split": "test"}),
        "dtype": tc.TrunkCache(vit(), images(), "train", IDENT, dtype="bf16"),
        "precision": tc.TrunkCache(vit(), images(), "train", IDENT, setup={"precision": "bf16"}),
    }
    norm = images()
    norm.mean = torch.full((3, 1, 1), 0.4)
    variants["normalisation"] = tc.TrunkCache(vit(), norm, "train", IDENT)
    hashes = {k: c.key_hash for k, c in variants.items()}
    assert base not in hashes.values(), hashes
    assert len(set(hashes.values())) == len(hashes)


def test_size_estimate_is_exact(tmp_path):
    c = tc.TrunkCache(vit(), images(n=5), "train", IDENT)
    # ViT-tiny at 32: 5 tokens × 192; M = 7: z_1 … z_7 and block 7's output
    assert c.shapes == [(5, 192)] * 8
    assert c.bytes_per_sample == 8 * 5 * 192 * 4 and c.estimate() == 5 * c.bytes_per_sample
    path = c.build_disk(tmp_path)
    assert path.stat().st_size == c.estimate()
    h = tc.TrunkCache(vit(), images(n=5), "train", IDENT, dtype="fp16")
    assert h.estimate() * 2 == c.estimate()


def test_cache_values_are_trunk_forward():
    model, ds = vit(), images(n=5)
    c = tc.TrunkCache(model, ds, "train", IDENT, batch_size=2).build_ram()
    x = torch.stack([ds[i][0] for i in range(5)])
    model.eval()
    taps, y, _ = model.trunk_forward(x)
    for i in range(5):
        for got, want in zip(c.sample(i), [*taps, y], strict=True):
            torch.testing.assert_close(got, want[i], rtol=1e-6, atol=1e-6)
    assert c.view()[3][1] == int(ds.labels[3])


# -- disk: atomic, reused, rebuilt -------------------------------------------------------------
def test_disk_cache_is_atomic_reused_and_rebuilt(tmp_path, monkeypatch):
    ds = images()
    c = tc.TrunkCache(vit(), ds, "train", IDENT)
    assert c.load_disk(tmp_path) == "no cache file yet"
    c.build_disk(tmp_path)
    data, key = c.files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunk-train.bin", "trunk-train.key.json"]
    meta = json.loads(key.read_text())
    assert meta["key_sha256"] == c.key_hash and meta["bytes"] == data.stat().st_size

    again = tc.TrunkCache(vit(), ds, "train", IDENT)
    assert again.load_disk(tmp_path) is None and not again.built
    for a, b in zip(again.sample(2), c.sample(2), strict=True):
        assert torch.equal(a, b)

    # another M: the key differs, the reason names what changed
    other = tc.TrunkCache(vit(adapt_from=5), ds, "train", IDENT)
    reason = other.load_disk(tmp_path)
    assert reason.startswith("the key changed") and "trunk_depth_M" in reason

    # a crash while writing leaves no file under the final names and no temporary file
    calls = {"n": 0}
    original = other.model.trunk_forward

    def dying(x):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("power cut")
        return original(x)

    monkeypatch.setattr(other.model, "trunk_forward", dying)
    other.batch_size = 2
    with pytest.raises(RuntimeError, match="power cut"):
        other.build_disk(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunk-train.bin"]  # key file gone first
    assert data.stat().st_size == c.estimate()  # the old data file is untouched
    assert tc.TrunkCache(vit(), ds, "train", IDENT).load_disk(tmp_path) == "no cache file yet"
    monkeypatch.undo()

    # a truncated data file with a matching key file is not used
    c.build_disk(tmp_path)
    data.write_bytes(data.read_bytes()[:100])
    assert "bytes, expected" in tc.TrunkCache(vit(), ds, "train", IDENT).load_disk(tmp_path)


def test_disk_run_reuses_cache_and_rebuilds_on_key_change(toy, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    opts = dict(cache_trunk="disk", cache_dir=str(cache_dir), epochs=1)
    run(make_config(options(toy, tmp_path / "a", **opts)))
    assert "building" in capsys.readouterr().out
    run(make_config(options(toy, tmp_path / "b", **opts)))
    out = capsys.readouterr().out
    assert "reusing" in out and "building" not in out
    run(make_config(options(toy, tmp_path / "c", adapt_from=9, **opts)))
    assert "the key changed" in capsys.readouterr().out


# -- refusals ------------------------------------------------------------------------------------
class Noisy(TensorImages):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.01 * torch.randn_like(x), y


def test_refusal_reasons():
    ds = images()
    assert tc.refusal(vit(), "dtl+", 0.0, [ds]) is None
    assert "full" in tc.refusal(vit(method="full"), "full", 0.0, [ds])
    assert "drop-path" in tc.refusal(vit(), "dtl+", 0.1, [ds])
    assert "drop-path" in tc.refusal(vit(drop_path_rate=0.1), "dtl+", 0.0, [ds])
    assert "dropout" in tc.refusal(vit(proj_drop_rate=0.1), "dtl+", 0.0, [ds])
    noisy = Noisy(ds.images, ds.labels, HALF, HALF)
    assert "random" in tc.refusal(vit(), "dtl+", 0.0, [noisy])
    # dropout only in the tail (after block M) does not change the trunk: allowed
    m = vit()
    m.backbone.blocks[10].mlp.drop1.p = 0.5
    assert tc.refusal(m, "dtl+", 0.0, [ds]) is None


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="full"), "trains the backbone"),
        (dict(drop_path=0.1), "drop-path"),
        (dict(cache_max_bytes="10KiB"), "over the --cache-max-bytes budget"),
    ],
)
def test_explicit_cache_refused_auto_falls_back(toy, tmp_path, capsys, kw, match):
    with pytest.raises(tc.CacheRefused, match=match):
        run(make_config(options(toy, tmp_path / "x", cache_trunk="ram", epochs=1, **kw)))
    s = run(make_config(options(toy, tmp_path / "y", cache_trunk="auto", epochs=1, **kw)))
    assert s["trunk_cache"] == "off" and s["cached_trunk_blocks"] == 0
    assert "trunk cache: off" in capsys.readouterr().out


def test_budget_keeps_train_drops_test(toy, tmp_path, capsys):
    # ViT-tiny at 32: 30 KiB a sample; 12 train (360 KiB) fit 400 KiB, 6 more test do not
    s = run(make_config(options(toy, tmp_path / "x", cache_trunk="ram", epochs=1,
                                cache_max_bytes="400KiB")))  # fmt: skip
    assert s["trunk_cache"] == "ram" and s["cached_trunk_blocks"] == 7
    assert "test split not cached" in capsys.readouterr().out


def test_bytes_parsing_and_config():
    assert tc.parse_bytes("6GiB") == 6 * 2**30 and tc.parse_bytes("500MB") == 500 * 10**6
    assert tc.parse_bytes("2e9") == 2 * 10**9 and tc.parse_bytes(None) is None
    with pytest.raises(ValueError, match="cache-max-bytes"):
        tc.parse_bytes("lots")
    with pytest.raises(ValueError, match="cache-trunk"):
        make_config({"cache_trunk": "yes"})
    with pytest.raises(ValueError, match="cache-dtype"):
        make_config({"cache_dtype": "int8"})
    assert make_config({"cache_trunk": "on"}).cache_trunk == "on"  # earlier spelling of ram


# -- training is unchanged ------------------------------------------------------------------------
@pytest.mark.parametrize("model,size", [(VIT, 32), (CNN, 64)])
def test_fp32_cache_trains_identically(toy, tmp_path, model, size):
    adapters = {}
    for mode in ("off", "ram", "disk"):
        out = tmp_path / mode
        s = run(make_config(options(toy, out, model=model, img_size=size, cache_trunk=mode)))
        assert s["trunk_cache"] == mode
        adapters[mode] = (load_file(str(out / "adapter.safetensors")), s["test_acc"])
    ref, ref_acc = adapters["off"]
    for mode in ("ram", "disk"):
        got, acc = adapters[mode]
        assert acc == ref_acc
        for k in ref:
            assert torch.equal(got[k], ref[k]), (mode, k)


def test_lora_on_the_last_blocks_caches_the_blocks_before_them(toy, tmp_path):
    """``--lora-blocks 3-12``: blocks 1-2 are frozen and see the images only, so they are
    the trunk; the cached run trains exactly as the uncached one. LoRA on every block has
    no trunk to cache."""
    pytest.importorskip("peft")
    adapters = {}
    for mode in ("off", "ram"):
        out = tmp_path / mode
        s = run(make_config(options(toy, out, method="lora", lora_blocks="3-12",
                                    cache_trunk=mode)))  # fmt: skip
        assert s["trunk_cache"] == mode
        adapters[mode] = (load_file(str(out / "adapter.safetensors")), s["test_acc"])
    assert s["cached_trunk_blocks"] == 2
    (ref, ref_acc), (got, acc) = adapters["off"], adapters["ram"]
    assert acc == ref_acc and ref.keys() == got.keys()
    assert any(".lora_" in k for k in ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # the key hashes frozen weights only: LoRA factors of another seed share the cache
    keys = set()
    for seed in (0, 1):
        m = vit(method="lora", lora_blocks="3-12")
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_" in n:
                    p.normal_()
        keys.add(tc.TrunkCache(m, images(), "train", IDENT).key_hash)
    assert len(keys) == 1
    every = vit(method="lora")
    assert every.trunk_depth == 0
    assert "no frozen block" in tc.refusal(every, "lora", 0.0, [images()])


def test_half_caches_train_closely(toy, tmp_path):
    ref = None
    for dtype in ("fp32", "bf16", "fp16"):
        out = tmp_path / dtype
        run(make_config(options(toy, out, cache_trunk="ram", cache_dtype=dtype)))
        got = load_file(str(out / "adapter.safetensors"))
        if ref is None:
            ref = got
            continue
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0.05, atol=0.02)


def test_resume_with_disk_cache_is_bit_identical(toy, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    run(make_config(options(toy, full, cache_trunk="disk")))
    run(make_config(options(toy, part, cache_trunk="disk", stop_after=1)))
    capsys.readouterr()
    run(make_config(options(toy, part, cache_trunk="disk", resume=True)))
    assert "reusing" in capsys.readouterr().out
    a = load_file(str(full / "adapter.safetensors"))
    b = load_file(str(part / "adapter.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_disk_cache_matches_one_process(toy, tmp_path):
    """torchrun, 2 CPU processes: rank 0 writes the disk cache, rank 1 maps it; the result
    matches one uncached process with the same global batch."""
    common = [
        "--model", VIT, "--pretrained", "none", "--method", "dtl+",
        "--dataset", "folder", "--data-root", str(toy), "--img-size", "32", "--epochs", "2",
        "--batch-size", "4", "--lr", "1e-2", "--no-progress",
    ]  # fmt: skip
    assert main([*common, "--cache-trunk", "off", "--output", str(tmp_path / "one")]) == 0  # here
    two = train_cli([*common, "--cache-trunk", "disk", "--output", str(tmp_path / "two")], nproc=2)
    assert two.stdout.count("trunk cache: building") == 2  # train + test, by rank 0 only
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["trunk_cache"] == "disk"
    a = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# -- disk space ------------------------------------------------------------------------------------
def test_disk_build_reserves_space_and_never_writes_through_a_map(tmp_path, monkeypatch):
    reserved = []
    real_map, real_fallocate = cache_store.np.memmap, os.posix_fallocate

    def read_only_map(*a, **k):
        assert k.get("mode", "r+") in ("r", "c"), "the build wrote through a memory map"
        return real_map(*a, **k)

    def fallocate(fd, offset, size):
        reserved.append(size)
        return real_fallocate(fd, offset, size)

    monkeypatch.setattr(cache_store.np, "memmap", read_only_map)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    c = tc.TrunkCache(vit(), images(), "train", IDENT)
    c.build_disk(tmp_path)
    assert reserved == [c.estimate()]
    assert tc.TrunkCache(vit(), images(), "train", IDENT).load_disk(tmp_path) is None


def test_full_disk_is_a_clear_error_and_keeps_the_old_cache(tmp_path, monkeypatch):
    import errno

    c = tc.TrunkCache(vit(), images(), "train", IDENT)
    c.build_disk(tmp_path)
    old = (tmp_path / "trunk-train.bin").read_bytes()

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    other = tc.TrunkCache(vit(adapt_from=5), images(), "train", IDENT)
    with pytest.raises(tc.CacheRefused, match=r"no room for .*train\.bin .*No space left"):
        other.build_disk(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunk-train.bin"]  # no temp file
    assert (tmp_path / "trunk-train.bin").read_bytes() == old


def test_free_space_check_does_not_count_the_old_file(toy, tmp_path, monkeypatch):
    import shutil

    opts = dict(cache_trunk="disk", cache_dir=str(tmp_path / "cache"), epochs=1)
    run(make_config(options(toy, tmp_path / "a", **opts)))
    old = (tmp_path / "cache" / "trunk-train.bin").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(tc.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    # another normalisation: a new key, the same size; the old file lives until the rename
    with pytest.raises(
        tc.CacheRefused, match=r"only 1000 B free .*old trunk-train\.bin .*delete it"
    ):
        run(make_config(options(toy, tmp_path / "b", normalize="imagenet", **opts)))
    assert (tmp_path / "cache" / "trunk-train.bin").stat().st_size == old


class OneProcess:
    """The loop's process info for one process, recording the waits it is asked for."""

    def __init__(self):
        self.world, self.rank, self.main, self.device = 1, 0, True, torch.device("cpu")
        self.waits = []

    def agree(self, error, what, extra_timeout_s=0.0):
        self.waits.append((what, extra_timeout_s))
        if error is not None:
            raise error

    def run_agreed(self, what, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class _Clock:
    """``time`` for cache_store whose every probe takes 0.125 s: the sizes below compare
    estimates from separate probes, which a loaded machine would otherwise make differ."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.125
        return self.now


def test_ddp_wait_for_the_disk_build_is_sized_to_the_work(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_store, "time", _Clock())
    cfg = make_config(options(toy, tmp_path, cache_trunk="disk"))
    d, splits = OneProcess(), {"train": images(n=6), "test": images(n=3)}
    idents = {s: {**IDENT, "split": s} for s in splits}
    tc.prepare(cfg, vit(), splits, idents, d, nullcontext, False, 4, say=lambda m: None)
    ((what, wait),) = d.waits
    assert what == "building the disk trunk cache"
    small = tc.TrunkCache(vit(), images(n=6), "train", IDENT)
    assert wait >= 6 * small.probe_seconds and wait > small.build_seconds() / 2


# -- disk: what shares the folder --------------------------------------------------------------
def test_a_file_renamed_over_the_cache_while_it_is_checked_is_never_mapped(tmp_path, monkeypatch):
    """Another run renaming its own file over ours between the hash and the map: the data
    mapped is the data hashed (one open handle), not the newcomer's."""
    ds = images()
    c = tc.TrunkCache(vit(), ds, "train", IDENT)
    c.build_disk(tmp_path)
    data_path, _ = c.files(tmp_path)
    want = c.sample(3)
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(data_path.stat().st_size))  # zeros: another run's cache
    real = cache_store._handle_sha256

    def hash_then_swap(f, *a):
        digest = real(f, *a)
        os.replace(other, data_path)  # lands after the check, before the map
        return digest

    monkeypatch.setattr(cache_store, "_handle_sha256", hash_then_swap)
    again = tc.TrunkCache(vit(), ds, "train", IDENT)
    assert again.load_disk(tmp_path) is None
    for a, b in zip(again.sample(3), want, strict=True):
        assert torch.equal(a, b)


def test_a_users_own_files_in_the_cache_folder_are_left_alone(tmp_path):
    mine = {"train.bin": b"my tokenised corpus", "test.key.json": b"{}"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    tc.TrunkCache(vit(), images(), "train", IDENT).build_disk(tmp_path)
    assert all((tmp_path / n).read_bytes() == d for n, d in mine.items())


def test_the_key_names_the_code_and_only_its_own_fields(tmp_path):
    """timm's and this package's versions are in the key (a forward change that keeps the
    weights); a key file's own field names (untrusted text) are never echoed."""
    c = tc.TrunkCache(vit(), images(), "train", IDENT)
    assert c.key["timm"] and c.key["dtl_kernels"] and c.key["transformers"] is None
    c.build_disk(tmp_path)
    _, key_path = c.files(tmp_path)
    meta = json.loads(key_path.read_text())
    meta["key"] = {**meta["key"], "timm": "0.0.1", "\x1b[2Jfake": 1}
    meta["key_sha256"] = "0" * 64
    key_path.write_text(json.dumps(meta))
    reason = tc.TrunkCache(vit(), images(), "train", IDENT).load_disk(tmp_path)
    assert reason == "the key changed: timm"


def test_an_fp16_cache_that_would_overflow_is_refused():
    m = vit()
    with torch.no_grad():
        m.backbone.patch_embed.proj.weight.mul_(1e5)  # finite in fp32, beyond fp16's range
    c = tc.TrunkCache(m, images(), "train", IDENT, dtype="fp16")
    with pytest.raises(tc.CacheRefused, match="exceed float16's range"):
        c.build_ram()
