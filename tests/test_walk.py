"""The block walk's plain path (features are tokens) and what the CSN keeps between passes."""

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dtl_kernels import csn as csn_module
from dtl_kernels.models import walk
from dtl_kernels.models.swin import DTLSwin
from dtl_kernels.models.vit import DTLEva, DTLViT


def _vit(conv_kernel: int = 0, adapt_from: int = 3) -> DTLViT:
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_base_patch16_224", img_size=32, embed_dim=32, depth=5, num_heads=2, num_classes=0
    )
    model = DTLViT(backbone, adapt_from=adapt_from, conv_kernel=conv_kernel, num_classes=3)
    for up in model.csn.up.values():
        torch.nn.init.normal_(up, std=0.5)
    model.csn.backend = "cpu"
    return model


def test_which_wrappers_take_the_plain_walk():
    def bare(cls):  # an instance without __init__: the check reads the class and __dict__
        return cls.__new__(cls)

    assert walk._plain_walk(bare(DTLViT))
    assert not walk._plain_walk(bare(DTLEva))  # its call_block passes the rotary embedding
    assert not walk._plain_walk(bare(DTLSwin))  # tokens are not its features

    class Overrides(DTLViT):
        def call_block(self, block, i, x, ctx):
            return block(x)

    assert not walk._plain_walk(bare(Overrides))

    class OwnTokens(DTLViT):
        def tokens(self, x, ctx):
            return x * 1, ctx["grid"], self.num_prefix

    assert not walk._plain_walk(bare(OwnTokens))


def test_an_instance_s_own_call_block_is_called():
    model = _vit()
    calls = []
    plain = model.call_block

    def call_block(block, i, x, ctx):
        calls.append(i)
        return plain(block, i, x, ctx)

    model.call_block = call_block
    model(torch.randn(1, 3, 32, 32))
    assert calls == list(range(5))


@pytest.mark.parametrize("conv_kernel", [0, 3])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_the_plain_walk_equals_the_general_walk(monkeypatch, conv_kernel, backend):
    model = _vit(conv_kernel).double()
    model.csn.backend = backend
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.trainable_parameters()]

    plain, plain_grads = run()
    monkeypatch.setitem(walk._PLAIN, DTLViT, False)
    general, general_grads = run()
    torch.testing.assert_close(plain, general, rtol=0, atol=0)
    for a, b in zip(plain_grads, general_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kept_zeros_are_never_written(monkeypatch):
    """The stage's zero taps are kept between passes; flushing pending taps (inference with
    more than PENDING_BYTES pending) copies them before writing."""
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        (zeros,) = model.csn._zeros.values()
        monkeypatch.setattr(csn_module, "PENDING_BYTES", 0)  # flush at every tap
        for _ in range(2):
            torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert list(model.csn._zeros.values()) == [zeros]  # the same kept tensor …
    assert not zeros.any()  # … still all zeros
    model.csn.backend = "reference"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_nothing_is_kept_from_fake_or_transformed_passes():
    model = _vit()
    csn = model.csn
    with FakeTensorMode(allow_non_fake_inputs=True):  # the parameters stay real
        fake = torch.randn(2, 5, 32)
        zeros, _ = csn._stage_buffers(0, fake)
    assert type(zeros) is not torch.Tensor and not csn._zeros  # a fake tensor, not kept
    torch.func.vmap(lambda z: csn._stage_buffers(0, z)[0].sum())(torch.randn(4, 2, 5, 32))
    assert not csn._zeros
    zeros, _ = csn._stage_buffers(0, torch.randn(2, 5, 32))
    assert list(csn._zeros.values()) == [zeros]


def test_nothing_is_kept_under_a_dispatch_mode():
    """A mode that watches (an operation counter) sees the zeros made at every pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    csn = _vit().csn
    for _ in range(2):
        with Names() as spy:
            csn._stage_buffers(0, torch.randn(2, 5, 32))
        assert "aten.new_zeros" in spy.names
    assert not csn._zeros


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_nothing_is_kept_from_a_cuda_graph_capture():
    """Kernels captured into a CUDA graph do not run: zeros made there are never filled."""
    csn = _vit().cuda().csn
    z = torch.randn(2, 5, 32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            csn._stage_buffers(0, z)
    torch.cuda.synchronize()
    assert not csn._zeros
    zeros, _ = csn._stage_buffers(0, z)  # an eager pass keeps real zeros
    assert list(csn._zeros.values()) == [zeros] and not zeros.any()
