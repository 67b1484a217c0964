"""method="lora": PEFT LoRA in the frozen backbone, the baseline DTL is compared with."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from dtl_kernels import create_model, model_from_adapter, save_adapter  # noqa: E402

TINY = dict(num_classes=3, img_size=32, depth=2)


def tiny(method, seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16_224", method=method, **TINY, **kw)


def test_only_low_rank_factors_and_head_train():
    m = tiny("lora")
    assert m.method == "lora" and m.lora == {"rank": 8, "targets": ["qkv"]}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    factors = {
        f"backbone.blocks.{i}.attn.qkv.lora_{x}.default.weight" for i in (0, 1) for x in "AB"
    }
    assert trainable == factors | {"head.weight", "head.bias"}
    a = m.backbone.blocks[0].attn.qkv.lora_A.default.weight
    assert a.shape == (8, 192) and m.backbone.blocks[0].attn.qkv.lora_B.default.weight.shape == (
        3 * 192,
        8,
    )
    assert tiny("lora", lora_rank=4).lora["rank"] == 4


def test_starts_as_the_pretrained_model_and_trains_only_its_factors():
    """B = 0 at the start: the same output as the linear probe on the same weights; one
    step moves the factors and the head, never the frozen weights."""
    lora, linear = tiny("lora"), tiny("linear")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(lora.eval()(x), linear.eval()(x), rtol=0, atol=0)
    frozen = {n: p.clone() for n, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora.train()(x).logsumexp(-1).sum().backward()
    opt.step()
    assert lora.backbone.blocks[1].attn.qkv.lora_B.default.weight.abs().sum() > 0
    for n, p in lora.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_adapter_round_trip(tmp_path):
    m = tiny("lora")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    path = save_adapter(m, tmp_path / "lora.safetensors")
    backbone = tiny("linear").backbone  # the same weights (same seed), no LoRA yet
    again = model_from_adapter(path, backbone)
    assert again.method == "lora" and again.lora == m.lora
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), m.eval()(x), rtol=0, atol=0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="lora_rank is an option of method='lora'"):
        tiny("dtl", lora_rank=4)
    with pytest.raises(ValueError, match="lora_rank must be a positive int"):
        tiny("lora", lora_rank=0)
    with pytest.raises(ValueError, match="has no nn.Linear named"):
        create_model("tf_efficientnet_lite0", method="lora", num_classes=3)


@pytest.mark.parametrize(
    "name, kw",
    [("swinv2_tiny_window8_256", dict(img_size=64, window_size=4)), ("eva02_tiny_patch14_224", {})],
)
def test_backbones_that_bypass_their_linear_layers_are_refused(name, kw):
    """Swin V2 and EVA-02 use their qkv layer's weight directly (adding q / v biases):
    PEFT's LoRA there would never run, so never train. That must be an error, not a
    silently frozen model."""
    with pytest.raises(ValueError, match="bypasses the forward of 12 of its 12 LoRA layers"):
        create_model(name, method="lora", num_classes=3, **kw)
