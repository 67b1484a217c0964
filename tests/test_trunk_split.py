"""trunk_forward + forward_from_trunk equal forward (the basis of trunk caching)."""

import pytest
import torch

from dtl_kernels import create_model

CASES = [
    ("vit_tiny_patch16_224", dict(img_size=64), "dtl"),
    ("vit_tiny_patch16_224", dict(img_size=64), "dtl+"),
    ("vit_tiny_patch16_224", dict(img_size=64), "dtl+*"),
    ("vit_tiny_patch16_224", dict(img_size=64), "linear"),
    ("swin_tiny_patch4_window7_224", dict(img_size=112, drop_path_rate=0.0), "dtl+"),
    ("swin_tiny_patch4_window7_224", dict(img_size=112, drop_path_rate=0.0), "dtl"),
    # EfficientNet: block M (first of a stage) changes shape, so it gets no add-back.
    ("tf_efficientnet_lite0", dict(img_size=64), "dtl+"),
    # the other families: rotary embeddings per block, Swin V2, staged CNNs
    ("eva02_tiny_patch14_224", dict(img_size=56), "dtl+"),
    ("swinv2_tiny_window8_256", dict(img_size=64, window_size=2), "dtl+"),
    ("resnet18", dict(img_size=64), "dtl+"),
    ("convnext_atto", dict(img_size=64), "dtl"),
]
CNN = ("tf_", "resnet", "convnext")  # timm takes no img_size for these


@pytest.mark.parametrize("name,kwargs,method", CASES)
def test_split_walk_equals_forward(name, kwargs, method):
    kwargs = dict(kwargs)
    size = kwargs.pop("img_size") if name.startswith(CNN) else kwargs["img_size"]
    model = create_model(name, method=method, num_classes=3, **kwargs).double().eval()
    if model.csn is not None:
        for up in model.csn.up.values():
            torch.nn.init.normal_(up, std=0.5)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    expected = model(x)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()

    inputs, y, ctx = model.trunk_forward(x)
    assert all(not z.requires_grad for z in inputs) and not y.requires_grad
    got = model.forward_from_trunk(inputs, y, ctx)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for g, p in zip(grads, model.trainable_parameters(), strict=False):
        torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-12)


def test_wrong_number_of_trunk_inputs():
    model = create_model("vit_tiny_patch16_224", method="dtl", num_classes=3, img_size=32)
    inputs, y, ctx = model.trunk_forward(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="trunk tap inputs"):
        model.forward_from_trunk(inputs[:-1], y, ctx)
