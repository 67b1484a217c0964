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


def test_a_method_patched_on_the_class_after_a_forward_is_called():
    class Patched(DTLViT):
        pass

    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_base_patch16_224", img_size=32, embed_dim=32, depth=5, num_heads=2, num_classes=0
    )
    model = Patched(backbone, adapt_from=3, num_classes=3)
    model.csn.backend = "cpu"
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    assert walk._plain_walk(model)  # decided for the class by this first forward
    calls = []

    def call_block(self, block, i, x, ctx):
        calls.append(i)
        return block(x)

    Patched.call_block = call_block
    try:
        assert torch.equal(model(x), before)  # the same blocks, now called through the patch
        assert calls == list(range(5)) and not walk._plain_walk(model)
    finally:
        del Patched.call_block
    assert walk._plain_walk(model)


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
    monkeypatch.setattr(walk, "_plain_walk", lambda model: False)
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


# -- the no-grad plan (CompactSideNetwork.walk_plan): one call per add-back ------------
def _logits_both_ways(model, x, run=None):
    """Logits of a no-grad pass with the plan and with the general tap / add_back path."""
    run = run or (lambda: model(x))
    with torch.no_grad():
        planned = run()
    model.csn.walk_plan = lambda *a: None
    try:
        with torch.no_grad():
            general = run()
    finally:
        del model.csn.walk_plan
    return planned, general


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["dtl", "dtl+"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_walk_plan_gives_the_general_walks_logits_bit_for_bit(monkeypatch, conv_kernel,
                                                                     amp, mode):  # fmt: skip
    model = _vit(conv_kernel, adapt_from=2).eval()
    x = torch.randn(3, 3, 32, 32)
    calls = []
    real_tap, real_add_back = type(model.csn).tap, type(model.csn).add_back
    cls = type(model.csn)
    monkeypatch.setattr(cls, "tap", lambda s, *a: calls.append("tap") or real_tap(s, *a))
    monkeypatch.setattr(cls, "add_back", lambda s, *a: calls.append("add") or real_add_back(s, *a))
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    out = {}
    for planned in (True, False, True):
        if not planned:
            model.csn.walk_plan = lambda *a: None
        calls.clear()
        with ctx(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            out[planned] = model(x)
        model.csn.__dict__.pop("walk_plan", None)
        assert calls == ([] if planned else ["tap"] * 2 + ["add"] * 4)  # 5 blocks, M = 2
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=0)
    assert len(model.csn._plans) == 1  # the second planned pass took the kept plan


def test_the_plan_calls_one_step_per_add_back(monkeypatch):
    model = _vit(adapt_from=3).eval()
    steps = []
    real = csn_module.step.bind_side_step_

    def bind(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda *a: steps.append((len(a[2]), a[4], a[5] is not None)) or run(*a)

    monkeypatch.setattr(csn_module.step, "bind_side_step_", bind)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # (pending inputs, first column, takes the next tap): blocks 0-2 at the first add-back
    r = model.csn.config.rank
    assert steps == [(3, 0, True), (0, 4 * r, True), (0, 5 * r, False)]


def test_a_replaced_parameter_is_used_by_the_next_planned_pass():
    model = _vit(conv_kernel=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    csn = model.csn
    csn.down["1"] = torch.nn.Parameter(torch.randn_like(csn.down["1"]))
    csn.up["4"] = torch.nn.Parameter(torch.randn_like(csn.up["4"]))
    csn.convs["0"] = torch.nn.Parameter(torch.randn_like(csn.convs["0"]))
    planned, general = _logits_both_ways(model, x)
    torch.testing.assert_close(planned, general, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "recorded"])
def test_parameters_changed_in_place_and_a_new_config_are_used_by_the_next_pass(grad):
    """The CSN's contract (its docstring): what changed between passes is used by the next,
    planned or not; the reference formulation reads everything afresh, so it is the truth."""
    import dataclasses

    model = _vit(conv_kernel=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        model(x)  # the plan and the kept buffers are made
    csn = model.csn
    with torch.no_grad():
        csn.down["2"].mul_(-2)
        csn.up["3"].add_(1)
        csn.convs["0"].mul_(3)
    csn.config = dataclasses.replace(csn.config, beta=7.0)
    with torch.set_grad_enabled(grad):
        fused = model(x)
        csn.backend = "reference"
        reference = model(x)
    torch.testing.assert_close(fused, reference)
    assert not torch.allclose(fused, _vit(conv_kernel=3)(x))  # the changes did change it


@pytest.mark.parametrize("at", [2, 3, 4])
def test_grad_mode_turned_on_inside_a_block_hands_the_pass_to_the_general_walk(at):
    """A block that turns autograd on (and leaves it on): the plan's pass hands its state to
    the general walk, which records the rest; logits and gradients as without the plan."""
    model = _vit(conv_kernel=3, adapt_from=2).eval()
    x = torch.randn(2, 3, 32, 32)
    hook = model.blocks[at].register_forward_pre_hook(lambda m, a: torch._C._set_grad_enabled(True))
    got = []
    try:
        for planned in (True, False):
            if not planned:
                model.csn.walk_plan = lambda *a: None
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                out = model(x)
            assert torch.is_grad_enabled()  # (the hook left it on)
            out.square().sum().backward()
            got.append((out.detach(), [p.grad for p in model.csn.parameters()]))
    finally:
        hook.remove()
        model.csn.__dict__.pop("walk_plan", None)
        torch.set_grad_enabled(True)
    torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=0)
    for a, b in zip(got[0][1], got[1][1], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g is not None for g in got[0][1])


def test_inference_mode_left_inside_a_block_hands_the_pass_on():
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    left = []

    def leave(module, args):  # the pass's taps copy is an inference tensor from here on
        modes = (torch.inference_mode(False), torch.no_grad())  # (the first turns grad on)
        for mode in modes:
            mode.__enter__()
        left.extend(modes)

    hook = model.blocks[3].register_forward_pre_hook(leave)
    try:
        out = []
        for planned in (True, False):
            if not planned:
                model.csn.walk_plan = lambda *a: None
            with torch.inference_mode():
                try:
                    out.append(model(x))
                    assert not torch.is_inference_mode_enabled()
                finally:
                    while left:
                        left.pop().__exit__(None, None, None)
    finally:
        hook.remove()
        model.csn.__dict__.pop("walk_plan", None)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_no_plan_where_tap_and_add_back_must_run(monkeypatch):
    """The reference formulation, pending taps beyond PENDING_BYTES (without autograd) and a
    pass under a dispatch mode go the general way (and the plan is never kept for them)."""
    model = _vit().eval()
    csn, x = model.csn, torch.randn(2, 5, 32)
    with torch.no_grad():
        assert csn.walk_plan(x, (2, 2), 1) is not None
        monkeypatch.setattr(csn_module, "PENDING_BYTES", 2 * x.numel() * x.element_size())
        assert csn.walk_plan(x, (2, 2), 1) is None  # three block inputs before block 3
        monkeypatch.undo()
        csn.backend = "reference"
        assert csn.walk_plan(x, (2, 2), 1) is None
        csn.backend = "cpu"
        from torch.utils._python_dispatch import TorchDispatchMode

        class Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        n = len(csn._plans)
        with Watch():
            assert csn.walk_plan(x, (2, 2), 1) is None
        assert len(csn._plans) == n
    recorded = csn.walk_plan(x, (2, 2), 1)  # autograd on: a plan of recorded steps
    assert recorded.grad and all(row is None or row[2] is None for _, row in recorded.rows)


def test_a_changed_backend_request_gets_its_own_plan(monkeypatch):
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        monkeypatch.setenv("DTL_KERNELS_BACKEND", "reference")
        model.csn.backend = "auto"
        planned, general = _logits_both_ways(model, x)
    torch.testing.assert_close(planned, general, rtol=0, atol=0)
    assert None in model.csn._plans.values()  # the reference request: no plan


def test_a_meta_model_runs_the_general_walk():
    """Autocast knows no meta device: the plan is not asked there (auto picks the reference)."""
    model = _vit().to("meta")
    model.csn.backend = "auto"
    with torch.no_grad():
        out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, 3) and not model.csn._plans


def test_the_plan_is_made_where_the_first_tap_decides():
    """tap_from > 1 and autocast entered inside a block before the first tapped one: the
    taps take autocast's dtype as the general walk's first tap does."""
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_base_patch16_224", img_size=32, embed_dim=32, depth=5, num_heads=2, num_classes=0
    )
    model = DTLViT(backbone, tap_from=3, adapt_from=3, conv_kernel=3, num_classes=3).eval()
    for up in model.csn.up.values():
        torch.nn.init.normal_(up, std=0.5)
    entered = []

    def enter(module, args):
        entered.append(torch.autocast("cpu", torch.bfloat16))
        entered[-1].__enter__()

    hook = model.blocks[0].register_forward_pre_hook(enter)
    x = torch.randn(2, 3, 32, 32)

    def run():
        try:
            return model(x)
        finally:
            while entered:
                entered.pop().__exit__(None, None, None)

    try:
        planned, general = _logits_both_ways(model, x, run)
    finally:
        hook.remove()
    torch.testing.assert_close(planned, general, rtol=0, atol=0)
    (plan,) = model.csn._plans.values()
    assert plan is not None and plan.zeros.dtype == torch.bfloat16 and plan.first == 2


def test_a_conv_of_another_size_gets_its_own_plan():
    model = _vit(conv_kernel=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    model.csn.convs["0"] = torch.nn.Parameter(torch.randn(32, 1, 5, 5))
    planned, general = _logits_both_ways(model, x)
    torch.testing.assert_close(planned, general, rtol=0, atol=0)
    assert len(model.csn._plans) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_walk_plan_on_cuda_gives_the_general_walks_logits(backend, amp):
    """On the GPU's kernels too, planned and general passes agree bit for bit (every
    kernel the plan may pick), in no_grad and inference mode; a CUDA-graph capture of the
    forward never takes the plan (its kernels do not run while it is captured)."""
    from dtl_kernels.ops import side

    x = torch.randn(4, 3, 32, 32, device="cuda")
    if backend != "auto" and not side.BACKENDS[backend].runs(x):
        pytest.skip(side.BACKENDS[backend].why_not(x))
    model = _vit(conv_kernel=3).cuda().eval()
    model.csn.backend = backend
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            planned, general = _logits_both_ways(model, x)
        torch.testing.assert_close(planned, general, rtol=0, atol=0)
    assert len(model.csn._plans) == 2
    with torch.no_grad():
        want = model(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        model(x)  # a warm-up outside the capture, as CUDA graphs need
        model.csn._plans.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert not model.csn._plans
    torch.testing.assert_close(captured, want, rtol=0, atol=0)


# -- a recorded pass's plan -----------------------------------------------------------------
def _step_both_ways(model, x, amp=False):
    """Logits and the side network's gradients of a training step, planned and general."""
    got = []
    for planned in (True, False):
        if not planned:
            model.csn.walk_plan = lambda *a: None
        try:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                out = model(x)
            out.float().square().sum().backward()
            got.append((out.detach(), [p.grad for p in model.csn.parameters()]))
        finally:
            model.csn.__dict__.pop("walk_plan", None)
    return got


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["dtl", "dtl+"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("trunk_dtype", [None, torch.bfloat16])
def test_a_planned_training_step_equals_the_general_one_bit_for_bit(conv_kernel, amp,
                                                                     trunk_dtype):  # fmt: skip
    """Logits and every gradient of the side network, with the memory option that keeps the
    trunk's tap inputs in 16 bits (the step's save_dtype) on and off."""
    model = _vit(conv_kernel, adapt_from=3).train()
    model.csn.trunk_dtype = trunk_dtype
    x = torch.randn(3, 3, 32, 32)
    (planned, planned_grads), (general, general_grads) = _step_both_ways(model, x, amp)
    torch.testing.assert_close(planned, general, rtol=0, atol=0)
    for a, b in zip(planned_grads, general_grads, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (plan,) = [p for p in model.csn._plans.values() if p is not None]
    assert plan.grad and not any(row and row[2] for _, row in plan.rows)  # no next taps


def _logits_with_grad_turned_off(model, x, block: int) -> list[torch.Tensor]:
    """Logits of a recorded pass, planned and general, whose block ``block`` turns autograd
    off (and leaves it off)."""
    off = model.blocks[block].register_forward_hook(
        lambda m, a, out: torch._C._set_grad_enabled(False)
    )
    got = []
    try:
        for planned in (True, False):
            if not planned:
                model.csn.walk_plan = lambda *a: None
            got.append(model(x))
            torch.set_grad_enabled(True)
    finally:
        off.remove()
        model.csn.__dict__.pop("walk_plan", None)
        torch.set_grad_enabled(True)
    return got


@pytest.mark.parametrize("at", [2, 3])
def test_grad_mode_turned_off_inside_a_recorded_pass_gives_the_general_logits(at):
    """From there the general walk takes its in-place steps: the plan's pass hands it its
    state, and the values are the general walk's."""
    got = _logits_with_grad_turned_off(
        _vit(conv_kernel=3, adapt_from=2), torch.randn(2, 3, 32, 32), at
    )
    assert torch.equal(got[0], got[1]) and not got[0].requires_grad


@pytest.mark.parametrize("at", [0, 2, 3])
def test_grad_mode_turned_off_with_taps_pending_hands_the_recorded_pass_on(monkeypatch, at):
    """Grad mode goes off inside block ``at`` of a recorded pass while taps wait for the
    next step (adapt_from = depth): from there the general walk counts them against
    PENDING_BYTES and computes them early (here at every tap), as a walk begun there would;
    the plan's pass hands it its state."""
    monkeypatch.setattr(csn_module, "PENDING_BYTES", 1)
    got = _logits_with_grad_turned_off(
        _vit(conv_kernel=3, adapt_from=5), torch.randn(2, 3, 32, 32), at
    )
    assert torch.equal(got[0], got[1])


def test_a_conv_replaced_inside_a_recorded_pass_is_used_by_its_next_steps():
    model = _vit(conv_kernel=3, adapt_from=2)
    x = torch.randn(2, 3, 32, 32)
    got, first = [], model.csn.convs["0"]
    for planned in (True, False):
        model.csn.convs["0"] = first
        torch.manual_seed(1)
        new = torch.nn.Parameter(torch.randn(32, 1, 3, 3))

        def swap(module, args, new=new):
            model.csn.convs["0"] = new

        hook = model.blocks[3].register_forward_pre_hook(swap)
        if not planned:
            model.csn.walk_plan = lambda *a: None
        try:
            out = model(x)
            out.square().sum().backward()
            got.append((out.detach(), new.grad))
        finally:
            hook.remove()
            model.csn.__dict__.pop("walk_plan", None)
    assert got[0][1] is not None
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_planned_training_step_on_cuda_equals_the_general_one(backend, amp):
    """A recorded pass's plan on the GPU's kernels: the general walk's logits bit for bit,
    and its gradients (to rounding: the backward through the backbone's attention and the
    Triton backward's fp32 atomics need not add up in the same order twice)."""
    from dtl_kernels.ops import side

    x = torch.randn(4, 3, 32, 32, device="cuda")
    if backend != "auto" and not side.BACKENDS[backend].runs(x):
        pytest.skip(side.BACKENDS[backend].why_not(x))
    model = _vit(conv_kernel=3, adapt_from=3).cuda().train()
    model.csn.backend = backend
    got = []
    for planned in (True, False):
        if not planned:
            model.csn.walk_plan = lambda *a: None
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().sum().backward()
        got.append((out.detach(), [p.grad for p in model.csn.parameters()]))
        model.csn.__dict__.pop("walk_plan", None)
    assert torch.equal(got[0][0], got[1][0])
    for a, b in zip(got[0][1], got[1][1], strict=True):
        torch.testing.assert_close(a, b)
    assert any(plan and plan.grad for plan in model.csn._plans.values())  # it was planned
