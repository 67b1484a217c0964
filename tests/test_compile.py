"""The whole model under ``torch.compile(fullgraph=True)``: one graph (no break) for the
training forward + backward and for inference, with the fused side op, equal to eager.

``aot_eager`` traces exactly what Inductor would (Dynamo + AOTAutograd, the ops' fake
kernels, the C++ autograd of ``side_step``) without generating code, so most checks use it;
one check runs Inductor itself, on inference (its C++ compile is the slow part on a CPU).
``dtl-train --compile`` is checked for its wiring (the model it trains is compiled).
"""

from __future__ import annotations

import pytest
import timm
import torch
from toy_images import make_toy_folder

from dtl_kernels import DTLViT
from dtl_kernels.train import make_config, run


def _model(conv_kernel: int, depth: int = 4, adapt_from: int = 2) -> DTLViT:
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_base_patch16_224", img_size=32, embed_dim=32, num_heads=2, depth=depth, num_classes=0
    )
    model = DTLViT(backbone, conv_kernel=conv_kernel, adapt_from=adapt_from, num_classes=3)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.05)
    model.csn.backend = "cpu"
    return model


def _step(net, model, x):
    model.zero_grad(set_to_none=True)
    out = net(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.csn.parameters()]


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["dtl", "dtl+"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_step_compiles_to_one_graph(conv_kernel, autocast):
    torch._dynamo.reset()
    model = _model(conv_kernel)
    x = torch.randn(2, 3, 32, 32)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if autocast
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        eager = _step(model, model, x)
        compiled = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), model, x)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["efficientnet", "convnext"])
def test_cnn_training_step_in_channels_last_compiles_to_one_graph(family):
    """What ``dtl-train --compile`` runs on a CNN (channels_last, DTL+): one graph, equal to
    eager (which tests/test_convnet.py holds to SPEC's formulation)."""
    from test_convnet import tiny_cnn

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_cnn(family, num_classes=3, conv_kernel=3)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.5)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    eager = _step(model, model, x)
    compiled = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), model, x)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inference_compiles_with_inductor():
    torch._dynamo.reset()
    model = _model(3, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_inference_compiles_for_a_second_batch_size():
    """The evaluation's last, smaller batch recompiles with a dynamic batch size: every
    size the side network reads from its tensors must trace symbolically (``nbytes`` does
    not)."""
    torch._dynamo.reset()
    model = _model(0).eval()
    net = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for batch in (4, 3, 5):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-6)


def test_dtl_train_compile_trains_the_compiled_model(tmp_path, monkeypatch):
    torch._dynamo.reset()
    calls = []
    real = torch.compile

    def spy(module, **kwargs):  # aot_eager: the trainer's wiring, without Inductor's C++ build
        calls.append(type(module).__name__)
        return real(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    toy = make_toy_folder(tmp_path / "toy", 8, 4)
    summary = run(
        make_config(
            dict(model="vit_tiny_patch16_224", pretrained="none", method="dtl+",
                 dataset="folder", data_root=str(toy), img_size=32, epochs=1, batch_size=4,
                 lr=1e-2, output=str(tmp_path / "out"), progress=False, compile=True,
                 cache_trunk="off")
        )
    )  # fmt: skip
    assert calls == ["DTLViT", "DTLViT"]  # the training and the evaluation net
    assert summary["test_acc"] is not None
