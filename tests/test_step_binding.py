"""The direct entry to ``side_step`` (``dtl_kernels._C_bind``, ``csrc/bind``): the same
dispatcher op as ``torch.ops`` — values, float64 gradients, dispatch modes and fake tensors
see it — with its own argument checks, and the fall-back to ``torch.ops`` wherever
``__torch_function__`` is asked for (a tensor subclass, a torch-function mode)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dtl_kernels.ops import _ext, compiled_side, step  # noqa: F401  (fake kernels)

pytestmark = pytest.mark.skipif(not _ext.cpu_built(), reason="the CPU extension is not built")
DT = torch.float64
OP = torch.ops.dtl_kernels.side_step.default


def _args(conv: bool, dtype=DT):
    g = torch.Generator().manual_seed(3)
    b, n, d, k_cols = 2, 7, 5, 6
    y = torch.randn(b, n, d, dtype=dtype, generator=g)
    taps = torch.randn(b, n, k_cols, dtype=dtype, generator=g)
    zs = [torch.randn(b, n, d, dtype=dtype, generator=g) for _ in range(2)]
    downs = [torch.randn(2, d, dtype=dtype, generator=g) for _ in range(2)]
    ups = torch.randn(d, k_cols, dtype=dtype, generator=g)
    w = torch.randn(d, 1, 3, 3, dtype=dtype, generator=g) if conv else None
    grid = (2, 3, 1) if conv else (0, 0, 0)
    return [y, taps, zs, downs, 1, ups, w, *grid, 2.5, 0, None]


def _direct(*a):
    return _ext.BINDING.side_step(*a)


def test_the_direct_entry_is_built_beside_the_cpu_kernels():
    assert _ext.BINDING is not None, _ext.BINDING_ERROR


@pytest.mark.parametrize("conv", [False, True], ids=["dtl", "dtl+"])
def test_the_direct_entry_is_the_same_op_forward_and_backward(conv):
    args = _args(conv)
    for got, want in zip(_direct(*args), OP(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    def direct(y, taps, z0, z1, a0, a1, ups, *w):
        a = list(args)
        a[:7] = [y, taps, [z0, z1], [a0, a1], 1, ups, w[0] if w else None]
        return _direct(*a)

    leaves = [args[0], args[1], *args[2], *args[3], args[5]] + ([args[6]] if conv else [])
    leaves = [t.clone().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(direct, leaves)


def test_side_step_calls_the_direct_entry(monkeypatch):
    calls, real = [], _ext.BINDING

    class Spy:
        @staticmethod
        def side_step(*a):
            calls.append(a)
            return real.side_step(*a)

    args = _args(False)
    monkeypatch.setattr(_ext, "BINDING", Spy())
    step.side_step(*args[:7], None, 0, 2.5, "cpu")
    assert len(calls) == 1


def test_dispatch_modes_see_the_op_and_fake_tensors_take_torch_ops():
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    args = _args(True)
    with Record():
        _direct(*args)
    direct, seen[:] = list(seen), []
    with Record():
        OP(*args)
    assert direct == seen and len(seen) == 3  # the step's own operations, as torch.ops's
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[2:4] = [[mode.from_tensor(t) for t in ts] for ts in args[2:4]]
        assert _direct(*fake) is NotImplemented  # a subclass: torch.ops takes it
        out, taps = step.side_step(*fake[:7], (2, 3), 1, 2.5, "cpu")
    assert out.shape == args[0].shape and taps.shape == args[1].shape


class _Tagged(torch.Tensor):
    """A subclass with its own ``__torch_function__``: ``torch.ops`` honours it."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_falls_back_to_torch_ops():
    args = _args(False)
    want = OP(*args)
    tagged = list(args)
    tagged[2] = [args[2][0], args[2][1].as_subclass(_Tagged)]  # one list element is enough
    assert _direct(*tagged) is NotImplemented
    _Tagged.seen.clear()
    got = step.side_step(*tagged[:7], None, 0, 2.5, "cpu")
    assert OP in _Tagged.seen
    torch.testing.assert_close(got[0].as_subclass(torch.Tensor), want[0], rtol=0, atol=0)

    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Watch():
        assert _direct(*args) is NotImplemented
        step.side_step(*args[:7], None, 0, 2.5, "cpu")
    assert OP in seen


@pytest.mark.parametrize(
    "index, value",
    [
        (4, np.int64(1)),
        (4, torch.tensor(1)),
        (11, False),
        (10, np.float32(2.5)),
        (10, torch.tensor(2.5)),
        (10, True),
    ],
    ids=["numpy-int", "tensor-int", "bool-int", "numpy-float", "tensor-float", "bool-float"],
)
def test_scalars_that_are_not_plain_go_to_torch_ops(index, value):
    """torch.ops converts them (as the op always took them); the direct entry leaves them."""
    args = _args(False)
    args[index] = value
    assert _direct(*args) is NotImplemented
    plain = _args(False)
    plain[index] = type(plain[index])(value)  # the same value as a Python int / float
    torch.testing.assert_close(OP(*args)[0], OP(*plain)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "index, value",
    [(0, 1.0), (2, torch.zeros(2)), (3, [None, None]), (4, 1.5), (7, 2**70), (12, "bf16")],
)
def test_bad_arguments_go_to_torch_ops_which_refuses_them(index, value):
    args = _args(False)
    args[index] = value
    assert _direct(*args) is NotImplemented
    with pytest.raises((TypeError, RuntimeError)):
        OP(*args)


@pytest.mark.parametrize(
    "index, value, match",
    [(11, 7, "kernel must be 0 or 1"), (4, 99, "first_col must be in 0..6, got 99")],
)
def test_the_ops_own_checks_raise_through_the_direct_entry(index, value, match):
    args = _args(False)
    args[index] = value
    with pytest.raises(RuntimeError, match=match):
        _direct(*args)
    with pytest.raises(TypeError, match="takes 13 positional arguments, got 12"):
        _direct(*_args(False)[:12])


def test_lists_may_be_tuples():
    args = _args(True)
    tupled = [*args[:2], tuple(args[2]), tuple(args[3]), *args[4:]]
    for got, want in zip(_direct(*tupled), OP(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_16_bit_save_dtype_and_integer_beta_pass_through():
    """``save_dtype`` reaches autograd: an input that needs no gradient is saved for ∂downs
    in bfloat16 (the trunk_dtype option); the values equal torch.ops'."""
    args = _args(False, torch.float32)
    args[3] = [d.requires_grad_() for d in args[3]]  # ∂downs needs the inputs, saved
    args[10], args[12] = 3, torch.bfloat16
    saved = []

    def keep(t):
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        got = _direct(*args)
    assert torch.bfloat16 in saved
    want = OP(*args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    args[12] = None
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        _direct(*args)
    assert torch.bfloat16 not in saved


def test_the_direct_entry_can_be_left_out():
    code = (
        "import torch; from dtl_kernels.ops import _ext, step; print(_ext.BINDING, "
        "_ext.BINDING_ERROR); y = torch.zeros(1, 2, 3); t = torch.zeros(1, 2, 1); "
        "out, _ = step.side_step(y, t, [], [], 0, torch.zeros(3, 1), None, None, 0, 2.0, 'cpu'); "
        "assert out.shape == y.shape"
    )
    env = {**os.environ, "DTL_KERNELS_DIRECT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == "None left out (DTL_KERNELS_DIRECT=0)"


@pytest.mark.parametrize("conv", [False, True], ids=["dtl", "dtl+"])
def test_the_in_place_step_equals_the_step(conv):
    """side_step_ (direct entry and torch.ops): side_step's out, its taps written in place."""
    args = _args(conv)
    want_out, want_taps = OP(*args)
    for call in (_ext.BINDING.side_step_, torch.ops.dtl_kernels.side_step_.default):
        taps = args[1].clone()
        with torch.no_grad():
            out = call(args[0], taps, *args[2:12])
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(taps, want_taps, rtol=0, atol=0)


def test_the_in_place_step_refuses_what_autograd_would_record_and_strided_taps():
    args = _args(False)
    leaf = args[5].clone().requires_grad_()  # ups
    with pytest.raises(RuntimeError, match="records no gradient"):
        _ext.BINDING.side_step_(*args[:5], leaf, *args[6:12])
    with torch.no_grad():
        _ext.BINDING.side_step_(*args[:5], leaf, *args[6:12])  # no_grad: allowed
    strided = args[1].transpose(0, 1).contiguous().transpose(0, 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="taps must be contiguous"):
        _ext.BINDING.side_step_(args[0], strided, *args[2:12])


def test_the_in_place_step_falls_back_to_torch_ops_and_bumps_the_version():
    class Tagged(torch.Tensor):
        pass

    args = _args(False)
    taps = args[1].clone()
    before = taps._version
    with torch.no_grad():
        assert _ext.BINDING.side_step_(args[0].as_subclass(Tagged), taps, *args[2:12]) is (
            NotImplemented
        )
        out = step.side_step_(args[0].as_subclass(Tagged), taps, *args[2:6], args[6], None, 0,
                              2.5, "cpu")  # fmt: skip
    assert isinstance(out, torch.Tensor) and taps._version > before
