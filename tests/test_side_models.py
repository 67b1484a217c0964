"""DTLViT / DTLSwin on the fused CPU side op: same results as the reference backend, in
eager mode and under ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import copy

import pytest
import torch

from dtl_kernels import create_model
from dtl_kernels.ops import compiled_side

pytestmark = pytest.mark.skipif(
    not compiled_side.available("cpu"), reason="the CPU extension is not built (make build)"
)


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    monkeypatch.delenv("DTL_KERNELS_BACKEND", raising=False)
    torch.manual_seed(0)


def small_vit(method="dtl+", **kw):
    kw.setdefault("adapt_from", 2)
    return create_model(
        "vit_tiny_patch16_224", method=method, num_classes=5, img_size=64, depth=3, **kw
    )


def small_swin(method="dtl+", **kw):
    return create_model(
        "swin_tiny_patch4_window7_224",
        method=method,
        num_classes=5,
        img_size=64,
        window_size=4,
        depths=(1, 1, 1, 1),
        embed_dim=24,
        num_heads=(1, 1, 2, 2),
        **kw,
    )


def randomise_side(model):
    """Published init has B = 0 (the side network adds nothing); make it matter."""
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.05)
    return model


def loss_and_grads(model, images, owner=None):
    owner = model if owner is None else owner  # a compiled model shares owner's parameters
    owner.zero_grad(set_to_none=True)
    out = model(images)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in owner.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("build", [small_vit, small_swin], ids=["vit", "swin"])
@pytest.mark.parametrize("method", ["dtl", "dtl+"])
def test_fused_by_default_and_equal_to_reference(build, method):
    model = randomise_side(build(method)).eval()
    ref = copy.deepcopy(model)
    ref.csn.backend = "reference"
    state, first = model.csn.start(), model.csn.config.tap_from - 1
    model.csn.tap(state, first, torch.zeros(1, 2, model.csn.block_widths[first]))
    assert model.csn.backend == "auto" and state.backend == "cpu"  # chosen at the first tap
    images = torch.randn(2, 3, 64, 64)
    assert_same(loss_and_grads(model, images), loss_and_grads(ref, images))


# Inductor on the ViT; Dynamo + AOTAutograd (fake kernels, registered autograd) without
# Inductor's code generation on the Swin, which would take minutes on two cores.
@pytest.mark.parametrize(
    "build,backend", [(small_vit, "inductor"), (small_swin, "aot_eager")], ids=["vit", "swin"]
)
def test_compile_fullgraph_matches_eager(build, backend):
    model = randomise_side(build("dtl+")).eval()
    images = torch.randn(2, 3, 64, 64)
    eager = loss_and_grads(model, images)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    assert_same(loss_and_grads(compiled, images, owner=model), eager)
