"""A side-network parameter replaced by one of another shape is refused when it is
assigned, naming it: used as it is, it would shift the taps' columns and change the
answer without an error (the kernels would see consistent shapes)."""

from __future__ import annotations

import pytest
import timm
import torch

from dtl_kernels import DTLViT


def _model(conv_kernel: int) -> DTLViT:
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=0
    )
    return DTLViT(backbone, rank=2, adapt_from=2, conv_kernel=conv_kernel, num_classes=5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "group,key,shape",
    [("down", "0", (3, 192)), ("down", "3", (1, 192)), ("up", "2", (192, 3)),
     ("up", "1", (191, 2))],
    ids=["down-wider", "down-narrower", "up-wider", "up-shorter"],
)  # fmt: skip
def test_a_parameter_of_another_shape_is_refused_by_name(group, key, shape, train):
    model = _model(3).train(train)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match=f"csn.{group}.{key} must keep its shape"):
        getattr(model.csn, group)[key] = torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=f"csn.{group}.{key} must keep its shape"):
        setattr(getattr(model.csn, group), key, torch.nn.Parameter(torch.randn(shape)))
    with torch.no_grad():  # nothing was replaced
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_a_parameter_of_the_same_shape_replaced_is_used():
    """Replacing a parameter by one of its own shape stays allowed (and is used at once)."""
    model = _model(0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.csn.up["3"] = torch.nn.Parameter(torch.randn(192, 2))
        after = model(x)
    assert not torch.equal(before, after)
