"""The one-call add-back step (``dtl_kernels::side_step``, ``write_taps_``) on the CPU: values
and float64 gradients against the reference formulation, its checks, and the host-overhead
contract of the side network: a constant number of dispatched operations per add-back,
forward and backward, whatever the block (no growing concatenation).
"""

from __future__ import annotations

import pytest
import timm
import torch
from tiny_models import SWIN
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dtl_kernels import DTLViT, create_model
from dtl_kernels import csn as csn_module
from dtl_kernels.ops import reference, step

DT = torch.float64


def _step_inputs(conv: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, d, k_cols = 2, 7, 6, 8
    y = torch.randn(b, n, d, dtype=DT, generator=g)
    taps = torch.zeros(b, n, k_cols, dtype=DT)
    taps[..., :2] = torch.randn(b, n, 2, dtype=DT, generator=g)
    zs = [torch.randn(b, n, d, dtype=DT, generator=g) for _ in range(2)]
    downs = [0.5 * torch.randn(2, d, dtype=DT, generator=g) for _ in range(2)]
    ups = 0.5 * torch.randn(d, k_cols, dtype=DT, generator=g)
    w = torch.randn(d, 1, 3, 3, dtype=DT, generator=g) if conv else None
    return y, taps, zs, downs, ups, w


def _spec(y, taps, zs, downs, ups, w):
    """The step written with the reference ops: taps of zs into columns 2…5, then side_add."""
    new = [reference.tap(z, a) for z, a in zip(zs, downs, strict=True)]
    full = torch.cat([taps[..., :2], *new, taps[..., 6:]], dim=-1)
    grid = (2, 3) if w is not None else None
    return reference.side_add(y, full, ups, 3.0, w, grid, 1 if w is not None else 0), full


@pytest.mark.parametrize("conv", [False, True], ids=["dtl", "dtl+"])
def test_step_equals_spec_and_gradcheck(conv):
    y, taps, zs, downs, ups, w = _step_inputs(conv)
    grid, prefix = ((2, 3), 1) if conv else (None, 0)

    def ours(y, taps, z0, z1, a0, a1, ups, *w):
        return step.side_step(y, taps, [z0, z1], [a0, a1], 2, ups, w[0] if w else None, grid,
                              prefix, 3.0, "cpu")  # fmt: skip

    args = [y, taps, *zs, *downs, ups] + ([w] if conv else [])
    out, new_taps = ours(*args)
    want_out, want_taps = _spec(y, taps, zs, downs, ups, w)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_taps, want_taps, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_() for t in args]
    assert torch.autograd.gradcheck(ours, leaves)


def test_step_without_autograd_and_in_inference_mode():
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    want, _ = _spec(y, taps, zs, downs, ups, None)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out, _ = step.side_step(y, taps, zs, downs, 2, ups, None, None, 0, 3.0, "cpu")
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("conv", [False, True], ids=["dtl", "dtl+"])
def test_step_on_cuda_equals_spec_and_gradcheck(conv):
    """The step on CUDA tensors: the generic write_taps_ (in-place matmuls into the taps'
    columns) and the CUDA kernels, float64 values and gradients against the reference."""
    host = _step_inputs(conv)
    y, taps, zs, downs, ups, w = [
        [t.cuda() for t in a] if isinstance(a, list) else (None if a is None else a.cuda())
        for a in host
    ]
    grid, prefix = ((2, 3), 1) if conv else (None, 0)

    def ours(y, taps, z0, z1, a0, a1, ups, *w):
        return step.side_step(y, taps, [z0, z1], [a0, a1], 2, ups, w[0] if w else None, grid,
                              prefix, 3.0, "cuda")  # fmt: skip

    args = [y, taps, *zs, *downs, ups] + ([w] if conv else [])
    out, new_taps = ours(*args)
    want_out, want_taps = _spec(*host)
    torch.testing.assert_close(out.cpu(), want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_taps.cpu(), want_taps, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_() for t in args]
    assert torch.autograd.gradcheck(ours, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("downs_kind", ["float32", "transposed", "float64", "bfloat16"])
def test_write_taps_cpu_matches_a_matmul_in_the_taps_dtype(dtype, strided, downs_kind):
    """The CPU loop (cpu/taps.cpp) against the generic version (a matmul in the taps' dtype,
    step.cpp): float32 inputs beside 16-bit taps (autocast), channel-strided inputs, and
    downs in another dtype or layout than the taps (read as they are, rounded to the taps')."""
    g = torch.Generator().manual_seed(1)
    b, n, k_cols = 3, 11, 9
    zs = [torch.randn(b, n, d, generator=g) for d in (37, 37, 37)]
    if strided:  # channels not unit-stride, as a CNN's (B, C, H, W) features seen as tokens
        zs = [torch.randn(b, d, n, generator=g).transpose(1, 2) for d in (37, 37, 37)]
    if downs_kind == "transposed":  # (r, d) views with stride (1, r)
        downs = [torch.randn(37, r, generator=g).t() for r in (2, 3, 2)]
    else:
        dt = getattr(torch, downs_kind)
        downs = [torch.randn(r, 37, generator=g).to(dt) for r in (2, 3, 2)]
    taps = torch.zeros(b, n, k_cols, dtype=dtype)
    torch.ops.dtl_kernels.write_taps_(taps, zs, downs, 1)
    want = torch.zeros(b, n, k_cols, dtype=dtype)
    col = 1
    for z, a in zip(zs, downs, strict=True):
        want[..., col : col + a.shape[0]] = torch.matmul(z.to(dtype), a.to(dtype).t())
        col += a.shape[0]
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(taps.float(), want.float(), rtol=tol, atol=tol)
    assert taps[..., 0].abs().max() == 0 and taps[..., 8].abs().max() == 0  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("taps_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("batch", [3, 0])
def test_write_taps_generic_matches_a_matmul_in_the_taps_dtype(dtype, taps_layout, batch):
    """The version every other device runs (step.cpp; CUDA), called on CPU tensors by
    redispatch: into contiguous taps its matmuls write the columns in place, into strided
    taps they are copied; float32 and channel-strided inputs, transposed downs."""
    g = torch.Generator().manual_seed(2)
    b, n, k_cols = batch, 11, 9
    zs = [torch.randn(b, n, 37, generator=g), torch.randn(b, 37, n, generator=g).transpose(1, 2)]
    downs = [torch.randn(2, 37, generator=g), torch.randn(37, 3, generator=g).t()]
    if taps_layout == "contiguous":
        taps = torch.full((b, n, k_cols), 7.0, dtype=dtype)
    else:  # (B, N, K) seen through a transpose: not contiguous
        taps = torch.full((b, k_cols, n), 7.0, dtype=dtype).transpose(1, 2)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    torch.ops.dtl_kernels.write_taps_.default.redispatch(keys, taps, zs, downs, 2)
    want = torch.full((b, n, k_cols), 7.0, dtype=dtype)
    col = 2
    for z, a in zip(zs, downs, strict=True):
        want[..., col : col + a.shape[0]] = torch.matmul(z.to(dtype), a.to(dtype).t())
        col += a.shape[0]
    torch.testing.assert_close(taps, want, rtol=0, atol=0)  # the same matmul, the same bits


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(first_col=7), "end after column"),
        (dict(first_col=-1), "first_col must be in"),
        (dict(downs_d=5), r"downs\[0\] must be \(r, d\)"),
        (dict(drop_down=True), "inputs but"),
        (dict(kernel=7), "kernel must be 0 or 1"),
    ],
)
def test_step_refuses_bad_input(bad, match):
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    if "downs_d" in bad:
        downs = [torch.randn(2, bad["downs_d"], dtype=DT), downs[1]]
    if bad.get("drop_down"):
        downs = downs[:1]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dtl_kernels.side_step(y, taps, zs, downs, bad.get("first_col", 2), ups, None, 0,
                                        0, 0, 3.0, bad.get("kernel", 0))  # fmt: skip


# -- host overhead: operation counts ------------------------------------------------------
class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _model(adapt_from: int, conv_kernel: int = 0) -> DTLViT:
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_base_patch16_224", img_size=32, embed_dim=32, num_heads=2, num_classes=0
    )
    model = DTLViT(backbone, adapt_from=adapt_from, conv_kernel=conv_kernel, num_classes=3)
    model.csn.backend = "cpu"
    return model


@pytest.mark.parametrize("conv_kernel", [0, 3])
@pytest.mark.parametrize("planned", [False, True], ids=["add_back", "planned"])
def test_every_add_back_dispatches_the_same_operations(monkeypatch, conv_kernel, planned):
    """Block 7's add-back (which also computes the trunk's 7 taps) and block 12's dispatch
    the same operations: the taps are one buffer, not a growing concatenation (the stage's
    buffers are made once per pass, at its first tap) -- through add_back and through a
    planned pass's recorded steps."""
    model = _model(7, conv_kernel)
    counts = []

    def counting(original):
        def counted(*args, **kwargs):
            with _Count() as c:
                out = original(*args, **kwargs)
            counts.append(c.n)
            return out

        return counted

    if planned:  # (a counting mode turns the plan off: count inside its steps)
        pass_type = csn_module.PlannedPass
        monkeypatch.setattr(pass_type, "recorded_step", counting(pass_type.recorded_step))
    else:
        model.csn.walk_plan = lambda *a: None
        model.csn.add_back = counting(model.csn.add_back)
    model(torch.randn(1, 3, 32, 32))
    assert len(counts) == 6
    assert len(set(counts)) == 1, counts
    assert counts[0] <= 4, counts  # the taps' copy, write_taps_, the kernel, a detach (autograd)


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_the_remembered_backend_follows_a_changed_request(monkeypatch):
    """The CSN remembers which backend runs tensors like these (selecting costs more host
    time than a tap), keyed on the request: changing ``csn.backend`` or
    ``DTL_KERNELS_BACKEND`` between passes takes effect at the next pass."""
    from dtl_kernels.ops import side

    monkeypatch.delenv(side.BACKEND_ENV, raising=False)
    model = _model(7).eval()
    model.csn.backend = "auto"
    x = torch.randn(1, 3, 32, 32)

    def fused() -> bool:
        with torch.no_grad(), _Names() as spy:
            model(x)
        return "dtl_kernels.side_forward" in spy.names  # the CPU kernel (reference: aten only)

    assert fused()
    monkeypatch.setenv(side.BACKEND_ENV, "reference")
    assert not fused()
    monkeypatch.delenv(side.BACKEND_ENV)
    assert fused()
    model.csn.backend = "reference"
    assert not fused()
    model.csn.backend = "auto"
    assert fused()


@pytest.mark.parametrize("conv_kernel", [0, 3])
def test_backward_operations_grow_by_a_constant_per_adapted_block(conv_kernel):
    """Each further adapted block adds the same number of dispatched operations to the
    forward and to the backward (its frozen block's backward plus one step's), whatever its
    position: no slices and sums that grow with the number of taps."""
    fwd, bwd = {}, {}
    for m in (8, 9, 10):
        model = _model(m, conv_kernel)
        x = torch.randn(1, 3, 32, 32)
        with _Count() as f:
            loss = model(x).square().sum()
        with _Count() as b:
            loss.backward()
        fwd[m], bwd[m] = f.n, b.n
    assert fwd[8] - fwd[9] == fwd[9] - fwd[10], fwd
    assert bwd[8] - bwd[9] == bwd[9] - bwd[10], bwd


# -- the autocast mix: float32 y, 16-bit taps / ups ----------------------------------------
@pytest.mark.parametrize("side_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv", [False, True], ids=["dtl", "dtl+"])
def test_cpu_mix_computes_in_float32(side_dtype, conv):
    """16-bit taps / ups beside a float32 y: the kernel's output and ∂w are float32-accurate
    against float64 on the same (16-bit) values — nothing is rounded to 16 bits on the way."""
    from dtl_kernels.ops import side

    y, taps, _, _, ups, w = _step_inputs(conv)
    taps, ups = taps.to(side_dtype), ups.to(side_dtype)
    grid, prefix = ((2, 3), 1) if conv else (None, 0)
    leaves = [t.float().requires_grad_() if t is not None else None for t in (y, w)]
    out = side.side_add(leaves[0], taps, ups, 3.0, leaves[1], grid, prefix, backend="cpu")
    assert out.dtype == torch.float32
    exact = reference.side_add(y, taps.double(), ups.double(), 3.0, w, grid, prefix)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    if conv:
        out.square().sum().backward()
        w64 = w.clone().requires_grad_()
        reference.side_add(
            y, taps.double(), ups.double(), 3.0, w64, grid, prefix
        ).square().sum().backward()
        torch.testing.assert_close(leaves[1].grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_autocast_model_feeds_the_kernel_16_bit_taps():
    """Under bf16 autocast the residual stream is float32 and the taps bfloat16: the fused
    model hands the kernel exactly that (no cast of the taps up), and matches the eager
    reference run under the same autocast within bfloat16 rounding."""
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.dtl_kernels.side_forward:
                seen.append((args[0].dtype, args[1].dtype, args[2].dtype))
            return func(*args, **(kwargs or {}))

    model = _model(7, 3)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for backend in ("reference", "cpu"):
        model.csn.backend = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
            logits = model(x).float()
        logits.square().sum().backward()
        results[backend] = (logits.detach(), [p.grad.clone() for p in model.csn.parameters()])
    assert seen and all(s == (torch.float32, torch.bfloat16, torch.bfloat16) for s in seen), seen
    (ref, ref_g), (ours, our_g) = results["reference"], results["cpu"]
    torch.testing.assert_close(ours, ref, rtol=3e-2, atol=3e-2)
    for a, b in zip(our_g, ref_g, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item() + 1e-6)


def _logits_and_grads(model, x, amp: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(x).float()
    logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), **grads}


@pytest.mark.parametrize("family", ["swin", "efficientnet-channels-last"])
def test_autocast_swin_and_cnn_within_the_references_own_bf16_error(family):
    """Under bf16 autocast, Swin (several stages) and a CNN in channels_last (the demo's
    path) on the fused kernels are as close to the float32 reference as the reference run
    under the same autocast is (norm-relative, per tensor: a CNN's bf16 gradients are far
    from float32's for both, so an elementwise tolerance would say nothing)."""
    torch.manual_seed(0)
    if family == "swin":
        model = create_model(SWIN, "dtl+", 4, img_size=32, window_size=2, depths=(1, 1, 2, 1),
                             embed_dim=16, num_heads=(1, 1, 2, 2), tap_from=1, adapt_from=3,
                             drop_path_rate=0.0)  # fmt: skip
        x = torch.randn(2, 3, 32, 32)
    else:
        from test_convnet import tiny_cnn

        model = tiny_cnn("efficientnet", num_classes=4, conv_kernel=3)
        model = model.to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.1)
    model.train()
    model.csn.backend = "reference"
    exact = _logits_and_grads(model, x, amp=False)
    ref = _logits_and_grads(model, x, amp=True)
    model.csn.backend = "cpu"
    ours = _logits_and_grads(model, x, amp=True)
    assert ours.keys() == ref.keys() == exact.keys() and len(ours) > 4

    def err(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    for name, want in exact.items():
        assert ours[name].dtype == want.dtype, name
        mine, theirs = err(ours[name], want), err(ref[name], want)
        assert mine <= 2 * theirs + 2e-3, (name, mine, theirs)


def test_a_kernel_without_the_one_call_step_runs_the_same_step(monkeypatch):
    """A backend without side_step (the fallback when none of the fused ones takes the
    shapes) gets the same taps through separate calls: values and gradients unchanged."""
    from dtl_kernels.ops import side

    model = _model(7, 3)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for one_call in (True, False):
        monkeypatch.setattr(side, "has_step", lambda name, one_call=one_call: one_call)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.csn.parameters()]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for u, v in zip(gb, ga, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def _count_steps(monkeypatch):
    """Counts side_step calls and side_step_ calls (through the runners the CSN binds)."""
    calls = {"side_step": 0, "side_step_": 0}

    def count(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return spy

    real_bind = step.bind_side_step_
    monkeypatch.setattr(step, "side_step", count("side_step", step.side_step))
    monkeypatch.setattr(step, "bind_side_step_",
                        lambda *a, **k: count("side_step_", real_bind(*a, **k)))  # fmt: skip
    return calls


def _vit(conv_kernel: int):
    m = DTLViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                 num_classes=3), adapt_from=7, conv_kernel=conv_kernel)  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.csn.up.values():
            p.normal_()
    return m.eval()


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["dtl", "dtl+"])
def test_no_grad_passes_write_one_copy_of_the_taps_in_place(monkeypatch, conv_kernel):
    """Without autograd the steps write the stage's taps in place (side_step_, one copy of
    the kept zeros per pass): the same logits as the recorded pass, the kept zeros stay
    zero, and a recorded pass after it still takes the functional step."""
    m = _vit(conv_kernel)
    x = torch.randn(2, 3, 32, 32)
    want = m(x)
    calls = _count_steps(monkeypatch)
    for ctx in (torch.no_grad, torch.inference_mode, torch.no_grad):
        with ctx():
            torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
    assert calls == {"side_step": 0, "side_step_": 18}
    assert m.csn._zeros and all(not z.any() for z in m.csn._zeros.values())
    got = m(x)
    got.sum().backward()  # a recorded pass: the functional step, gradients as before
    assert calls == {"side_step": 6, "side_step_": 18}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _small_csn():
    from dtl_kernels.csn import CompactSideNetwork, CSNConfig

    torch.manual_seed(0)
    csn = CompactSideNetwork([16] * 4, [0] * 4, CSNConfig(rank=2, tap_from=1, adapt_from=2))
    with torch.no_grad():
        for p in csn.up.values():
            p.normal_()
    csn.backend = "cpu"
    return csn


def _walk(csn, state, lo, hi, x):
    for i in range(lo, hi):
        csn.tap(state, i, x)
        x = x * 1.1 + 0.1
        if csn.is_adapted(i):
            x = csn.add_back(state, i, x, (2, 2), 1)
    return x


def test_a_pass_may_leave_inference_mode_mid_stage():
    """A stage's copy made under inference_mode is an inference tensor: a later no_grad
    add-back of the same pass copies it again instead of failing to write it."""
    csn, x0 = _small_csn(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = _walk(csn, csn.start(), 0, 4, x0)
        s = csn.start()
        with torch.inference_mode():
            h = _walk(csn, s, 0, 2, x0)
        got = _walk(csn, s, 2, 4, h.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_forked_state_resumes_as_often_as_it_is_forked():
    """Forks resume alike, and so does the original after a fork was taken from it."""
    csn, x0 = _small_csn(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = _walk(csn, csn.start(), 0, 4, x0)
        s = csn.start()
        h = _walk(csn, s, 0, 2, x0)
        forks = [s.fork(), s.fork()]
        got = [_walk(csn, f, 2, 4, h) for f in forks]
        s = csn.start()
        h = _walk(csn, s, 0, 2, x0)
        fork = s.fork()
        got.append(_walk(csn, s, 2, 4, h))  # the original first
        got.append(_walk(csn, fork, 2, 4, h))
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("in_place", [False, True])
def test_forward_mode_ad_is_refused_not_dropped(in_place):
    import torch.autograd.forward_ad as fwad

    y, taps, zs, downs, ups, _ = _step_inputs(False)
    with fwad.dual_level(), torch.no_grad():
        dual = fwad.make_dual(y, torch.ones_like(y))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            if in_place:
                step.side_step_(dual, taps.clone(), zs, downs, 2, ups, None, None, 0, 3.0, "cpu")
            else:
                step.side_step(dual, taps, zs, downs, 2, ups, None, None, 0, 3.0, "cpu")


def test_the_in_place_step_bumps_the_version_first():
    """Under inference_mode a normal tensor's version still moves (autograd then refuses a
    saved tensor that changed), and an inference tensor outside inference mode is refused
    before anything is written."""
    g = torch.Generator().manual_seed(4)
    y, z = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    a, ups = torch.randn(2, 5, generator=g), torch.randn(5, 4, generator=g)
    leaf = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    taps = leaf.clone()
    loss = (taps * taps).sum()  # saves taps
    with torch.inference_mode():
        step.side_step_(y, taps, [z], [a], 0, ups, None, None, 0, 2.0, "cpu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():
        frozen = torch.zeros(2, 3, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        step.side_step_(y, frozen, [z], [a], 0, ups, None, None, 0, 2.0, "cpu")
    assert not frozen.any()  # refused untouched


@pytest.mark.parametrize("d", [0, 3])
def test_write_taps_generic_takes_an_input_width_of_zero(d):
    """A (B, N, 0) input gives zero taps (what the CPU kernel and a matmul give)."""
    taps = torch.full((2, 3, 4), 7.0)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    z, a = torch.randn(2, 3, d), torch.randn(2, d)
    torch.ops.dtl_kernels.write_taps_.default.redispatch(keys, taps, [z], [a], 1)
    torch.testing.assert_close(taps[..., 1:3], z @ a.t(), rtol=0, atol=0)
    assert (taps[..., 0] == 7).all() and (taps[..., 3] == 7).all()


# -- the next block's tap folded into the add-back (add_back(tap_next=True), side_step_'s
# next_down): the same taps, one tap call fewer per tail block


def test_next_down_writes_the_next_blocks_tap_on_the_output():
    """Against the reference: the next tap from `out`, a strided next_down and y too."""
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    nxt = torch.randn(y.shape[-1], 2, dtype=DT).t()  # (2, d), not contiguous
    with torch.no_grad():
        mine = taps.clone()
        out = step.side_step_(y, mine, zs, downs, 2, ups, None, None, 0, 3.0, "cpu", nxt)
        want_out, want_taps = _spec(y, taps, zs, downs, ups, None)
        want_taps[..., 6:8] = reference.tap(want_out, nxt)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine, want_taps, rtol=1e-12, atol=1e-12)
    y = y.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, strided
    with torch.no_grad():  # no pending inputs: the next tap goes at first_col itself
        mine = taps.clone()
        out = step.side_step_(y, mine, [], [], 4, ups, None, None, 0, 3.0, "cpu", nxt)
    torch.testing.assert_close(mine[..., 4:6], reference.tap(out, nxt), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "bad,first_col",
    [((2, 5), 2), ((3, 6), 2), ((2,), 2), ((0, 6), 2)],
    ids=["width", "past-the-columns", "1-d", "rank-0"],
)
def test_a_bad_next_down_is_refused_by_name_before_anything_is_written(bad, first_col):
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    mine = taps.clone()
    with torch.no_grad(), pytest.raises(RuntimeError, match="next_down must be"):
        step.side_step_(y, mine, zs, downs, first_col, ups, None, None, 0, 3.0, "cpu",
                        torch.randn(bad, dtype=DT))  # fmt: skip
    torch.testing.assert_close(mine, taps, rtol=0, atol=0)  # the pending taps not written
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="next_down must"):
        fake = [mode.from_tensor(t) for t in (y, taps, *zs, *downs, ups)]
        step.side_step_(fake[0], fake[1], fake[2:4], fake[4:6], first_col, fake[6], None, None,
                        0, 3.0, "cpu", mode.from_tensor(torch.randn(bad, dtype=DT)))  # fmt: skip


@pytest.mark.parametrize("op", ["side_step", "side_step_"])
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(beta=float("inf")), "beta"),
        (dict(grid=(3, 3)), "patch grid"),
        (dict(prefix=8), "num_prefix"),
    ],
    ids=["beta-inf", "grid", "prefix"],
)
def test_a_traced_step_refuses_what_its_side_op_would(op, change, match):
    """The fake kernels run the side op's own checks (β, grid, prefix), as the run does:
    tracing refuses what the kernels would refuse, not only the taps' arguments."""
    y, taps, zs, downs, ups, w = _step_inputs(True)
    args = (change.get("grid", (2, 3)), change.get("prefix", 1), change.get("beta", 3.0), "cpu")
    fn = getattr(step, op)
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):  # the run refuses it
        fn(y, taps.clone(), zs, downs, 2, ups, w, *args)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
        fake = [mode.from_tensor(t) for t in (y, taps, *zs, *downs, ups, w)]
        fn(fake[0], fake[1], fake[2:4], fake[4:6], 2, fake[6], fake[7], *args)


@pytest.mark.parametrize(
    "inputs,first_col,match",
    [(0, 2, "0 inputs but 2 downs"), (2, -(2**63), "first_col must be in"),
     (2, 7, "the taps of inputs 0..0 end after column 9 of 8")],
    ids=["unpaired-downs", "first-col-min", "first-col-late"],
)  # fmt: skip
def test_the_next_taps_column_is_checked_before_it_is_summed(inputs, first_col, match):
    """With next_down the op works out the next tap's column itself: what that sum uses
    is checked first, also without pending inputs (write_taps_ checks only those)."""
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    nxt = torch.randn(2, y.shape[-1], dtype=DT)
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):
        step.side_step_(y, taps.clone(), zs[:inputs], downs, first_col, ups, None, None, 0, 3.0,
                        "cpu", nxt)  # fmt: skip


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["dtl", "dtl+"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_folded_taps_give_the_unfolded_logits_bit_for_bit(monkeypatch, conv_kernel, amp):
    """In a no-grad pass ViT's walk lets each tail add-back take the next block's tap: 7
    tap calls instead of 12, the same logits to the bit. A recorded pass does not fold
    (nothing to save there): 12 tap calls, gradients as before."""
    m = _vit(conv_kernel)
    monkeypatch.setattr(m.csn, "walk_plan", lambda *a: None)  # tap / add_back, not the plan
    x = torch.randn(2, 3, 32, 32)
    taps = []
    real_tap = type(m.csn).tap
    monkeypatch.setattr(type(m.csn), "tap", lambda s, *a: taps.append(a[1]) or real_tap(s, *a))
    assert m.csn.fold_blocks == [False] * 6 + [True] * 5 + [False]
    got = {}
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(m.csn, "_folds", [False] * m.csn.depth)
        taps.clear()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            with torch.no_grad():
                logits = m(x)
            calls = len(taps)
            m.zero_grad(set_to_none=True)
            m(x).float().square().sum().backward()
        grads = [p.grad.clone() for p in m.csn.parameters()]
        got[fold] = (logits, calls, len(taps) - calls, grads)
    assert got[True][1:3] == (7, 12) and got[False][1:3] == (12, 12)
    torch.testing.assert_close(got[True][0], got[False][0], rtol=0, atol=0)
    for a, b in zip(got[True][3], got[False][3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _general_walk_models():
    """Wrappers on the general walk (block_input / tokens / untokens per block): Swin
    (four tail blocks in one stage, patch merging before the stages) and a CNN."""
    swin = create_model(SWIN, method="dtl+", num_classes=3, img_size=64, window_size=4,
                        depths=(1, 1, 4, 2), embed_dim=24, num_heads=(1, 1, 2, 2), tap_from=1,
                        adapt_from=3)  # fmt: skip
    cnn = create_model("convnext_atto", method="dtl", num_classes=3, depths=(1, 2, 3, 1),
                       dims=(16, 24, 32, 40))  # fmt: skip
    for m in (swin, cnn):
        torch.manual_seed(0)
        with torch.no_grad():
            for p in m.csn.up.values():
                p.normal_()
    return {"swin": (swin.eval(), 64), "cnn": (cnn.eval(), 64)}


def _tap_calls(monkeypatch, m) -> list[int]:
    calls = []
    real_tap = type(m.csn).tap
    monkeypatch.setattr(type(m.csn), "tap", lambda s, *a: calls.append(a[1]) or real_tap(s, *a))
    return calls


@pytest.mark.parametrize("family", ["swin", "cnn"])
def test_the_general_walk_folds_taps_and_gives_the_same_logits(monkeypatch, family):
    """Swin's and a CNN's walks let a no-grad add-back take the next block's tap where that
    block's input is the add-back's output (same stage, no patch merging between): fewer
    tap calls, the same logits to the bit."""
    m, size = _general_walk_models()[family]
    x = torch.randn(2, 3, size, size)
    calls = _tap_calls(monkeypatch, m)
    folds = list(m.csn.fold_blocks)
    assert any(folds)
    with torch.no_grad():
        folded = m(x)
        n_folded = len(calls)
        calls.clear()
        monkeypatch.setattr(m.csn, "_folds", [False] * m.csn.depth)
        plain = m(x)
    assert n_folded == len(calls) - sum(folds) and n_folded < len(calls)
    torch.testing.assert_close(folded, plain, rtol=0, atol=0)


def test_no_fold_where_a_wrappers_block_input_changes_the_features(monkeypatch):
    """A block_input that changes the features between two blocks of one stage: the tap of
    the second is of its real input, not of the add-back's output (no fold there)."""
    m, size = _general_walk_models()["swin"]
    x = torch.randn(2, 3, size, size)
    real = m.block_input

    def block_input(i, feats):  # the second block of the stage with the tail
        return real(i, feats) * (1.5 if i == 4 else 1.0)

    m.block_input = block_input
    with torch.no_grad():
        got = m(x)
        monkeypatch.setattr(m.csn, "_folds", [False] * m.csn.depth)
        want = m(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    del m.block_input
    assert m.input_is_output(4) and not m.input_is_output(2)  # block 3 (0-based 2) merges


def test_tap_next_in_a_recorded_pass_taps_the_next_block_itself():
    """add_back(tap_next=True) under autograd (any caller may ask): the next block's tap is
    recorded as tap() would, with the same gradients."""
    csn = _small_csn()
    x0 = torch.randn(2, 5, 16)
    grads = []
    for fold in (True, False):
        csn.zero_grad(set_to_none=True)
        s, x = csn.start(), x0
        for i in range(4):
            if not (fold and i >= 2):  # blocks 2 and 3: taken by add-backs 1 and 2
                csn.tap(s, i, x)
            x = x * 1.1 + 0.1
            if csn.is_adapted(i):
                x = csn.add_back(s, i, x, (2, 2), 1, tap_next=fold and csn.fold_blocks[i])
        x.square().sum().backward()
        grads.append((x.detach(), [p.grad.clone() for p in csn.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_split_walk_does_not_fold_across_its_seam(monkeypatch):
    """run_blocks(…, stop) leaves block stop's tap to the walk that resumes there: taps of
    blocks 1-7, 9 and 11 (0-based 0-6, 8, 10), those of 8, 10 and 12 taken by add-backs 7, 9
    and 11; add-backs 8 and 10 end a part and take none."""
    m = _vit(0)
    x = torch.randn(2, 3, 32, 32)
    tapped, taking = [], []
    real_tap, real_add_back = type(m.csn).tap, type(m.csn).add_back

    def add_back(s, state, i, *args):
        taking.append(i) if args[-1] is True else None
        return real_add_back(s, state, i, *args)

    monkeypatch.setattr(type(m.csn), "tap", lambda s, *a: tapped.append(a[1]) or real_tap(s, *a))
    monkeypatch.setattr(type(m.csn), "add_back", add_back)
    with torch.no_grad():
        want = m(x)
        tapped.clear(), taking.clear()
        h, ctx = m.embed(m.backbone_images(x))
        state = m.csn.start()
        for lo, hi in ((0, 8), (8, 10), (10, 12)):
            h = m.run_blocks(h, ctx, state, lo, hi)
        got = m.forward_head(h)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert tapped == [0, 1, 2, 3, 4, 5, 6, 8, 10] and taking == [6, 8, 10]


def test_grad_turned_on_after_a_folded_tap_still_reaches_that_tap():
    """A no-grad add-back took the next block's tap; grad mode comes on before that block's
    add-back (inside the block): the tap is taken again, recorded, and A gets its gradient
    as without the fold."""
    csn = _small_csn()
    x0 = torch.randn(2, 5, 16)
    got = []
    for fold in (True, False):
        csn.zero_grad(set_to_none=True)
        s = csn.start()
        with torch.no_grad():
            csn.tap(s, 0, x0)
            csn.tap(s, 1, x0 * 1.1)
            x = csn.add_back(s, 1, x0 * 1.2, (2, 2), 1, tap_next=fold)
            if not fold:
                csn.tap(s, 2, x)
        out = csn.add_back(s, 2, x * 1.3, (2, 2), 1)  # grad mode on again
        out.square().sum().backward()
        got.append((out.detach(), csn.down["2"].grad))
    assert got[0][1] is not None and got[0][1].abs().sum() > 0
    torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=0)
    torch.testing.assert_close(got[0][1], got[1][1], rtol=0, atol=0)


def test_tap_next_where_the_next_block_cannot_be_tapped_is_refused():
    csn = _small_csn()  # blocks 0-3, all tapped, adapted from block 1
    with torch.no_grad():
        s = csn.start()
        x = torch.randn(2, 5, 16)
        csn.tap(s, 0, x)
        with pytest.raises(ValueError, match="block 1 cannot be tapped"):
            csn.add_back(s, 0, x, (2, 2), 1, tap_next=True)
        csn.tap(s, 1, x)
        csn.add_back(s, 1, x, (2, 2), 1, tap_next=True)
    assert csn.fold_blocks == [False, True, True, False]


def test_grad_turned_on_mid_stage_reaches_the_ups_too():
    """A stage begun without autograd made its ups without it; grad mode comes on before an
    add-back: the ups are made again, and B gets its gradient."""
    csn = _small_csn()
    x0 = torch.randn(2, 5, 16)
    got = []
    for late in (True, False):
        csn.zero_grad(set_to_none=True)
        s = csn.start()
        with torch.no_grad() if late else torch.enable_grad():
            csn.tap(s, 0, x0)
            csn.tap(s, 1, x0 * 1.1)
        out = csn.add_back(s, 1, x0 * 1.2, (2, 2), 1)
        out.square().sum().backward()
        got.append([csn.up[k].grad for k in ("0", "1")])
    assert all(g is not None for g in got[0])
    for a, b in zip(got[0], got[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- bad arguments found by fuzzing the ops: refused by name, never a silent wrong answer
OP = torch.ops.dtl_kernels


def test_a_meta_tensor_among_cpu_ones_is_refused_not_answered_with_garbage():
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    with torch.no_grad(), pytest.raises(ValueError, match="on one device"):
        step.side_step_(y, taps.clone(), zs, downs, 2, ups.to("meta"), None, None, 0, 3.0, "cpu")
    with pytest.raises(ValueError, match="on one device"):
        OP.write_taps_(taps.clone(), [zs[0].to("meta")], downs[:1], 2)
    with pytest.raises((ValueError, RuntimeError), match="on one device|are on meta"):
        step.side_step(y, taps, [zs[0].to("meta")], downs[:1], 2, ups, None, None, 0, 3.0, "cpu")


def test_write_taps_records_no_gradient_and_bumps_the_version():
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    t = taps.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="write_taps_ records no gradient"):
        OP.write_taps_(t * 1.0, zs, downs, 2)
    plain = taps.clone()
    OP.write_taps_(plain, zs, downs, 2)  # nothing requires grad: allowed
    assert plain._version == 1
    with torch.no_grad():
        OP.write_taps_(t, zs, downs, 2)


@pytest.mark.parametrize("conv", [False, True], ids=["dtl", "dtl+"])
def test_double_backward_is_refused_not_silently_incomplete(conv):
    y, taps, zs, downs, ups, w = _step_inputs(conv)
    ups.requires_grad_()
    grid = (2, 3) if conv else None
    out, _ = step.side_step(y, taps, zs, downs, 2, ups, w, grid, 1 if conv else 0, 3.0, "cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), ups, create_graph=True)
    from dtl_kernels.ops.side import side_add

    full = side_add(y, taps, ups, 3.0, w, grid, 1 if conv else 0, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(full.square().sum(), ups, create_graph=True)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(save_dtype=torch.int32), "save_dtype must be a floating dtype"),
        (dict(save_dtype=torch.float8_e4m3fn), "save_dtype must be a floating dtype"),
        (dict(ups=lambda u: u.to(torch.complex128)), "ups must be float32"),
        (dict(ups=lambda u: u.to(torch.int64)), "ups must be float32"),
        (dict(inputs=[]), "0 inputs but 2 downs"),
        (dict(inputs=[], downs=[], first_col=99), "first_col must be in 0..8"),
        (dict(backend="auto"), "backend must be one of"),
    ],
    ids=["save-int", "save-float8", "ups-complex", "ups-int", "unpaired", "first-col",
         "backend"],
)  # fmt: skip
def test_step_arguments_are_checked_before_they_are_cast(change, match):
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    args = dict(y=y, taps=taps, inputs=zs, downs=downs, first_col=2, ups=ups,
                conv_weight=None, grid=None, num_prefix=0, beta=3.0, backend="cpu")  # fmt: skip
    for k, v in change.items():
        args[k] = v(args[k]) if callable(v) else v
    with pytest.raises((RuntimeError, ValueError), match=match):
        step.side_step(**args)


def test_arguments_that_share_the_written_taps_memory_are_refused():
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    buf = torch.zeros(2, 7, 8, dtype=DT)
    with pytest.raises(RuntimeError, match="an input shares memory with the taps"):
        OP.write_taps_(buf, [buf[..., :6]], downs[:1], 2)
    with pytest.raises(RuntimeError, match="an input shares memory with the taps"):
        OP.write_taps_(buf, [buf[:, :1, :6].expand(2, 7, 6)], downs[:1], 2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="y shares memory with the taps"):
        step.side_step_(buf[..., :6], buf, [], [], 2, ups, None, None, 0, 3.0, "cpu")
    OP.write_taps_(buf[0:1], [buf[1:2, :, :6].clone()], downs[:1], 2)  # another part: fine


def test_memory_shared_through_another_storage_is_refused_too():
    """Two storages can hold the same memory (from_dlpack, frombuffer, from_numpy of a
    tensor's array): the check compared storages and let these through, and the taps came
    out wrong (a review's fuzzing)."""
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    base = torch.zeros(3 * 7 * 8, dtype=DT)
    buf = base[8 : 8 + 112].view(2, 7, 8)
    other = torch.from_dlpack(base)  # a storage of its own over the same memory
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="an input shares memory with the taps"):
            OP.write_taps_(buf, [other[:112].view(2, 7, 8)[..., :6]], downs[:1], 0)
        with pytest.raises(RuntimeError, match="y shares memory with the taps"):
            OP.side_step_(torch.from_dlpack(buf)[..., :6], buf, zs, downs, 2, ups, None, 0, 0,
                          0, 3.0, 0, None)  # fmt: skip
        shared_ups = torch.from_dlpack(buf).reshape(-1)[: ups.numel()].view_as(ups)
        with pytest.raises(RuntimeError, match="ups shares memory with the taps"):
            OP.side_step_(y, buf, zs, downs, 2, shared_ups, None, 0, 0, 0, 3.0, 0, None)
        apart = torch.from_dlpack(base)[:8].view(1, 1, 8).expand(2, 7, 8)[..., :6]
        OP.write_taps_(buf, [apart], downs[:1], 0)  # the memory before the taps: fine


def test_side_backward_is_not_differentiable_and_says_so():
    """Without an autograd kernel of its own, a derivative through side_backward came out
    None (with a warning) and forward-mode AD a zero tangent (a review's fuzzing)."""
    g, t, u = torch.randn(2, 7, 6), torch.randn(2, 7, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="side_backward: forward-mode AD"):
        torch.func.jvp(lambda tt: OP.side_backward(g, tt, u, None, 0, 0, 0, 3.0)[1], (t,),
                       (torch.ones_like(t),))  # fmt: skip
    t.requires_grad_()
    with pytest.raises(RuntimeError, match="side_backward: its gradients are not differentiable"):
        OP.side_backward(g, t, u, None, 0, 0, 0, 3.0)
    with torch.no_grad():
        got = OP.side_backward(g, t, u, None, 0, 0, 0, 3.0)
    assert torch.equal(got[0], OP.side_backward(g, t.detach(), u, None, 0, 0, 0, 3.0)[0])


def test_side_add_takes_a_grid_of_whole_numbers_only():
    """A float grid was truncated (2.5 x 2.4 read as 2 x 2) and a string read digit by
    digit; a NumPy integer is a whole number."""
    import numpy as np

    from dtl_kernels.ops.side import side_add

    y, taps, ups = torch.randn(1, 6, 4), torch.randn(1, 6, 2), torch.randn(4, 2)
    w = torch.randn(4, 1, 3, 3)
    for grid in [(2.5, 2.4), "ab", (2, True), None]:
        with pytest.raises(ValueError, match="two whole numbers"):
            side_add(y, taps, ups, 3.0, w, grid, 0)
    torch.testing.assert_close(side_add(y, taps, ups, 3.0, w, (np.int64(2), 3), 0),
                               side_add(y, taps, ups, 3.0, w, (2, 3), 0))  # fmt: skip


# -- side_step_ refuses before it writes: the caller's taps stay as they were --------------
def _refused_untouched(match, mode=torch.no_grad, **change):
    """side_step_ on `_step_inputs` with `change` applied: refused with `match`, and the
    caller's taps not written (they are written before the side op runs). `mode`:
    no_grad, or inference_mode (which skips the autograd kernels)."""
    y, taps, zs, downs, ups, w = _step_inputs(True)
    args = dict(y=y, zs=zs, downs=downs, ups=ups, w=w, grid=(2, 3), prefix=1, beta=3.0,
                backend="cpu", next_down=None)  # fmt: skip
    args.update(change)
    mine = taps.clone()
    with mode(), pytest.raises((RuntimeError, ValueError), match=match):
        step.side_step_(args["y"], mine, args["zs"], args["downs"], 2, args["ups"], args["w"],
                        args["grid"], args["prefix"], args["beta"], args["backend"],
                        args["next_down"])  # fmt: skip
    torch.testing.assert_close(mine, taps, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(beta=float("nan")), "beta must be a finite number"),
        (dict(beta=1e39), "beta must be a finite number"),  # finite in float64, not in float32
        (dict(beta=3.4028235e38), "beta must be a finite number"),  # past FLT_MAX, rounds to it
        (dict(ups=torch.randn(5, 8, dtype=DT)), "ups has 5 rows but d = 6"),
        (dict(prefix=9), "num_prefix must be in 0..7"),
        (dict(grid=(3, 3)), "do not hold 1 prefix tokens plus a 3x3 patch grid"),
        (dict(w=torch.randn(6, 1, 3, 2, dtype=DT)), r"conv_weight must be \(d, 1, k, k\)"),
        (dict(y=torch.randn(2, 7, 6).long()), "y must be float32"),
        (dict(ups=torch.randn(6, 8, dtype=DT, device="meta")), "must be on one device"),
    ],
    ids=["beta-nan", "beta-past-float32", "beta-rounds-to-flt-max", "ups-rows", "prefix",
         "grid", "conv-shape", "integer-y", "ups-elsewhere"],
)  # fmt: skip
def test_the_in_place_step_checks_its_side_op_before_it_writes_the_taps(change, match):
    if change.get("beta", 0) > 3e38:
        change["y"] = _step_inputs(True)[0].float()  # float32 y: β must fit a float
        change["ups"] = _step_inputs(True)[4].float()
        change["w"] = _step_inputs(True)[5].float()
    _refused_untouched(match, **change)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("where", ["y", "next_down", "inputs", "downs", "ups", "w"])
def test_sparse_tensors_are_refused_by_name(where, mode):
    y, taps, zs, downs, ups, w = _step_inputs(True)
    dense = dict(y=y, next_down=torch.randn(2, 6, dtype=DT), inputs=zs[0], downs=downs[0],
                 ups=ups, w=w)[where]  # fmt: skip
    name = {"inputs": r"inputs\[0\]", "downs": r"downs\[0\]", "w": "conv_weight"}.get(where, where)
    odd = dense.to_sparse()
    change = {"zs": [odd, zs[1]]} if where == "inputs" else {
        "downs": [odd, downs[1]]} if where == "downs" else {where: odd}  # fmt: skip
    _refused_untouched(f"{name} must be a dense \\(strided\\) tensor, got a sparse", mode,
                       **change)  # fmt: skip


@pytest.mark.parametrize("where", ["y", "inputs"])
def test_a_nested_tensor_in_the_recorded_step_is_refused_by_name(where):
    """side_step (autograd's kernel takes nested tensors too): refused before autograd's
    set-up reads the tensors' sizes (a nested tensor has none)."""
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    dense = y if where == "y" else zs[0]
    nested = torch.nested.nested_tensor([dense[0], dense[1]])
    args = (nested, taps, zs, downs) if where == "y" else (y, taps, [nested, zs[1]], downs)
    name = "y" if where == "y" else r"inputs\[0\]"
    with pytest.raises(RuntimeError, match=f"{name} must be a dense \\(strided\\) tensor"):
        step.side_step(*args, 2, ups, None, None, 0, 3.0, "cpu")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("op", ["side_step", "side_step_", "write_taps_"])
@pytest.mark.parametrize("where", ["taps", "inputs"])
def test_a_nested_tensor_without_autograd_is_refused_by_name(where, op, mode):
    """Past the autograd kernels (no_grad, inference_mode) a nested tensor reaches its own
    dispatch key, where the ops' kernels name it (the dispatcher's "Could not run … with
    arguments from the 'NestedTensorCPU' backend" before); the taps stay as they were."""
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    dense = taps if where == "taps" else zs[0]
    nested = torch.nested.nested_tensor([dense[0], dense[1]])
    mine = taps.clone()
    t, inputs = (nested, zs) if where == "taps" else (mine, [nested, zs[1]])
    name = "taps" if where == "taps" else r"inputs\[0\]"
    with mode(), pytest.raises(RuntimeError, match=f"{op}: {name} must be a dense .* nested"):
        if op == "write_taps_":
            OP.write_taps_(t, inputs, downs, 2)
        else:
            getattr(step, op)(y, t, inputs, downs, 2, ups, None, None, 0, 3.0, "cpu")
    torch.testing.assert_close(mine, taps, rtol=0, atol=0)


def test_triton_on_cpu_without_its_interpreter_is_refused_before_the_taps_are_written():
    pytest.importorskip("triton")
    from dtl_kernels.ops import triton_side

    if triton_side._interpreted():
        pytest.skip("this process runs Triton interpreted: CPU tensors are launchable")
    _refused_untouched("the triton backend runs CUDA tensors", backend="triton")
    # the op itself too (a review's fuzzing: it wrote the taps, then the launcher refused)
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    mine = taps.clone()
    with torch.no_grad(), pytest.raises(RuntimeError, match="CPU ones only under its interp"):
        OP.side_step_(y, mine, zs, downs, 2, ups, None, 0, 0, 0, 3.0, 1, None)
    torch.testing.assert_close(mine, taps, rtol=0, atol=0)


def _run_fresh(code: str) -> None:
    """`code` in a new Python process (what a process has imported matters here)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def _negative(t: torch.Tensor) -> torch.Tensor:
    """A negative view holding t's values (the negative bit set: math-bit dispatch)."""
    out = torch._neg_view(-t)
    assert out.is_neg()
    return out


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_negative_view_as_written_taps_is_refused(mode):
    """PyTorch's math-bit fallback would write it through a copy and fail an internal
    assert (side_step_ returns out, not the taps) or read a return that write_taps_ does
    not have: refused by name."""
    y, taps, zs, downs, ups, _ = _step_inputs(False)
    neg = _negative(taps)
    with mode(), pytest.raises(RuntimeError, match="must not be a negative"):
        step.side_step_(y, neg, zs, downs, 2, ups, None, None, 0, 3.0, "cpu")
    with mode(), pytest.raises(RuntimeError, match="must not be a negative"):
        torch.ops.dtl_kernels.write_taps_(neg, zs, downs, 2)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("which", ["y", "input", "down", "ups", "conv", "next_down"])
def test_negative_views_among_the_read_arguments_give_their_values(which, mode):
    """A read-only argument as a negative view is read by its values (with the Negative
    key excluded, one left unresolved would be read with the wrong sign)."""
    y, taps, zs, downs, ups, w = _step_inputs(True)
    nxt = torch.randn(2, 6, dtype=DT)
    args = dict(y=y, zs=list(zs), downs=list(downs), ups=ups, w=w, nxt=nxt)
    odd = dict(args)
    if which == "input":
        odd["zs"] = [_negative(zs[0]), zs[1]]
    elif which == "down":
        odd["downs"] = [downs[0], _negative(downs[1])]
    else:
        key = {"conv": "w", "next_down": "nxt"}.get(which, which)
        odd[key] = _negative(args[key])
    results = []
    for a in (args, odd):
        mine = taps.clone()
        with mode():
            out = step.side_step_(a["y"], mine, a["zs"], a["downs"], 2, a["ups"], a["w"], (2, 3),
                                  1, 3.0, "cpu", a["nxt"])  # fmt: skip
        results.append((out, mine))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    if which in ("input", "down"):  # write_taps_ alone too
        got, want = taps.clone(), taps.clone()
        with mode():
            torch.ops.dtl_kernels.write_taps_(got, odd["zs"], odd["downs"], 2)
            torch.ops.dtl_kernels.write_taps_(want, zs, downs, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_write_taps_checks_every_blocks_size_before_it_writes_the_first():
    """The second block's down is too large (expanded): refused, the first block's columns
    not written."""
    taps = torch.zeros(2, 5, 4)
    z, a = torch.randn(2, 5, 3), torch.randn(2, 3)
    huge = 2**41
    with pytest.raises(RuntimeError, match="too large"):
        torch.ops.dtl_kernels.write_taps_(
            taps,
            [z, torch.randn(2, 5, 1).expand(2, 5, huge)],
            [a, torch.randn(1, 1).expand(1, huge)],
            0,
        )
    assert taps.abs().sum() == 0


def test_kernel_1_before_tritons_op_is_registered_is_refused_untouched():
    """torch.ops with kernel 1 in a process that never imported triton_side: refused by
    name, the taps not written."""
    code = (
        "import torch, dtl_kernels, sys\n"
        "assert 'dtl_kernels.ops.triton_side' not in sys.modules\n"
        "y, taps = torch.randn(2, 5, 4), torch.zeros(2, 5, 6)\n"
        "try:\n"
        "    with torch.no_grad():\n"
        "        torch.ops.dtl_kernels.side_step_(y, taps, [torch.randn(2, 5, 3)],"
        " [torch.randn(2, 3)], 1, torch.randn(4, 6), None, 0, 0, 0, 3.0, 1, None)\n"
        "except RuntimeError as e:\n"
        "    assert 'registered when dtl_kernels.ops.triton_side is imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('not refused')\n"
        "assert taps.abs().sum() == 0\n"
    )
    _run_fresh(code)


def test_write_taps_refuses_a_width_whose_padding_would_overflow():
    """d near 2^63 through expand(): refused by size before d is rounded up to whole
    vectors (that sum would overflow)."""
    d = 2**63 - 1
    z = torch.randn(1, 1, 1).expand(1, 1, d)
    a = torch.randn(1, 1).expand(1, d)
    with pytest.raises(RuntimeError, match="too large"):
        torch.ops.dtl_kernels.write_taps_(torch.zeros(1, 1, 1), [z], [a], 0)


def test_the_side_ops_fakes_come_with_the_package():
    """`import dtl_kernels` alone registers the compiled side op's fake kernels, which a
    traced step reaches (they once came only with ops.compiled_side)."""
    code = (
        "import torch, dtl_kernels\n"
        "m = dict(device='meta')\n"
        "out = torch.ops.dtl_kernels.side_forward(torch.empty(2, 5, 4, **m),"
        " torch.empty(2, 5, 6, **m), torch.empty(4, 6, **m), None, 0, 0, 0, 3.0)\n"
        "assert out.shape == (2, 5, 4), out.shape\n"
    )
    _run_fresh(code)
