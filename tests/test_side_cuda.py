"""The CUDA C++ side op (csrc/cuda/side.cu).

Without a GPU (this machine, CI) the checks are: the CUDA extension was built when it
should have been and imports; the CUDA kernels are registered for the
``dtl_kernels::side_forward`` / ``side_backward`` schemas and are in the binary; and the
registered host functions run and reject bad inputs (called straight at the CUDA
dispatch key with CPU tensors: every input check fires before any GPU work).

The device code itself is also run without a GPU: tests/cuda_emu/ compiles the kernels
of side.cu, unchanged, as host C++ against a small emulation of the CUDA built-ins (a
std::thread per CUDA thread, std::barrier for ``__syncthreads``, poisoned shared memory),
with the launch configuration of the host functions mirrored, and the results are
compared with the reference. It checks indexing, tiling, halos, shared-memory use and the
partial sums; it cannot check what only a GPU shows (races between warps, the compiled
code's speed, launch limits).

With a GPU, the kernels are compared with the float64 reference, forward and backward,
in float32 / bfloat16 / float16 / float64, on odd shapes, strided inputs and saturated θ,
and their backward is checked bitwise deterministic. ``torch.cuda.is_available()`` is
called inside the tests only.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

import dtl_kernels
from dtl_kernels.ops import _ext, reference, side

PKG_DIR = os.path.dirname(dtl_kernels.__file__)
OPS = ("side_forward", "side_backward")
KERNELS = (
    b"fwd_rows_kernel",
    b"fwd_conv_kernel",
    b"dt_rows_kernel",
    b"dt_conv_kernel",
    b"du_rows_kernel",
    b"du_conv_kernel",
    b"sum_partials_kernel",
)


def _cuda_expected() -> bool:
    """Whether setup.py builds the CUDA extension here (its DTL_KERNELS_CUDA=auto rule)."""
    if os.environ.get("DTL_KERNELS_CUDA", "auto").strip() == "0" or torch.version.cuda is None:
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


def _cuda_so() -> list[str]:
    return glob.glob(os.path.join(PKG_DIR, "_C_cuda*.so")) + glob.glob(
        os.path.join(PKG_DIR, "_C_cuda*.pyd")
    )


def _need_cuda_build():
    if not _ext.cuda_built():
        pytest.skip(f"the CUDA extension is not built here ({_ext.CUDA_ERROR})")


# ------------------------------------------------------------------------------------
# Checks that need no GPU
# ------------------------------------------------------------------------------------


def test_cuda_extension_built_and_imports():
    libs = _cuda_so()
    if not libs and not _cuda_expected():
        pytest.skip("no CUDA toolkit / CUDA build of torch: the CUDA extension is not built")
    assert libs, "setup.py should have built dtl_kernels._C_cuda (toolkit and CUDA torch found)"
    assert _ext.cuda_built(), f"dtl_kernels._C_cuda does not import: {_ext.CUDA_ERROR}"


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    _need_cuda_build()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dtl_kernels::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dtl_kernels::{op}", "CPU")


def test_cuda_kernels_in_binary():
    """The device code was compiled in (kernel names of the host-side launch stubs)."""
    _need_cuda_build()
    data = b"".join(open(p, "rb").read() for p in _cuda_so())
    missing = [k.decode() for k in KERNELS if k not in data]
    assert not missing, f"kernels missing from {_cuda_so()}: {missing}"


def test_schemas():
    _need_cuda_build()
    fwd = str(torch.ops.dtl_kernels.side_forward.default._schema)
    bwd = str(torch.ops.dtl_kernels.side_backward.default._schema)
    assert "Tensor? conv_weight, int grid_h, int grid_w, int num_prefix, float beta" in fwd
    assert bwd.endswith("-> (Tensor, Tensor, Tensor)")


def _call_cuda_kernel(op, *args):
    """Run the CUDA registration of ``op`` whatever the inputs' device (here: CPU tensors,
    so only its host-side input checks can run)."""
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return getattr(torch.ops.dtl_kernels, op).default.redispatch(ks, *args)


def _small(dtype=torch.float32, k=3):
    y = torch.zeros(2, 7, 16, dtype=dtype)
    taps = torch.zeros(2, 7, 4, dtype=dtype)
    ups = torch.zeros(16, 4, dtype=dtype)
    w = torch.zeros(16, 1, k, k, dtype=dtype) if k else None
    return y, taps, ups, w


@pytest.mark.parametrize("op", OPS)
def test_cuda_host_checks_reject_cpu_tensors(op):
    _need_cuda_build()
    y, taps, ups, w = _small()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _call_cuda_kernel(op, y, taps, ups, w, 2, 3, 1, 100.0)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16, bfloat16 or float64"):
        _call_cuda_kernel(op, y.int(), taps, ups, w, 2, 3, 1, 100.0)


# ------------------------------------------------------------------------------------
# The device code on the host (tests/cuda_emu): no GPU needed
# ------------------------------------------------------------------------------------

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")
KERNELS_CUH = os.path.join(os.path.dirname(PKG_DIR), "csrc", "cuda", "side_kernels.cuh")
EMU_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The kernels of side_kernels.cuh, unchanged, built as host code with the emulation."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not os.path.exists(KERNELS_CUH):
        pytest.skip("needs a C++20 compiler and the csrc/ sources")
    out = tmp_path_factory.mktemp("cuda_emu")
    exe = out / "driver"
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    proc = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-O1",
            "-pthread",
            f"-I{EMU_DIR}",
            f"-I{os.path.dirname(KERNELS_CUH)}",
            f"-I{torch_inc}",
            os.path.join(EMU_DIR, "driver.cpp"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"the emulated kernels do not compile:\n{proc.stderr[-4000:]}"
    return exe


def _emulate(exe, shape, beta, dtype, sms, scale, tmp_path):
    """Run the emulated kernels; returns (out, grad_taps, grad_ups[, grad_conv]) and the
    inputs (rounded to ``dtype``, held in float64)."""
    import numpy as np

    bsz, prefix, grid, d, kw, k = shape
    # the file holds float32: round there first, then to dtype (the kernels see these values)
    y, taps, ups, w, grad = (
        t.float().to(dtype).double() if t is not None else None
        for t in _case_inputs(shape, torch.float64, "cpu", scale=scale)
    )
    n = y.shape[1]
    gh, gw = grid if k else (0, 0)
    inp, res = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(
            np.array(
                [bsz, n, d, kw, k, prefix, gh, gw, sms, EMU_DTYPES[dtype]], dtype=np.int64
            ).tobytes()
        )
        f.write(np.array([beta], dtype=np.float64).tobytes())
        for t in (y, taps, ups, w if k else torch.zeros(0), grad):
            f.write(t.float().numpy().tobytes())
    proc = subprocess.run(
        [str(exe), str(inp), str(res)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    data = torch.from_numpy(np.fromfile(res, dtype=np.float64).copy())
    shapes = [y.shape, taps.shape, ups.shape] + ([w.shape] if k else [])
    outs, at = [], 0
    for s in shapes:
        size = int(torch.Size(s).numel())
        outs.append(data[at : at + size].view(s))
        at += size
    return outs, (y, taps, ups, w, grad)


# (shape as SHAPES, beta, dtype, sms, scale): sms sets how many blocks the backward's
# deterministic reduction uses, so several row tiles per block and several d chunks occur.
EMU_CASES = [
    ((2, 0, 7, 24, 2, 0), 1.0, torch.float32, 1, 0.3),
    ((2, 0, 37, 40, 6, 0), 100.0, torch.float32, 2, 0.3),
    ((1, 1, (2, 3), 24, 6, 3), 100.0, torch.float32, 1, 0.3),
    ((2, 5, (4, 8), 40, 6, 4), 100.0, torch.float32, 3, 0.3),
    ((1, 1, (6, 6), 24, 2, 4), 1.0, torch.float32, 1, 0.3),
    ((1, 0, (1, 1), 24, 2, 3), 1.0, torch.float32, 1, 0.3),
    ((1, 0, (9, 11), 33, 5, 5), 100.0, torch.float32, 2, 0.3),
    ((1, 2, (3, 4), 17, 3, 7), 1.0, torch.float32, 1, 0.3),
    ((2, 1, (10, 3), 70, 12, 3), 100.0, torch.float32, 1, 1e3),  # saturated θ
    ((1, 1, (5, 5), 40, 6, 3), 100.0, torch.float64, 1, 0.3),
    ((1, 1, (5, 5), 40, 6, 5), 100.0, torch.float16, 1, 0.3),
    ((2, 0, 19, 40, 6, 0), 100.0, torch.bfloat16, 1, 0.3),
    ((1, 0, (4, 5), 24, 128, 4), 1.0, torch.float32, 1, 0.3),  # K at its limit
    # several row tiles, channel steps and partial slots per launch: rows 1200 (19 tiles of
    # the ∂U kernel over 8 slots), d = 200 (4 forward chunks, 2 ∂T steps)
    ((8, 0, 150, 32, 2, 0), 100.0, torch.float32, 4, 0.3),
    ((3, 0, 70, 200, 24, 0), 100.0, torch.float32, 2, 0.3),
    # multi-tile grids: forward tiles 8×11 (2×2), backward tiles 8×7 (2×3), halos crossing
    # tile edges, 5 prefix rows, d = 72 (3 forward chunks of 32, 2 backward of 64)
    ((2, 5, (16, 21), 72, 12, 3), 100.0, torch.float32, 4, 0.3),
    ((1, 1, (16, 21), 40, 6, 6), 1.0, torch.float32, 2, 0.3),
    ((2, 0, (11, 9), 36, 8, 2), 100.0, torch.bfloat16, 3, 0.3),
    ((1, 2, (9, 17), 20, 10, 5), 100.0, torch.float64, 2, 0.3),
]


@pytest.mark.parametrize(
    "case",
    EMU_CASES,
    ids=lambda c: (
        "B{}p{}g{}d{}K{}k{}".format(*c[0])
        + f"-b{c[1]:g}-{str(c[2])[6:]}-sm{c[3]}"
        + ("-saturated" if c[4] > 1 else "")
    ),
)
def test_cuda_kernels_emulated_on_host(emulator, case, tmp_path):
    shape, beta, dtype, sms, scale = case
    ours, (y, taps, ups, w, grad) = _emulate(emulator, shape, beta, dtype, sms, scale, tmp_path)
    prefix, grid = shape[1], shape[2]
    exact = _reference(y, taps, ups, w, grad, beta, grid, prefix, torch.float64)
    torch_lp = _reference(y, taps, ups, w, grad, beta, grid, prefix, dtype)
    del exact[1], torch_lp[1]  # grad_y is G itself: not computed by side_backward
    names = ["out", "grad_taps", "grad_ups", "grad_conv"]
    for nm, e, t, o in zip(names, exact, torch_lp, ours, strict=False):
        assert torch.isfinite(o).all(), nm
        err = (o - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        tol = _tolerance(err_torch, e, dtype, saturated=scale > 1)
        assert err <= tol, f"{nm}: error {err:.3e} > {tol:.3e} (torch at {dtype}: {err_torch:.3e})"


# ------------------------------------------------------------------------------------
# GPU checks (skipped without a GPU)
# ------------------------------------------------------------------------------------


def _need_gpu():
    _need_cuda_build()
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible): CUDA kernels compiled but not run here")
    # the float32 reference must be exact float32 (cuDNN convolutions default to TF32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


# (B, prefix, grid or N, d, K, k): rows 1, 7, 37, 197, 1023; d not a power of two
SHAPES = [
    (2, 0, 1, 24, 2, 0),
    (2, 0, 7, 40, 6, 0),
    (3, 0, 197, 100, 24, 0),
    (1, 0, (1, 1), 24, 2, 3),
    (2, 1, (2, 3), 40, 6, 3),
    (2, 5, (4, 8), 72, 6, 4),
    (1, 1, (14, 14), 100, 24, 5),
    (3, 5, (16, 21), 40, 4, 3),
    (2, 0, (5, 7), 130, 48, 4),
    (1, 0, (9, 17), 33, 128, 7),
    # several tiles per block / program, several channel steps and partial slots: the
    # ViT-B/16 training shape at batch 8, and a 16×21 grid (multi-tile halos)
    (8, 1, (14, 14), 768, 24, 3),
    (8, 0, 197, 768, 24, 0),
    (3, 5, (16, 21), 200, 12, 5),
]
FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _tolerance(err_torch: float, exact: torch.Tensor, dtype, saturated: bool) -> float:
    """One rule for the emulator and the GPU: a multiple of PyTorch's own error at ``dtype``
    plus a floor. Saturated θ (|h| ~ 1e3 built from large terms): the few h near 0, where θ'
    moves by ~β/2 per unit of h, carry rounding that depends on the summation order."""
    multiple = 10 if saturated else 4
    return multiple * err_torch + FLOOR[dtype] * max(1.0, exact.abs().max().item())


def _case_inputs(shape, dtype, device, scale=0.3, seed=0):
    bsz, prefix, grid, d, kw, k = shape
    n = prefix + grid[0] * grid[1] if isinstance(grid, tuple) else grid
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    y, taps, ups = rnd(bsz, n, d), rnd(bsz, n, kw) * scale, rnd(d, kw) * 0.3 / (kw / 6) ** 0.5
    w = rnd(d, 1, k, k) / k if k else None
    grad = rnd(bsz, n, d)
    return [t.to(device) if t is not None else None for t in (y, taps, ups, w, grad)]


def _reference(y, taps, ups, w, grad, beta, grid, prefix, dtype):
    leaves = [
        t.detach().to(dtype).requires_grad_() if t is not None else None for t in (y, taps, ups, w)
    ]
    out = reference.side_add(*leaves[:3], beta, leaves[3], grid if w is not None else None, prefix)
    wanted = [t for t in leaves if t is not None]
    return [out.detach()] + list(torch.autograd.grad(out, wanted, grad.to(dtype)))


def _cuda_op(y, taps, ups, w, grad, beta, grid, prefix, dtype, strided=False):
    cast = [t.to(dtype) if t is not None else None for t in (y, taps, ups, w, grad)]
    if strided:  # same values, non-contiguous y / taps / grad (unit last stride) and ups
        cast[0] = torch.cat([cast[0], cast[0]], dim=-1)[..., : y.shape[-1]]
        cast[1] = cast[1].transpose(0, 1).contiguous().transpose(0, 1)
        cast[2] = cast[2].t().contiguous().t()
        cast[4] = torch.cat([cast[4], cast[4]], dim=-1)[..., : y.shape[-1]]
    gh, gw = grid if w is not None else (0, 0)
    args = (cast[1], cast[2], cast[3], gh, gw, prefix, beta)
    out = torch.ops.dtl_kernels.side_forward(cast[0], *args)
    gt, gu, gc = torch.ops.dtl_kernels.side_backward(cast[4], *args)
    return [out, cast[4]] + [gt, gu] + ([gc] if w is not None else [])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("beta", [1.0, 100.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}p{}g{}d{}K{}k{}".format(*s))
def test_cuda_matches_reference(shape, beta, dtype):
    _need_gpu()
    _check_against_reference(shape, beta, dtype, strided=False, scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", ["strided", "saturated"])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[5], SHAPES[6], SHAPES[10]])
def test_cuda_strided_and_saturated(shape, flags):
    _need_gpu()
    _check_against_reference(
        shape,
        100.0,
        torch.float32,
        strided=flags == "strided",
        scale=1e3 if flags == "saturated" else 0.3,
    )


def _check_against_reference(shape, beta, dtype, strided, scale):
    prefix, grid = shape[1], shape[2]
    y, taps, ups, w, grad = _case_inputs(shape, dtype, "cuda", scale=scale)
    low = [t.to(dtype) if t is not None else None for t in (y, taps, w)]
    if not side.BACKENDS["cuda"].fits(low[0], low[1], low[2], grid, prefix):
        # beyond this GPU's shared memory (K = 128, k = 7 in float64 on an H100): a clear
        # error, never a launch, and `auto` picks another backend
        with pytest.raises(RuntimeError, match="shared memory"):
            _cuda_op(y, taps, ups, w, grad, beta, grid, prefix, dtype, strided=strided)
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("DTL_KERNELS_BACKEND", raising=False)
            assert side.select(low[0], "auto", low[1], low[2], grid, prefix) != "cuda"
        return
    exact = _reference(y, taps, ups, w, grad, beta, grid, prefix, torch.float64)
    torch_lp = _reference(y, taps, ups, w, grad, beta, grid, prefix, dtype)
    ours = _cuda_op(y, taps, ups, w, grad, beta, grid, prefix, dtype, strided=strided)
    names = ["out", "grad_y", "grad_taps", "grad_ups", "grad_conv"]
    for nm, e, t, o in zip(names, exact, torch_lp, ours, strict=False):
        assert o.dtype == dtype and o.shape == e.shape, nm
        assert torch.isfinite(o).all(), nm
        err = (o.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        tol = _tolerance(err_torch, e, dtype, saturated=scale > 1)
        assert err <= tol, f"{nm}: error {err:.3e} > {tol:.3e} (torch at {dtype}: {err_torch:.3e})"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[6], SHAPES[7], SHAPES[10], SHAPES[12]])
def test_cuda_backward_deterministic(shape):
    _need_gpu()
    y, taps, ups, w, grad = _case_inputs(shape, torch.float32, "cuda")
    runs = [
        _cuda_op(y, taps, ups, w, grad, 100.0, shape[2], shape[1], torch.float32) for _ in range(3)
    ]
    for a, b in zip(runs[0], runs[1], strict=False):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2], strict=False):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_backend_autograd_and_opcheck():
    """End to end through the dispatch (``backend="cuda"``) and the registered autograd."""
    _need_gpu()
    from dtl_kernels.ops import side

    shape = SHAPES[5]
    y, taps, ups, w, grad = _case_inputs(shape, torch.float32, "cuda")
    leaves = [t.float().requires_grad_() for t in (y, taps, ups, w)]
    out = side.side_add(*leaves[:3], 100.0, leaves[3], shape[2], shape[1], backend="cuda")
    out.backward(grad.float())
    exact = _reference(y, taps, ups, w, grad, 100.0, shape[2], shape[1], torch.float64)
    for e, t in zip(exact[1:], leaves, strict=False):
        torch.testing.assert_close(t.grad.double(), e, rtol=1e-4, atol=1e-4)
    args = (y.float(), taps.float(), ups.float(), w.float(), 4, 8, 5, 100.0)
    torch.library.opcheck(
        torch.ops.dtl_kernels.side_forward.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.gpu
def test_cuda_rejects_mixed_devices_and_bad_grid():
    _need_gpu()
    y, taps, ups, w = (t.cuda() for t in _small())
    with pytest.raises(RuntimeError, match="patch grid"):
        torch.ops.dtl_kernels.side_forward(y, taps, ups, w, 3, 3, 1, 100.0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.dtl_kernels.side_forward(y, taps.cpu(), ups, w, 2, 3, 1, 100.0)
