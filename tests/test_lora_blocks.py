"""``lora_blocks``: PEFT LoRA on the attention projections of blocks M … N only (the
memory-matched LoRA baseline): PEFT's own forward there, nothing trainable and no backward
in the blocks before M, recorded in adapters, refused when out of range."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

import peft  # noqa: E402

from dtl_kernels import (  # noqa: E402
    AdapterError,
    create_model,
    load_adapter,
    model_from_adapter,
    save_adapter,
)
from dtl_kernels.train import make_config  # noqa: E402
from dtl_kernels.train import setup as train_setup  # noqa: E402

TINY = dict(num_classes=3, img_size=32, depth=12, embed_dim=48, num_heads=3)
TAIL = (7, 12)  # 1-based, inclusive: 0-based blocks 6 … 11


def tiny(method="lora", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16_224", method=method, **TINY, **kw)


def randomise_factors(model, seed=1):
    """B = 0 at the start would make every LoRA model equal the frozen one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_trainable_parameters_only_in_those_blocks():
    m = tiny(lora_blocks=TAIL)
    assert m.lora == {"rank": 8, "targets": ["qkv"], "blocks": [7, 12]}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    factors = {f"backbone.blocks.{i}.attn.qkv.lora_{x}.default.weight"
               for i in range(6, 12) for x in "AB"}  # fmt: skip
    assert trainable == factors | {"head.weight", "head.bias"}
    everywhere = tiny()
    assert m.num_parameters(True) < everywhere.num_parameters(True)
    assert sum(".lora_" in n for n, _ in everywhere.named_parameters()) == 24
    assert "LoRA r=8 on qkv of blocks 7-12" in m.summary()
    assert "LoRA r=8 on qkv of all blocks" in everywhere.summary()


def test_output_equals_peft_with_the_same_restricted_targets():
    """The reference: PEFT itself, given a regex for blocks 6 … 11 (0-based) on a copy of
    the same backbone, with our factors copied in."""
    ours = tiny(lora_blocks="7-12")
    randomise_factors(ours)
    ref = tiny("linear")  # the same weights (same seed), no LoRA yet
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=r"blocks\.([6-9]|1[01])\.attn\.qkv")
    peft.inject_adapter_in_model(config, ref.backbone)
    lora_state = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert set(lora_state) == {k for k in ref.state_dict() if ".lora_" in k}
    ref.load_state_dict(lora_state, strict=False)
    ref.head.load_state_dict(ours.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=0)
    assert not torch.allclose(ours(x), tiny("linear").eval()(x))  # the factors act


def test_gradients_reach_only_those_blocks_and_backward_skips_the_first_six():
    m = tiny(lora_blocks=TAIL)
    randomise_factors(m)
    outputs = {}
    for i in (5, 6):  # block 6 and block 7 (1-based)
        m.backbone.blocks[i].register_forward_hook(
            lambda mod, inp, out, i=i: outputs.__setitem__(i, out)
        )
    m.train()(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    # blocks 1-6 hold nothing that requires grad, so autograd records nothing there
    assert not outputs[5].requires_grad and outputs[5].grad_fn is None
    assert outputs[6].requires_grad
    for i in range(6):
        assert not any(p.requires_grad for p in m.backbone.blocks[i].parameters()), i
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith("head.") or int(n.split(".")[2]) >= 6 for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n in with_grad)


def test_adapter_round_trip(tmp_path):
    m = tiny(lora_blocks=TAIL)
    randomise_factors(m)
    path = save_adapter(m, tmp_path / "tail.safetensors")
    again = model_from_adapter(path, tiny("linear").backbone)
    assert again.lora == m.lora and again.lora["blocks"] == [7, 12]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), m.eval()(x), rtol=0, atol=0)
    with pytest.raises(AdapterError, match="lora"):  # an all-blocks model is another model
        load_adapter(tiny(), path)


@pytest.mark.parametrize(
    "blocks, message",
    [
        ((7, 13), r"lora_blocks 7-13 is outside the backbone's 12 blocks \(1-12\)"),
        ("0-3", r"need 1 ≤ M ≤ N"),
        ((8, 7), r"need 1 ≤ M ≤ N"),
        ("7-", r"lora_blocks must be M-N"),
        ((7.0, 12), r"lora_blocks must be M-N"),
    ],
)
def test_bad_ranges_are_refused(blocks, message):
    with pytest.raises(ValueError, match=message):
        tiny(lora_blocks=blocks)


def test_only_for_lora():
    with pytest.raises(ValueError, match="lora_blocks is an option of method='lora'"):
        tiny("dtl", lora_blocks=TAIL)


def test_config_option_is_checked_before_any_work_and_reaches_the_model():
    cfg = make_config(dict(method="lora", lora_blocks=" 7 - 12 ", model="vit_tiny_patch16_224"))
    assert cfg.lora_blocks == "7-12"  # the spelling run folders compare (accuracy_runs.Run)
    with pytest.raises(ValueError, match="--lora-blocks 9-2: need 1 ≤ M ≤ N"):
        make_config(dict(method="lora", lora_blocks="9-2"))
    with pytest.raises(ValueError, match="--lora-blocks must be M-N"):
        make_config(dict(method="lora", lora_blocks="tail"))
    with pytest.raises(ValueError, match="--lora-blocks is an option of --method lora"):
        make_config(dict(method="dtl", lora_blocks="7-12"))
    cfg = make_config(
        dict(method="lora", lora_blocks="11-12", model="vit_tiny_patch16_224", img_size=32)
    )
    model = train_setup.build_model(cfg, 3, False)
    assert model.lora["blocks"] == [11, 12]
    cfg = make_config(
        dict(method="lora", lora_blocks="7-14", model="vit_tiny_patch16_224", img_size=32)
    )
    with pytest.raises(ValueError, match="outside the backbone's 12 blocks"):
        train_setup.build_model(cfg, 3, False)
