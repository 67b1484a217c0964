"""Memory options of DTLViT / DTLSwin: ``trunk_dtype`` and ``checkpoint_tail``.

Both must leave the forward unchanged and the gradients equal to the reference backend's
within what their precision implies: exact recomputation for ``checkpoint_tail``;
bfloat16-rounded trunk inputs (``∂A_i`` of trunk blocks only) for ``trunk_dtype``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import SWIN, TINY_SWIN

from dtl_kernels import create_model
from dtl_kernels.ops import side


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    monkeypatch.delenv("DTL_KERNELS_BACKEND", raising=False)
    torch.manual_seed(0)


def build(family, **opts):
    if family == "vit":
        return create_model(
            "vit_tiny_patch16_224",
            method="dtl+",
            num_classes=5,
            img_size=64,
            depth=4,
            adapt_from=2,
            **opts,
        )
    return create_model(SWIN, method="dtl+", num_classes=5, **TINY_SWIN, **opts)


def run(model, images):
    model.zero_grad(set_to_none=True)
    out = model(images)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def saved_bytes(model, images):
    """Bytes autograd saves for backward (by storage, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum().backward()
    return sum(seen.values())


@pytest.fixture(scope="module", params=["vit", "swin"])
def family(request):
    return request.param


@pytest.fixture
def reference_run(family):
    torch.manual_seed(0)
    model = build(family)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.05)
    model.train()
    ref = build(family)
    ref.load_state_dict(model.state_dict())
    ref.csn.backend = "reference"
    images = torch.randn(2, 3, 64, 64)
    return model.state_dict(), images, run(ref, images)


def test_checkpoint_tail_is_exact(family, reference_run):
    state, images, (ref_out, ref_grads) = reference_run
    model = build(family, checkpoint_tail=True)
    assert model._tail and set(model.state_dict()) == set(state)
    model.load_state_dict(state)
    out, grads = run(model, images)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_trunk_dtype_bfloat16(family, reference_run):
    state, images, (ref_out, ref_grads) = reference_run
    model = build(family, trunk_dtype=torch.bfloat16)
    model.load_state_dict(state)
    out, grads = run(model, images)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)  # forward untouched
    cfg = model.csn.config
    for name in grads:
        g, r = grads[name], ref_grads[name]
        i = int(name.rsplit(".", 1)[1]) if name.startswith("csn.down.") else None
        if i is not None and i < cfg.adapt_from:  # inputs of blocks ≤ M need no grad
            # ∂A_i = (∂t_i)ᵀ z_i with z_i rounded to bfloat16 (8 mantissa bits): a relative
            # error of a few 2⁻⁹ per element, far less after the sum over rows.
            err = (g - r).norm() / r.norm()
            assert err < 2**-7, f"{name}: relative error {err:.2e}"
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_options_save_memory(family):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    plain = saved_bytes(build(family), images)
    assert saved_bytes(build(family, checkpoint_tail=True), images) < plain
    assert saved_bytes(build(family, trunk_dtype="bfloat16"), images) < plain


def test_trunk_dtype_applies_on_the_python_step_too(family, monkeypatch):
    """A backend without the one-call step (``side.has_step`` false: an install without
    the CPU extension's step, or shapes a kernel does not take) runs the step as separate
    calls; ``trunk_dtype`` keeps the trunk taps' inputs in bf16 there too (it was ignored:
    the same bytes saved as without it)."""
    monkeypatch.setattr(side, "has_step", lambda name: False)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    plain = saved_bytes(build(family), images)
    assert saved_bytes(build(family, trunk_dtype="bfloat16"), images) < plain


def test_bad_trunk_dtype():
    with pytest.raises(TypeError, match="trunk_dtype"):
        build("vit", trunk_dtype=torch.int8)
    with pytest.raises(ValueError, match="trunk_dtype"):
        build("vit", trunk_dtype="bfloat17")


@pytest.mark.parametrize("option", [{"checkpoint_tail": True}, {"trunk_dtype": torch.bfloat16}])
def test_memory_options_of_transformers_only_are_named_on_a_cnn(option):
    """A CNN's wrapper has no per-block memory options: the option is named (a
    ``TypeError`` from the constructor before), also for a shapes-only build."""
    with pytest.raises(ValueError, match=f"{next(iter(option))} is not an option of DTLConvNet"):
        create_model("tf_efficientnet_lite0", num_classes=3, device="meta", **option)
    off = {next(iter(option)): None}  # left off: nothing to refuse
    assert create_model("tf_efficientnet_lite0", num_classes=3, device="meta", **off) is not None


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_trunk_dtype_makes_no_copy_without_autograd(backend):
    """Inference (no_grad) never saves z, so no low-precision copy of it is made; a training
    forward makes one per trunk tap (counted as dispatched bfloat16 conversions)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dtl_kernels import create_model

    class CountBf16Copies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = args[0] if args else None
            if (
                isinstance(out, torch.Tensor)
                and out.dtype == torch.bfloat16
                and isinstance(src, torch.Tensor)
                and src.dtype == torch.float32
            ):
                self.copies += 1  # an fp32 → bf16 conversion (what the option saves)
            return out

    model = create_model(
        "vit_tiny_patch16_224",
        method="dtl",
        num_classes=3,
        img_size=32,
        trunk_dtype=torch.bfloat16,
    ).eval()
    model.csn.backend = backend
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), CountBf16Copies() as no_grad:
        model(x)
    with CountBf16Copies() as training:
        model(x)
    assert no_grad.copies == 0
    assert training.copies == model.csn.config.adapt_from  # the taps of blocks 1 … M
    assert model.csn.backend == backend


# -- backbone_dtype: frozen weights in low precision ------------------------------------
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_backbone_dtype_bf16_matches_fp32_within_bf16(family):
    torch.manual_seed(0)
    ref = build(family).eval()
    with torch.no_grad():
        for p in ref.csn.up.values():
            p.normal_(0, 0.05)
    torch.manual_seed(0)
    low = build(family, backbone_dtype=torch.bfloat16).eval()
    low.load_state_dict({k: v.to(low.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    images = torch.randn(2, 3, 64, 64)
    out_ref, g_ref = run(ref, images)
    out_low, g_low = run(low, images)
    assert out_low.dtype == torch.float32  # the head is float32
    scale = out_ref.abs().max().item()
    assert (out_low - out_ref).abs().max().item() <= 3e-2 * scale
    for name, g in g_ref.items():  # every trainable gradient, float32, within bf16 rounding
        assert g_low[name].dtype == torch.float32, name
        rel = ((g_low[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 6e-2, f"{name}: relative error {rel:.3g}"
    frozen = [p for p in low.backbone.parameters() if not p.requires_grad]
    trainable = low.trainable_parameters()
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_backbone_dtype_halves_the_frozen_weights_and_refuses_full():
    fp32 = build("vit")
    bf16 = build("vit", backbone_dtype="bfloat16")

    def frozen_bytes(m):
        return sum(
            p.numel() * p.element_size() for p in m.backbone.parameters() if not p.requires_grad
        )

    assert frozen_bytes(bf16) * 2 == frozen_bytes(fp32)
    with pytest.raises(ValueError, match="trains every backbone weight"):
        create_model(
            "vit_tiny_patch16_224",
            method="full",
            num_classes=5,
            img_size=64,
            depth=2,
            backbone_dtype=torch.bfloat16,
        )
    with pytest.raises((TypeError, ValueError)):
        build("vit", backbone_dtype="int8")
