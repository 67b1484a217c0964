"""DTL / DTL+ around Hugging Face vision encoders (ViT, DINOv2 with and without registers,
CLIP, SigLIP): the published method written out from SPEC §1 against each model's own
layers, in float64, forward and every gradient; the heads, the trunk split, multi-task
serving and adapter files. Tiny random configs: no download."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_fidelity import _images, check_against_reference, side_backend  # noqa: F401

transformers = pytest.importorskip("transformers")

from dtl_kernels import DTLHFViT, create_model, model_from_adapter, save_adapter  # noqa: E402
from dtl_kernels.models.multitask import MultiTaskDTL  # noqa: E402

TINY = dict(hidden_size=24, num_hidden_layers=4, num_attention_heads=2, image_size=32,
            patch_size=8)  # fmt: skip
FAMILIES = ["vit", "dinov2", "dinov2-reg", "clip", "siglip"]


def tiny(family: str) -> torch.nn.Module:
    """A random tiny encoder of ``family`` in float64, eval mode."""
    t = transformers
    torch.manual_seed(0)
    if family == "vit":
        bb = t.ViTModel(t.ViTConfig(intermediate_size=48, **TINY), add_pooling_layer=False)
    elif family == "dinov2":
        bb = t.Dinov2Model(t.Dinov2Config(mlp_ratio=2, **TINY))
    elif family == "dinov2-reg":
        bb = t.Dinov2WithRegistersModel(
            t.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **TINY)
        )
    elif family == "clip":
        bb = t.CLIPVisionModel(t.CLIPVisionConfig(intermediate_size=48, **TINY))
    else:
        bb = t.SiglipVisionModel(t.SiglipVisionConfig(intermediate_size=48, **TINY))
    return bb.double().eval()


def _parts(bb, family):
    """The model's own embedding, pre-norm, layers and final norm, looked up by hand."""
    inner = getattr(bb, "vision_model", bb)
    layers = getattr(inner, "layers", None) or getattr(inner.encoder, "layer", None)
    layers = layers if layers is not None else inner.encoder.layers
    pre = inner.pre_layrnorm if family == "clip" else (lambda x: x)
    norm = inner.layernorm if family in ("vit", "dinov2", "dinov2-reg") else inner.post_layernorm
    return inner.embeddings, pre, list(layers), norm


def ref_hf_logits(bb, images, params, *, family, adapt_from, conv, beta=100.0):
    """DTL / DTL+ from the spec: h_i = Σ_{j ≤ i} z_j A_jᵀ B_jᵀ; after block i ≥ M,
    y + θ(h) on prefix tokens and y + g(θ(h)) on the patch grid; head: mean of the patch
    tokens → final norm → Linear."""
    emb, pre, layers, norm = _parts(bb, family)
    # the model's own position-embedding interpolation (DINOv2 always interpolates)
    z = pre(
        emb(images) if family.startswith("dinov2") else emb(images, interpolate_pos_encoding=True)
    )
    prefix = {"siglip": 0, "dinov2-reg": 3}.get(family, 1)
    grid = (images.shape[-2] // 8, images.shape[-1] // 8)
    batch, tokens, dim = z.shape
    assert tokens == prefix + grid[0] * grid[1]
    h = None
    for i, layer in enumerate(layers, start=1):
        a, b = params[f"lora_dict.{i - 1}.lora_A"], params[f"lora_dict.{i - 1}.lora_B"]
        term = (z @ a.t()) @ b.t()
        h = term if h is None else h + term
        out = layer(z, None)
        out = out[0] if isinstance(out, tuple) else out
        if i >= adapt_from:
            side = h * torch.sigmoid(beta * h)
            if conv:
                img = side[:, prefix:].transpose(1, 2).reshape(batch, dim, *grid)
                w = params["lora_fusion.weight"]
                mixed = F.conv2d(img, w, padding="same", groups=dim)
                mixed = mixed.reshape(batch, dim, -1).transpose(1, 2)
                side = torch.cat([side[:, :prefix], mixed], dim=1)
            out = out + side
        z = out
    pooled = norm(z[:, prefix:].mean(dim=1))
    return F.linear(pooled, params["head.weight"], params["head.bias"])


@pytest.mark.parametrize("conv_kernel,adapt_from", [(0, 3), (3, 1), (4, 2)])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_spec(family, conv_kernel, adapt_from, side_backend):  # noqa: F811
    bb_ref = tiny(family)
    model = DTLHFViT(copy.deepcopy(bb_ref), num_classes=5, adapt_from=adapt_from,
                     conv_kernel=conv_kernel).double().eval()  # fmt: skip
    images = _images((2, 3, 32, 40))  # a 4×5 grid, not the configured 32×32
    check_against_reference(
        model, ref_hf_logits, bb_ref, images,
        dict(family=family, adapt_from=adapt_from, conv=conv_kernel > 0),
    )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_head_is_the_models_own_pooling(family):
    """head="backbone": at initialisation (B = 0, so the side network adds θ(0) = 0) the
    logits are the new Linear on the pooled output of the model's own forward."""
    bb = tiny(family)
    model = create_model(bb, "dtl+", num_classes=4, head="backbone").double().eval()
    x = _images((2, 3, 32, 32))
    with torch.no_grad():
        out = bb(pixel_values=x)
        pooled = out.last_hidden_state[:, 0] if family == "vit" else out.pooler_output
        torch.testing.assert_close(model(x), model.head(pooled), rtol=1e-10, atol=1e-12)
    trained = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
               if p.requires_grad}  # fmt: skip
    own = {"backbone.head"} if family == "siglip" else set()  # SigLIP's attention pooling
    assert trained == {"csn.down", "csn.up", "csn.convs", "head.weight", "head.bias"} | own


@pytest.mark.parametrize("family", ["dinov2-reg", "siglip"])
def test_trunk_split_and_multitask_serving(family, tmp_path):
    bb = tiny(family)
    tasks = {}
    for t, (m, k) in enumerate([(2, 0), (3, 3), (1, 5)]):
        task = DTLHFViT(bb, num_classes=3 + t, adapt_from=m, conv_kernel=k).double().eval()
        for p in task.csn.up.values():
            torch.nn.init.normal_(p, std=0.5)
        tasks[f"t{t}"] = task
    x = _images((2, 3, 32, 32))
    with torch.no_grad():
        for task in tasks.values():
            torch.testing.assert_close(task.forward_from_trunk(*task.trunk_forward(x)), task(x))
        served = MultiTaskDTL(bb, tasks).eval()(x)
        for name, task in tasks.items():
            torch.testing.assert_close(served[name], task(x), rtol=1e-10, atol=1e-12)
    path = save_adapter(tasks["t1"], tmp_path / "t1.safetensors")
    again = model_from_adapter(path, bb).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), tasks["t1"](x), rtol=0, atol=0)


def test_clear_errors():
    bb = tiny("vit")
    with pytest.raises(ValueError, match="num_classes"):
        create_model(bb, "dtl")
    with pytest.raises(ValueError, match="multiple of the patch"):
        create_model(bb, "dtl", num_classes=2)(torch.randn(1, 3, 30, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="1 channels, the model takes 3"):
        create_model(bb, "dtl", num_classes=2)(torch.randn(1, 1, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="no timm options"):
        create_model(bb, "dtl", num_classes=2, img_size=64)
    t = transformers
    other = t.BeitModel(t.BeitConfig(**TINY, intermediate_size=48))
    with pytest.raises(TypeError, match="SiglipVisionModel"):
        create_model(other, "dtl", num_classes=2)


@pytest.mark.parametrize("family", ["vit", "siglip"])
def test_lora_baseline(family):
    """method="lora" adapts the attention projections (PEFT): only its factors and the
    head train, and every factor gets a gradient."""
    model = create_model(tiny(family), "lora", num_classes=3).double()
    assert model.lora["targets"] == ["k_proj", "q_proj", "v_proj"]
    model(_images((2, 3, 32, 32))).sum().backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n or n.startswith("head.") for n, _ in trained)
    assert all(p.grad is not None for n, p in trained if ".lora_B" in n)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_memory_options(family):
    """checkpoint_tail and trunk_dtype change what is kept for backward, not the result."""
    x = _images((2, 3, 32, 32))
    grads = []
    for options in ({}, {"checkpoint_tail": True}, {"trunk_dtype": torch.float32}):
        torch.manual_seed(0)
        model = create_model(tiny(family), "dtl+", num_classes=3, adapt_from=2, **options)
        model = model.double()
        for p in model.csn.up.values():
            torch.nn.init.normal_(p, std=0.5)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    for a, b in zip(grads[0], grads[1], strict=True):  # recomputed: the same float64 values
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[0], grads[2], strict=True):  # z for ∂A rounded to float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
