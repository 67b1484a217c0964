"""The public model API: ``DTLViT``, ``DTLSwin``, ``create_model`` and their files.

Construction and validation, methods (dtl, dtl+, dtl+*, linear, full), pretrained
checkpoints from a path (.pth / .bin / .safetensors / Google .npz), the offline error for
``pretrained=True``, published-checkpoint round trips and strict-loading errors, adapter
files and their errors, head modes, dynamic image sizes and patch sizes.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch

import dtl_kernels
from dtl_kernels import DTLSwin, DTLViT, create_model, load_adapter, save_adapter

VIT = "vit_tiny_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"
SMALL_VIT = dict(img_size=32)  # 2×2 patch grid
SMALL_SWIN = dict(img_size=64, window_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _vit_backbone(**kw):
    return timm.create_model(VIT, pretrained=False, **dict(SMALL_VIT, **kw))


def _swin_backbone(**kw):
    return timm.create_model(SWIN, pretrained=False, **dict(SMALL_SWIN, **kw))


def _randomize_side(model, seed=0):
    """Non-zero B / conv / head so that outputs depend on every adapter tensor."""
    gen = torch.Generator().manual_seed(seed)
    sd = {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * (0.05 if "lora_B" in k else 0.3)
        for k, v in model.official_state_dict().items()
    }
    model.load_official_state_dict(sd)
    return sd


def _images(*shape):
    return torch.randn(*shape)


# ---------------------------------------------------------------------------- API


def test_public_api():
    assert dtl_kernels.DTLViT is DTLViT and dtl_kernels.DTLSwin is DTLSwin
    assert callable(dtl_kernels.create_model)
    assert isinstance(dtl_kernels.__version__, str)


@pytest.mark.parametrize(
    "method,conv,adapt_from,trainable_kind",
    [
        ("dtl", 0, 7, "side"),
        ("dtl+", 3, 7, "side"),
        ("dtl+*", 3, 1, "side"),
        ("linear", None, None, "head"),
        ("full", None, None, "all"),
    ],
)
def test_create_model_methods(method, conv, adapt_from, trainable_kind):
    model = create_model(VIT, method=method, num_classes=5, **SMALL_VIT)
    assert isinstance(model, DTLViT)
    assert model.method == method
    out = model(_images(2, 3, 32, 32))
    assert out.shape == (2, 5)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    if trainable_kind == "side":
        cfg = model.csn.config
        assert (cfg.conv_kernel, cfg.adapt_from, cfg.rank, cfg.beta) == (conv, adapt_from, 2, 100.0)
        assert names == {n for n, _ in model.named_parameters() if n.startswith(("csn.", "head."))}
        assert any(n.startswith("csn.up") for n in names)
        assert any(n.startswith("csn.convs") for n in names) == bool(conv)
    elif trainable_kind == "head":
        assert model.csn is None
        assert names == {"head.weight", "head.bias"}
    else:
        assert model.csn is None
        assert names == {n for n, _ in model.named_parameters()}
    summary = model.summary()
    assert isinstance(summary, str) and method in summary and "trainable" in summary
    assert f"{model.num_parameters(trainable_only=True):,}" in summary


def test_create_model_swin_defaults():
    model = create_model(SWIN, method="dtl+", num_classes=4, **SMALL_SWIN)
    assert isinstance(model, DTLSwin)
    cfg = model.csn.config
    assert (cfg.rank, cfg.conv_kernel, cfg.tap_from, cfg.adapt_from) == (4, 5, 5, 8)
    assert model(_images(2, 3, 64, 64)).shape == (2, 4)


def test_published_swin_b_defaults():
    # Swin-B depths (2, 2, 18, 2): taps on blocks 5…24, add-back after 15…24 (SPEC §1).
    from dtl_kernels.models.swin import default_swin_blocks

    assert default_swin_blocks([2, 2, 18, 2]) == (5, 15)


def test_create_model_options_go_to_the_right_place():
    model = create_model(
        VIT,
        method="dtl",
        num_classes=3,
        rank=3,
        adapt_from=4,
        tap_from=2,
        beta=50.0,
        drop_path_rate=0.1,
        **SMALL_VIT,
    )
    cfg = model.csn.config
    assert (cfg.rank, cfg.adapt_from, cfg.tap_from, cfg.beta) == (3, 4, 2, 50.0)
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert set(model.official_state_dict()) >= {"lora_dict.1.lora_A", "lora_dict.11.lora_B"}
    assert "lora_dict.0.lora_A" not in model.official_state_dict()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="magic"), "method"),
        (dict(method="dtl", conv_kernel=3), "dtl\\+"),
        (dict(method="dtl+", conv_kernel=0), "conv_kernel"),
        (dict(method="dtl+*", adapt_from=5), "adapt_from"),
        (dict(method="linear", rank=4), "rank"),
        (dict(method="full", conv_kernel=3), "conv_kernel"),
    ],
)
def test_create_model_bad_method_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(VIT, num_classes=3, **kwargs, **SMALL_VIT)


def test_unsupported_backbones():
    with pytest.raises(TypeError, match="no DTL wrapper for RegNet: supported are .* ResNet"):
        create_model("regnetx_002", num_classes=3)
    with pytest.raises(TypeError, match="VisionTransformer"):
        DTLViT(_swin_backbone())
    with pytest.raises(TypeError, match="SwinTransformer"):
        DTLSwin(_vit_backbone())
    with pytest.raises(TypeError):
        DTLViT(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not_a_timm_model"):
        create_model("not_a_timm_model", num_classes=3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(adapt_from=0), ValueError, "adapt_from"),
        (dict(adapt_from=13), ValueError, "adapt_from"),
        (dict(tap_from=0), ValueError, "tap_from"),
        (dict(tap_from=13, adapt_from=12), ValueError, "tap_from"),
        (dict(tap_from=8, adapt_from=7), ValueError, "adapt_from"),
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=-2), ValueError, "rank"),
        (dict(rank=193), ValueError, "rank"),
        (dict(conv_kernel=-1), ValueError, "conv_kernel"),
        (dict(rank=2.5), TypeError, "rank"),
        (dict(adapt_from="7"), TypeError, "adapt_from"),
        (dict(beta=float("nan")), (TypeError, ValueError), "beta"),
        # finite in float64 but not in the kernels' float32: refused at the first forward
        # and by save_adapter (blaming the tensors) before
        (dict(beta=1e39), ValueError, r"beta must be a finite number of float32's range"),
        (dict(beta=True), TypeError, "beta must be a Python int or float, got bool"),
        (dict(head="bogus"), ValueError, "head"),
    ],
)
def test_bad_vit_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DTLViT(_vit_backbone(), num_classes=3, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(adapt_from=13), "adapt_from"),
        (dict(tap_from=0), "tap_from"),
        (dict(rank=97), "rank"),  # stage 1 width is 96
        (dict(conv_kernel=-3), "conv_kernel"),
    ],
)
def test_bad_swin_options(kwargs, match):
    kwargs = dict(dict(tap_from=1, adapt_from=1), **kwargs)
    with pytest.raises(ValueError, match=match):
        DTLSwin(_swin_backbone(), num_classes=3, **kwargs)


def test_rank_up_to_width_is_fine():
    model = DTLViT(_vit_backbone(depth=2), adapt_from=1, rank=192, num_classes=2)
    assert model(_images(1, 3, 32, 32)).shape == (1, 2)


# ------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_bad_images(family):
    if family == "vit":
        model, size = DTLViT(_vit_backbone(), conv_kernel=3, num_classes=3), 32
    else:
        model, size = DTLSwin(_swin_backbone(), conv_kernel=5, num_classes=3), 64
    with pytest.raises(ValueError, match=r"\d+x\d+|size"):
        model(_images(1, 3, size + 32, size))  # does not fit the fixed-size backbone
    with pytest.raises(ValueError, match="channels"):
        model(_images(1, 1, size, size))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch, channels, H, W"):
        model(_images(3, size, size))
    if family == "swin":  # timm's window attention cannot run an empty batch
        with pytest.raises(ValueError, match="empty batch"):
            model(_images(0, 3, size, size))
    else:
        assert model(_images(0, 3, size, size)).shape == (0, 3)
    assert model(_images(1, 3, size, size)).shape == (1, 3)


def test_dynamic_size_not_a_patch_multiple():
    model = DTLViT(_vit_backbone(dynamic_img_size=True), conv_kernel=3, num_classes=3)
    with pytest.raises(ValueError, match="patch"):
        model(_images(1, 3, 40, 32))


# --------------------------------------------------------------------- pretrained=PATH


def _save(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _assert_backbone_equal(model, source, skip=("head.",)):
    got = model.backbone.state_dict()
    compared = 0
    for k, v in source.state_dict().items():
        if k.startswith(skip):
            continue
        assert torch.equal(got[k], v), k
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_pretrained_path_vit(tmp_path, suffix):
    source = _vit_backbone()  # head: 1000 classes, as timm checkpoints have
    path = tmp_path / f"vit{suffix}"
    _save(source.state_dict(), path)
    model = create_model(VIT, method="dtl+", num_classes=5, pretrained=path, **SMALL_VIT)
    _assert_backbone_equal(model, source)
    assert not torch.equal(model.head.weight, source.head.weight)
    # Same checkpoint, wrapped the way training scripts save it.
    nested = tmp_path / f"nested{suffix}"
    if suffix != ".safetensors":
        torch.save({"model": source.state_dict(), "epoch": 3}, nested)
        loaded = create_model(VIT, num_classes=5, pretrained=str(nested), **SMALL_VIT)
        _assert_backbone_equal(loaded, source)


def test_pretrained_path_resizes_position_embedding(tmp_path):
    source = timm.create_model(VIT, pretrained=False)  # 224: a 14×14 position grid
    path = tmp_path / "vit224.safetensors"
    _save(source.state_dict(), path)
    model = create_model(VIT, num_classes=2, pretrained=path, **SMALL_VIT)
    assert model.backbone.pos_embed.shape == (1, 1 + 4, 192)
    _assert_backbone_equal(model, source, skip=("head.", "pos_embed"))


def test_pretrained_path_swin(tmp_path):
    source = _swin_backbone()
    path = tmp_path / "swin.safetensors"
    _save(source.state_dict(), path)
    model = create_model(SWIN, method="dtl+", num_classes=5, pretrained=path, **SMALL_SWIN)
    _assert_backbone_equal(model, source)


def _write_google_npz(model, path):
    """A checkpoint in the layout of Google's original ViT ``.npz`` (what timm reads)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w = sd[b + "attn.qkv.weight"].reshape(3, d, d)
        qkv_b = sd[b + "attn.qkv.bias"].reshape(3, d)
        for j, name in enumerate(("query", "key", "value")):
            w[mha + f"{name}/kernel"] = qkv_w[j].T.reshape(d, heads, d // heads)
            w[mha + f"{name}/bias"] = qkv_b[j].reshape(heads, d // heads)
        proj = sd[b + "attn.proj.weight"].reshape(d, heads, d // heads)
        w[mha + "out/kernel"] = proj.transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[p + f"{ln}/scale"] = sd[b + f"{norm}.weight"]
            w[p + f"{ln}/bias"] = sd[b + f"{norm}.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
    return w


def test_pretrained_path_google_npz(tmp_path):
    source = _vit_backbone(depth=3)
    path = tmp_path / "ViT-Ti_16.npz"
    _write_google_npz(source, path)
    model = create_model(VIT, num_classes=5, pretrained=path, depth=3, adapt_from=2, **SMALL_VIT)
    got = model.backbone.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def _wider_query(w):
    """Block 0's query kernel twice as wide and its key kernel empty: joined, the three
    still have the (3D, D) shape timm copies into."""
    mha = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
    q = w[mha + "query/kernel"]
    w[mha + "query/kernel"] = np.concatenate([q, q[:, ::-1]], axis=1)
    w[mha + "key/kernel"] = np.zeros((q.shape[0], 0, q.shape[2]), np.float32)


@pytest.mark.parametrize(
    "edit,match,depth",
    [
        (lambda w: w.update({"embedding/bias": np.zeros(1, np.float32)}),
         r"shape \(1,\) for a weight of shape \(192,\)", 3),
        (lambda w: w.update({"Transformer/encoder_norm/scale": np.ones(192, np.int64)}),
         "dtype torch.int64 for float weights", 3),
        (lambda w: w["Transformer/encoderblock_1/LayerNorm_0/bias"].__setitem__(0, np.nan),
         "NaN or infinite", 3),
        (lambda w: None, "holds 3 encoder blocks, the model has 2", 2),
        (lambda w: w.update({"embedding/kernel": np.zeros((128, 128, 3, 1), np.float32)}),
         "not a patch kernel of at most 4096 pixels", 3),
        (_wider_query, "query, key and value kernels differ in shape", 3),
    ],
    ids=["broadcast-bias", "int-scale", "nan", "deeper-file", "huge-kernel", "qkv-shapes"],
)  # fmt: skip
def test_a_google_npz_timm_would_take_silently_is_refused(tmp_path, edit, match, depth):
    """timm copies each array with ``copy_``, which broadcasts and casts, and stops at the
    model's last block: a wrong file would load as other weights without a word."""
    w = _write_google_npz(_vit_backbone(depth=3), tmp_path / "ok.npz")
    edit(w)
    np.savez(tmp_path / "bad.npz", **w)
    with pytest.raises(ValueError, match=match) as info:
        create_model(VIT, num_classes=5, pretrained=tmp_path / "bad.npz", depth=depth,
                     adapt_from=1, **SMALL_VIT)  # fmt: skip
    assert "bad.npz" in str(info.value)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_model(VIT, num_classes=2, pretrained=tmp_path / "missing.pth", **SMALL_VIT)
    bad_suffix = tmp_path / "weights.txt"
    bad_suffix.write_text("hello")
    with pytest.raises(ValueError, match="weights.txt"):
        create_model(VIT, num_classes=2, pretrained=bad_suffix, **SMALL_VIT)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        create_model(VIT, num_classes=2, pretrained=garbage, **SMALL_VIT)
    # A checkpoint of another model: missing / mis-shaped keys are listed.
    other = tmp_path / "small.safetensors"
    _save(timm.create_model("vit_small_patch16_224", depth=2, **SMALL_VIT).state_dict(), other)
    with pytest.raises(ValueError) as info:
        create_model(VIT, num_classes=2, pretrained=other, **SMALL_VIT)
    msg = str(info.value)
    assert "blocks.2." in msg and "missing" in msg and "mis-shaped" in msg and "384" in msg


def test_pretrained_true_offline_names_the_path_option(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError) as info:
        create_model(VIT, num_classes=3, pretrained=True, **SMALL_VIT)
    msg = str(info.value)
    assert "pretrained=PATH" in msg and VIT in msg


# ----------------------------------------------------------- published checkpoints


@pytest.mark.parametrize("family,conv", [("vit", 0), ("vit", 4), ("swin", 5)])
def test_official_state_dict_round_trip(family, conv):
    if family == "vit":
        bb, images, cls = _vit_backbone(), _images(2, 3, 32, 32), DTLViT
        kw = dict(adapt_from=5)
    else:
        bb, images, cls = _swin_backbone(), _images(2, 3, 64, 64), DTLSwin
        kw = {}
    bb_copy = copy.deepcopy(bb)
    model = cls(bb, conv_kernel=conv, num_classes=4, **kw).eval()
    _randomize_side(model)
    sd = model.official_state_dict()
    fresh = cls(bb_copy, conv_kernel=conv, num_classes=4, **kw).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(images), model(images))
        fresh.load_official_state_dict(sd)
        assert torch.equal(fresh(images), model(images))


def test_official_state_dict_with_backbone_onto_other_backbone():
    model = DTLViT(_vit_backbone(), conv_kernel=3, num_classes=4).eval()
    _randomize_side(model)
    sd = model.official_state_dict(include_backbone=True)
    assert "blocks.0.attn.qkv.weight" in sd and "lora_fusion.weight" in sd
    torch.manual_seed(123)
    fresh = DTLViT(_vit_backbone(), conv_kernel=3, num_classes=4).eval()
    fresh.load_official_state_dict(sd)
    images = _images(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    assert all(not p.requires_grad for p in fresh.backbone.parameters())


def test_official_keys_and_shapes():
    model = DTLViT(_vit_backbone(), conv_kernel=5, rank=3, num_classes=4)
    sd = model.official_state_dict()
    assert sd["lora_dict.0.lora_A"].shape == (3, 192)
    assert sd["lora_dict.11.lora_B"].shape == (192, 3)
    assert sd["lora_fusion.weight"].shape == (192, 1, 5, 5)
    assert sd["head.weight"].shape == (4, 192) and sd["head.bias"].shape == (4,)
    assert len(sd) == 2 * 12 + 1 + 2


def test_official_strict_loading_errors():
    model = DTLViT(_vit_backbone(), conv_kernel=3, num_classes=4)
    good = model.official_state_dict()

    missing = dict(good)
    del missing["lora_dict.3.lora_B"]
    with pytest.raises(ValueError, match=r"missing.*lora_dict\.3\.lora_B"):
        model.load_official_state_dict(missing)

    unexpected = dict(good, **{"lora_dict.extra.lora_C": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected.*lora_dict\.extra\.lora_C"):
        model.load_official_state_dict(unexpected)

    misshaped = dict(good, **{"lora_dict.2.lora_A": torch.zeros(2, 7)})
    with pytest.raises(ValueError, match=r"mis-shaped.*lora_dict\.2\.lora_A"):
        model.load_official_state_dict(misshaped)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A failed load changes nothing.
    with pytest.raises(ValueError):
        bad = dict(misshaped, **{"lora_dict.0.lora_B": torch.ones(192, 2)})
        model.load_official_state_dict(bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # Non-strict: missing and unexpected are tolerated, mis-shaped never.
    model.load_official_state_dict(missing, strict=False)
    model.load_official_state_dict(unexpected, strict=False)
    with pytest.raises(ValueError, match="mis-shaped"):
        model.load_official_state_dict(misshaped, strict=False)
    with pytest.raises(TypeError):
        model.load_official_state_dict([("head.bias", torch.zeros(4))])


def test_official_checkpoint_wrapped_under_model_key():
    model = DTLViT(_vit_backbone(), num_classes=4).eval()
    sd = _randomize_side(model)
    fresh = DTLViT(copy.deepcopy(model.backbone), num_classes=4).eval()
    fresh.load_official_state_dict({"model": sd})
    images = _images(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def _published_swin_state_dict(model) -> dict:
    """What the published Swin's ``state_dict()`` holds: the LoRA tensors at the top level
    (a fusion conv for every stage) and again under each stage, ``layers.<s>.…``."""
    sd = model.official_state_dict()
    for s in range(len(model.depths)):
        sd.setdefault(f"lora_fusions.{s}.weight", torch.zeros_like(sd["lora_fusions.2.weight"]))
    lora = [k for k in sd if k.startswith(("lora_dict.", "lora_fusions."))]
    for s in range(len(model.depths)):
        sd.update({f"layers.{s}.{k}": sd[k].clone() for k in lora})
    return sd


def test_published_swin_stage_aliases():
    model = DTLSwin(_swin_backbone(), conv_kernel=3, num_classes=4).eval()
    _randomize_side(model)
    sd = _published_swin_state_dict(model)
    assert sum(k.startswith(("lora_", "layers.")) for k in sd) == 100  # Swin-T, 8 taps
    fresh = DTLSwin(copy.deepcopy(model.backbone), conv_kernel=3, num_classes=4).eval()
    fresh.load_official_state_dict(sd)  # strict
    images = _images(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))

    only_aliases = {k: v for k, v in sd.items() if not k.startswith("lora_")}
    fresh.load_official_state_dict(only_aliases)  # the stage copies alone are enough

    bad = dict(sd)
    bad["layers.1.lora_dict.6.lora_B"] = bad["layers.1.lora_dict.6.lora_B"] + 1
    with pytest.raises(ValueError, match=r"layers\.1\.lora_dict\.6\.lora_B differs from lora_dict"):
        fresh.load_official_state_dict(bad, strict=False)


# ---------------------------------------------------------------------- adapters


def _vit_model(bb=None, **kw):
    kw = dict(dict(conv_kernel=3, num_classes=4), **kw)
    return DTLViT(bb if bb is not None else _vit_backbone(), **kw).eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_adapter_round_trip(tmp_path, family):
    if family == "vit":
        bb, images = _vit_backbone(), _images(2, 3, 32, 32)
        make = lambda b: DTLViT(b, conv_kernel=4, num_classes=3).eval()  # noqa: E731
    else:
        bb, images = _swin_backbone(), _images(2, 3, 64, 64)
        make = lambda b: DTLSwin(b, conv_kernel=5, num_classes=3).eval()  # noqa: E731
    bb_copy = copy.deepcopy(bb)
    model = make(bb)
    _randomize_side(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    assert path.is_file()
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write cleaned up
    fresh = make(bb_copy)
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    # The file holds only the adapter, not the frozen backbone.
    tensors, meta = dtl_kernels.read_adapter(path)
    n = sum(t.numel() for t in tensors.values())
    assert n == model.num_parameters(trainable_only=True)


@pytest.mark.parametrize(
    "other,what",
    [
        (lambda: _vit_model(_vit_backbone(depth=6), adapt_from=3), "depth"),
        (lambda: _vit_model(timm.create_model("vit_small_patch16_224", **SMALL_VIT)), "width"),
        (lambda: _vit_model(_vit_backbone(patch_size=8)), "patch"),
        (lambda: _vit_model(rank=3), "rank"),
        (lambda: _vit_model(conv_kernel=5), "conv_kernel"),
        (lambda: _vit_model(conv_kernel=0), "conv_kernel"),
        (lambda: _vit_model(num_classes=7), "num_classes"),
        (lambda: DTLSwin(_swin_backbone(), conv_kernel=3, num_classes=4), "family"),
    ],
)
def test_adapter_onto_incompatible_model(tmp_path, other, what):
    model = _vit_model()
    path = save_adapter(model, tmp_path / "a.safetensors")
    target = other()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=what):
        load_adapter(target, path)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_file_errors(tmp_path):
    model = _vit_model()
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_adapter(model, tmp_path / "nothing.safetensors")

    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="not a dtl_kernels adapter"):
        load_adapter(model, plain)

    text = tmp_path / "text.safetensors"
    text.write_text("this is not a tensor file")
    with pytest.raises(ValueError, match="text.safetensors"):
        load_adapter(model, text)

    good = save_adapter(model, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_adapter(model, truncated)


# ------------------------------------------------------------ head modes, sizes, patches


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_head_backbone_mode(family):
    if family == "vit":
        bb, images, cls = _vit_backbone(num_classes=5), _images(2, 3, 32, 32), DTLViT
    else:
        bb, images, cls = _swin_backbone(num_classes=5), _images(2, 3, 64, 64), DTLSwin
    reference = copy.deepcopy(bb).eval()
    model = cls(bb, head="backbone", conv_kernel=3).eval()
    assert model.num_classes == 5
    with torch.no_grad():  # B = 0: exactly the backbone with its own pooling and head
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"backbone.head.weight", "backbone.head.bias"} <= trainable or {
        "backbone.head.fc.weight",
        "backbone.head.fc.bias",
    } <= trainable
    assert all(n.startswith(("csn.", "backbone.head.")) for n in trainable)
    official = model.official_state_dict()
    assert "head.weight" in official or "head.fc.weight" in official
    model.train()
    model(images).sum().backward()


def test_head_backbone_mode_new_class_count():
    model = DTLViT(_vit_backbone(), head="backbone", num_classes=7)
    assert model(_images(1, 3, 32, 32)).shape == (1, 7)


def test_num_classes_zero_returns_pooled_features():
    model = DTLViT(_vit_backbone(), num_classes=0)
    assert model(_images(2, 3, 32, 32)).shape == (2, 192)


@pytest.mark.parametrize("size", [(48, 64), (80, 32), (16, 16)])
def test_dynamic_img_size_dtl_plus(size):
    model = create_model(
        VIT, method="dtl+", num_classes=3, conv_kernel=3, dynamic_img_size=True, **SMALL_VIT
    )
    _randomize_side(model)
    images = _images(2, 3, *size)
    assert model.patch_grid(images) == (size[0] // 16, size[1] // 16)
    out = model(images)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    conv = model.csn.convs["0"]
    assert conv.grad is not None and conv.grad.abs().sum() > 0


@pytest.mark.parametrize("patch,img", [(8, 32), (14, 28), (16, 48), (32, 64)])
@pytest.mark.parametrize("conv", [0, 4])
def test_patch_sizes(patch, img, conv):
    bb = timm.create_model(VIT, pretrained=False, patch_size=patch, img_size=img, depth=3)
    model = DTLViT(bb, conv_kernel=conv, adapt_from=2, num_classes=6)
    _randomize_side(model)
    images = _images(2, 3, img, img)
    side = img // patch
    assert model.patch_grid(images) == (side, side)
    out = model(images)
    assert out.shape == (2, 6)
    out.sum().backward()
    assert model.csn.up["0"].grad is not None


def test_float64_and_eval_determinism():
    model = DTLViT(_vit_backbone(drop_path_rate=0.2), conv_kernel=3, num_classes=3).double()
    _randomize_side(model)
    images = _images(2, 3, 32, 32).double()
    model.eval()
    with torch.no_grad():
        a, b = model(images), model(images)
    assert a.dtype == torch.float64 and torch.equal(a, b)
    # DropPath of the frozen backbone still runs in training mode (SPEC §1).
    model.train()
    with torch.no_grad():
        outs = [model(images) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert math.isfinite(outs[0].sum().item())


def _rewritten_adapter(src, dst, metadata_edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata_edit(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _without(field):
    def edit(meta):
        import json

        config = json.loads(meta["config"])
        config.pop(field)
        meta["config"] = json.dumps(config)

    return edit


def _set_config(field, value):
    def edit(meta):
        import json

        meta["config"] = json.dumps(dict(json.loads(meta["config"]), **{field: value}))

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (_without("method"), "config has no 'method'"),
        (_without("num_classes"), "config has no 'num_classes'"),
        (_set_config("method", "prompt"), "config 'method' is 'prompt', expected one of"),
        (_set_config("num_classes", "4"), "config 'num_classes' is '4'"),
        (_set_config("csn", {"rank": 2}), r"config 'csn\.tap_from' is None"),
        (lambda m: m.update(config="{not json"), "metadata 'config' is not JSON"),
        (lambda m: m.pop("backbone"), "metadata has no 'backbone'"),
        (lambda m: m.update(backbone_sha256="abc"), "'backbone_sha256' is not a sha256"),
        (lambda m: m.update(format="dtl_kernels.adapter/9"), "not a dtl_kernels adapter"),
    ],
)
def test_adapter_metadata_schema(tmp_path, edit, message):
    model = _vit_model()
    good = save_adapter(model, tmp_path / "good.safetensors")
    bad = _rewritten_adapter(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(dtl_kernels.AdapterError, match=message) as info:
        load_adapter(model, bad)
    assert "bad.safetensors" in str(info.value)
    with pytest.raises(ValueError, match=message):
        dtl_kernels.model_from_adapter(bad, _vit_backbone())


def test_adapter_backbone_fingerprint(tmp_path):
    torch.manual_seed(0)
    bb = _vit_backbone()
    model = _vit_model(copy.deepcopy(bb))
    _randomize_side(model)
    path = save_adapter(model, tmp_path / "a.safetensors")
    assert dtl_kernels.read_adapter(path)[1]["backbone_sha256"] == model.backbone_fingerprint()

    same = _vit_model(copy.deepcopy(bb).to(torch.bfloat16).float())  # a bf16 copy: same weights
    load_adapter(same, path)
    other = _vit_model(_vit_backbone())  # same architecture, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="trained on other backbone weights"):
        load_adapter(other, path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.warns(UserWarning, match="trained on other backbone weights"):
        load_adapter(other, path, backbone_mismatch="warn")
    assert torch.equal(other.head.weight, model.head.weight)

    old_format = _rewritten_adapter(path, tmp_path / "v1.safetensors", lambda m: m.update(
        format="dtl_kernels.adapter/1") or m.pop("backbone_sha256"))  # fmt: skip
    load_adapter(other, old_format)  # written before fingerprints: nothing to compare


def test_a_random_backbones_adapter_says_what_rebuilds_it(tmp_path):
    """An adapter trained on random backbone weights (pretrained "none") is refused by a
    model whose random weights differ -- a bf16 backbone's random init runs in bf16, so
    float32 with the same seed differs -- and the message says what rebuilds them."""
    kw = dict(num_classes=3, pretrained=False, img_size=32)
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", "dtl", backbone_dtype=torch.bfloat16, **kw)
    path = save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    load_adapter(create_model("vit_tiny_patch16_224", "dtl", backbone_dtype=torch.bfloat16,
                              **kw), path)  # fmt: skip
    torch.manual_seed(0)
    fp32 = create_model("vit_tiny_patch16_224", "dtl", **kw)
    with pytest.raises(ValueError, match="RANDOM backbone: only the same seed and backbone "):
        load_adapter(fp32, path)


def test_adapter_with_non_finite_values_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _vit_model()
    path = save_adapter(model, tmp_path / "inf.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["head.weight"][0, 0] = float("inf")
    save_file(tensors, str(path), metadata=meta)  # as another writer could
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['head\.weight'\]"):
        load_adapter(_vit_model(), path)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="cannot write adapter"):  # nor is one written here
        save_adapter(model, tmp_path / "again.safetensors")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int32, torch.float64])
def test_adapter_tensors_of_a_wrong_dtype_or_beyond_the_models_range_are_refused(tmp_path, dtype):
    """A complex head would lose its imaginary part, a bool / integer one pass for weights,
    a float64 value beyond float32's range become inf when loaded: each is refused by name
    and nothing is loaded."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_adapter(_vit_model(), tmp_path / "ok.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    w = tensors["head.weight"]
    tensors["head.weight"] = (w * 1e300).to(dtype) if dtype == torch.float64 else w.to(dtype)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    model = _vit_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = "NaN or infinite values in \\['head" if dtype == torch.float64 else "non-float dtype"
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_block_count_of_a_stacked_big_vision_npz_is_read_from_array_headers(tmp_path):
    from dtl_kernels.models.npz_weights import _array_shapes, _file_depth

    def depth(p):
        return _file_depth(p, _array_shapes(p))

    stacked = "params/img/Transformer/encoderblock/"
    np.savez(tmp_path / "a.npz", **{stacked + "LayerNorm_0/scale": np.ones((4, 8)),
                                   stacked + "MlpBlock_0/bias": np.ones((4, 16))})  # fmt: skip
    assert depth(tmp_path / "a.npz") == 4
    np.savez(tmp_path / "b.npz", **{stacked + "LayerNorm_0/scale": np.ones((4, 8)),
                                   stacked + "LayerNorm_1/scale": np.ones((5, 8))})  # fmt: skip
    with pytest.raises(ValueError, match="disagree on the block count"):
        depth(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", **{"embedding/kernel": np.ones((2, 2, 3, 8))})
    assert depth(tmp_path / "c.npz") is None


def test_the_npz_patch_kernel_bound_takes_conv_and_naflex_dense_kernels():
    from dtl_kernels.models.npz_weights import _kernel_too_big

    assert not _kernel_too_big((16, 16, 3, 192)) and _kernel_too_big((128, 128, 3, 1))
    assert not _kernel_too_big((16 * 16 * 3, 192)) and _kernel_too_big((128 * 128 * 3, 8))
    assert _kernel_too_big((3,))
