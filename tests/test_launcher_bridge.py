"""``dtl_kernels._C_bind.register_launchers`` (csrc/bind/launcher_bridge.cpp): Python launchers
as the CPU / CUDA kernels of ops with the side-op schema, called without torch.library's
boxing. Probed with ops of its own (the Triton ops are covered in test_side_triton.py):
what the launcher receives (the call's key among it), what comes back, errors and
refusals."""

from __future__ import annotations

import threading

import pytest
import torch

from dtl_kernels.ops import _ext

pytestmark = pytest.mark.skipif(_ext.BINDING is None, reason=f"no _C_bind: {_ext.BINDING_ERROR}")

SCHEMA = (
    "(Tensor y, Tensor taps, Tensor ups, Tensor? conv_weight, int grid_h, int grid_w, "
    "int num_prefix, float beta)"
)
_LIB = torch.library.Library("dtl_kernels", "FRAGMENT")  # kept alive: the ops stay defined
_defined: dict[str, dict] = {}


def probe(name: str, forward, backward) -> dict:
    """Defines ``dtl_kernels::<name>_fwd`` / ``_bwd`` with the side-op schema and registers
    ``forward`` / ``backward`` as their launchers; returns the ops."""
    if name not in _defined:
        _LIB.define(f"{name}_fwd{SCHEMA} -> Tensor")
        _LIB.define(f"{name}_bwd{SCHEMA} -> (Tensor, Tensor, Tensor)")
        _ext.BINDING.register_launchers(f"{name}_fwd", forward, f"{name}_bwd", backward)
        ns = torch.ops.dtl_kernels
        _defined[name] = dict(fwd=getattr(ns, f"{name}_fwd").default,
                              bwd=getattr(ns, f"{name}_bwd").default)  # fmt: skip
    return _defined[name]


seen: list[tuple] = []


def _fwd(*args):
    seen.append(args)
    y, taps, ups, conv, gh, gw, npre, beta, key = args
    return y + (taps @ ups.t()) * beta


def _bwd(*args):
    seen.append(args)
    g, taps, ups, conv, gh, gw, npre, beta, key = args
    return g @ ups, g.flatten(0, 1).t() @ taps.flatten(0, 1), g.new_empty((0,))


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 5, generator=gen),
            torch.randn(4, 5, generator=gen))  # fmt: skip


def test_launcher_gets_the_arguments_and_its_result_comes_back():
    ops = probe("bridge_probe", _fwd, _bwd)
    y, taps, ups = _tensors()
    conv = torch.ones(4, 1, 3, 3)
    seen.clear()
    out = ops["fwd"](y, taps, ups, None, 7, 8, 9, 0.5)
    assert torch.equal(out, y + (taps @ ups.t()) * 0.5)
    got = seen[-1]
    assert got[0] is y and got[1] is taps and got[2] is ups  # the same Python objects
    assert got[3] is None and got[4:7] == (7, 8, 9) and got[7] == 0.5
    assert [type(v) for v in got[4:]] == [int, int, int, float, bytes]  # the last: the key
    ops["fwd"](y, taps, ups, conv, 1, 2, 3, 4.0)
    assert seen[-1][3] is conv and seen[-1][7] == 4.0
    g = torch.randn(2, 3, 4)
    gt, gu, gw = ops["bwd"](g, taps, ups, None, 0, 0, 1, 1.0)
    assert torch.equal(gt, g @ ups) and gu.shape == (4, 5) and gw.numel() == 0


def test_launcher_exceptions_reach_the_caller_unchanged():
    def fwd_raises(*args):
        raise KeyError("launcher said no")

    def bwd_raises(*args):
        raise ZeroDivisionError("backward launcher said no")

    ops = probe("bridge_raises", fwd_raises, bwd_raises)
    y, taps, ups = _tensors()
    with pytest.raises(KeyError, match="launcher said no"):
        ops["fwd"](y, taps, ups, None, 0, 0, 1, 1.0)
    with pytest.raises(ZeroDivisionError, match="backward launcher said no"):
        ops["bwd"](y, taps, ups, None, 0, 0, 1, 1.0)
    # from another thread too (a backward may run on the autograd engine's device threads)
    caught = []

    def run():
        try:
            ops["bwd"](y, taps, ups, None, 0, 0, 1, 1.0)
        except ZeroDivisionError as e:
            caught.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert len(caught) == 1 and "backward launcher said no" in str(caught[0])
    # and the interpreter is fine afterwards
    fwd = probe("bridge_probe", _fwd, _bwd)["fwd"]
    assert torch.equal(fwd(y, taps, ups, None, 0, 0, 1, 0.0), y)


def test_results_of_the_wrong_type_are_refused_by_name():
    ops = probe("bridge_wrong", lambda *a: 3, lambda *a: [a[0], a[1], a[2]])
    y, taps, ups = _tensors()
    with pytest.raises(TypeError, match=r"bridge_wrong_fwd.*returned int for the output"):
        ops["fwd"](y, taps, ups, None, 0, 0, 1, 1.0)
    with pytest.raises(TypeError, match=r"bridge_wrong_bwd.*tuple of three tensors, got list"):
        ops["bwd"](y, taps, ups, None, 0, 0, 1, 1.0)
    ops = probe("bridge_wrong2", _fwd, lambda *a: (a[0], None, a[1]))
    with pytest.raises(TypeError, match=r"bridge_wrong2_bwd.*NoneType for grad_ups"):
        ops["bwd"](y, taps, ups, None, 0, 0, 1, 1.0)


def test_registration_is_checked():
    register = _ext.BINDING.register_launchers
    probe("bridge_probe", _fwd, _bwd)
    with pytest.raises(RuntimeError, match=r"bridge_probe_bwd already has a launcher"):
        register("other_fwd", _fwd, "bridge_probe_bwd", _bwd)
    with pytest.raises(RuntimeError, match=r"bridge_probe_bwd already has a launcher"):
        register("bridge_probe_bwd", _fwd, "bridge_probe_fwd", _bwd)
    with pytest.raises(ValueError, match="must differ"):
        register("x_fwd", _fwd, "x_fwd", _bwd)
    with pytest.raises(ValueError, match="unqualified op name"):
        register("dtl_kernels::x_fwd", _fwd, "x_bwd", _bwd)
    with pytest.raises(ValueError, match="unqualified op name"):
        register("", _fwd, "x_bwd", _bwd)
    with pytest.raises(TypeError, match="must be str"):
        register(3, _fwd, "x_bwd", _bwd)
    with pytest.raises(TypeError, match="must be callable"):
        register("x_fwd", None, "x_bwd", _bwd)
    with pytest.raises(TypeError, match="takes 4 or 5 arguments"):
        register("x_fwd", _fwd)
    with pytest.raises(TypeError, match="cpu must be a bool"):
        register("x_fwd", _fwd, "x_bwd", _bwd, 1)
    # an op with kernels of its own keeps them (a review's fuzzing replaced side_forward's)
    with pytest.raises(RuntimeError, match="side_forward already has a kernel of its own"):
        register("side_forward", _fwd, "side_backward", _bwd)


def _key_of(op: str, *args) -> bytes:
    seen.clear()
    probe("bridge_probe", _fwd, _bwd)[op](*args)
    return seen[-1][8]


def test_the_key_tells_calls_apart_by_everything_but_the_data():
    """Two calls get equal keys exactly when they differ in the tensors' data alone: every
    size, stride, dtype, the conv's presence and shape, each int and β change the key, and
    the forward's key is never the backward's."""
    y, taps, ups = _tensors()
    conv = torch.ones(4, 1, 3, 3)
    call = (y, taps, ups, None, 2, 3, 1, 0.5)
    key = _key_of("fwd", *call)
    y2, taps2, ups2 = _tensors(seed=1)  # other data, the same metadata
    assert _key_of("fwd", y2, taps2, ups2, None, 2, 3, 1, 0.5) == key
    assert _key_of("fwd", *call) == key
    wide = torch.randn(2, 3, 8)
    changed = {
        "y's size": (torch.randn(2, 4, 4), torch.randn(2, 4, 5), *call[2:]),
        "y's strides": (y.transpose(0, 1).contiguous().transpose(0, 1), *call[1:]),
        "y's dtype": (y.double(), *call[1:]),
        "taps' strides": (y, wide[..., :5], *call[2:]),
        "taps' dtype": (y, taps.bfloat16(), ups.bfloat16(), *call[3:]),
        "ups' size": (y, torch.randn(2, 3, 6), torch.randn(4, 6), *call[3:]),
        "ups' strides": (y, taps, torch.randn(5, 4).t(), *call[3:]),
        "a conv": (*call[:3], conv, *call[4:]),
        "grid_h": (*call[:4], 3, 3, 1, 0.5),
        "grid_w": (*call[:4], 2, 4, 1, 0.5),
        "num_prefix": (*call[:4], 2, 3, 2, 0.5),
        "beta": (*call[:7], 0.25),
        "beta's sign": (*call[:7], -0.5),
    }
    keys = {name: _key_of("fwd", *args) for name, args in changed.items()}
    keys["the backward"] = _key_of("bwd", *call)
    for name, other in keys.items():
        assert other != key, f"{name} left the key unchanged"
    assert len(set(keys.values())) == len(keys)  # and every change gives its own key
    with_conv = _key_of("fwd", *call[:3], conv, *call[4:])
    assert _key_of("fwd", *call[:3], torch.ones(4, 1, 5, 5), *call[4:]) != with_conv
    assert _key_of("fwd", *call[:3], conv.double(), *call[4:]) != with_conv


def test_triton_ops_use_the_bridge():
    pytest.importorskip("triton")
    from dtl_kernels.ops import triton_side

    assert triton_side.LAUNCHER_PATH == "bridge"
    # CPU tensors only where Triton's interpreter defined the kernels
    cpu = triton_side._interpreted()
    for op in ("triton_side_forward", "triton_side_backward"):
        for key, registered in (("CPU", cpu), ("CUDA", True)):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"dtl_kernels::{op}", key)
            assert has == registered, (op, key)


def test_registering_a_pair_again_replaces_its_launchers():
    """What a reloaded module does: the pair's kernels go, the new launchers are called."""
    ops = probe("bridge_again", _fwd, _bwd)
    y, taps, ups = _tensors()
    assert torch.equal(ops["fwd"](y, taps, ups, None, 0, 0, 1, 0.0), y)
    _ext.BINDING.register_launchers(
        "bridge_again_fwd", lambda *a: a[0] * 2, "bridge_again_bwd", lambda *a: (a[0],) * 3
    )
    assert torch.equal(ops["fwd"](y, taps, ups, None, 0, 0, 1, 0.0), y * 2)
    assert all(t is y for t in ops["bwd"](y, taps, ups, None, 0, 0, 1, 0.0))


def test_a_failed_registration_leaves_nothing_registered():
    _LIB.define(f"bridge_half_fwd{SCHEMA} -> Tensor")
    _LIB.define(f"bridge_half_bwd{SCHEMA} -> Tensor")  # not the backward's three tensors
    with pytest.raises(RuntimeError, match="schema"):
        _ext.BINDING.register_launchers("bridge_half_fwd", _fwd, "bridge_half_bwd", _bwd)
    for op in ("bridge_half_fwd", "bridge_half_bwd"):
        for key in ("CPU", "CUDA"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"dtl_kernels::{op}", key)


def test_triton_ops_agree_through_the_bridge_and_torch_library():
    """The Triton ops (interpreted on CPU tensors) give the same forward and backward
    through the bridge and through torch.library's Python kernels (``DTL_KERNELS_DIRECT=0``
    leaves ``_C_bind``, and with it the bridge, out)."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, torch\n"
        "from dtl_kernels.ops import triton_side as ts\n"
        "g = torch.Generator().manual_seed(0)\n"
        "y, t, u = (torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 4, generator=g),\n"
        "           torch.randn(16, 4, generator=g))\n"
        "w = torch.randn(16, 1, 3, 3, generator=g)\n"
        "out = torch.ops.dtl_kernels.triton_side_forward(y, t, u, w, 2, 2, 1, 3.0)\n"
        "grads = torch.ops.dtl_kernels.triton_side_backward(out, t, u, w, 2, 2, 1, 3.0)\n"
        "print(json.dumps([ts.LAUNCHER_PATH] + [x.flatten().tolist() for x in (out, *grads)]))\n"
    )
    got = {}
    for direct in ("1", "0"):
        env = {**os.environ, "TRITON_INTERPRET": "1", "DTL_KERNELS_DIRECT": direct,
               "PYTHONWARNINGS": "ignore"}  # fmt: skip
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        path, *values = json.loads(run.stdout.strip().splitlines()[-1])
        got[path] = values
    assert set(got) == {"bridge", "torch.library"}
    assert got["bridge"] == got["torch.library"]
