"""The CUDA C++ side op (csrc/cuda/side.cu).

Without a GPU (this machine, CI) the checks are: the CUDA extension was built when it
should have been and imports; the CUDA kernels are registered for the
``dtl_kernels::side_forward`` / ``side_backward`` schemas and are in the binary; and the
registered host functions run and reject bad inputs (called straight at the CUDA
dispatch key with CPU tensors: every input check fires before any GPU work).

The device code itself is also run without a GPU: tests/cuda_emu/ compiles the kernels
of side.cu, unchanged, as host C++ against a small emulation of the CUDA built-ins (a
std::thread per CUDA thread, std::barrier for ``__syncthreads``, poisoned shared memory),
with the launch configuration of the host functions mirrored, and run over the shared case
table (``side_cases.py``: every case not marked ``big``, in its own dtype, with ``sms``
emulated SMs) under the one accuracy rule. It checks indexing, tiling, halos,
shared-memory use and the partial sums; it cannot check what only a GPU shows (races
between warps, the compiled code's speed, launch limits).

With a GPU, ``test_side_backends.py`` runs the whole table (every dtype) through the
``cuda`` backend; here the raw ops' backward is checked bitwise deterministic and the
fake kernel against the real one. ``torch.cuda.is_available()`` is called inside the tests
only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess

import pytest
import torch
from side_cases import BY_NAME, CASES, Case, compare, inputs, references

import dtl_kernels
from dtl_kernels.ops import _ext

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
EMU_MIXED = {torch.bfloat16: 4, torch.float16: 5}  # float32 y with 16-bit taps / ups


def _build_emulator(out, defines=()):
    """The kernels of side_kernels.cuh, unchanged, built as host code with the emulation."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not os.path.exists(KERNELS_CUH):
        pytest.skip("needs a C++20 compiler and the csrc/ sources")
    exe = out / "driver"
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    # DTL_EMU_ASAN=1: AddressSanitizer catches a kernel reaching past the shared memory its
    # plan asks for (~2.5× slower, so not the default)
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    if os.environ.get("DTL_EMU_ASAN") != "1":
        asan = []
    proc = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-O0",
            *asan,
            *(f"-D{d}" for d in defines),
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


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The kernels as the default architectures (sm_80, sm_90) build them."""
    return _build_emulator(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture(scope="module")
def emulator_no_mma(tmp_path_factory):
    """The kernels as an architecture without bf16 mma.sync (below sm_80, e.g. a T4 with
    TORCH_CUDA_ARCH_LIST=7.5) builds them: 16-bit taps on the CUDA-core paths."""
    return _build_emulator(tmp_path_factory.mktemp("cuda_emu_no_mma"), ["DTL_EMU_NO_MMA"])


def _emulate(exe, case, tmp_path, smem_limit=0):
    """Run the emulated kernels on the case's inputs rounded to its dtype; returns (out,
    grad_taps, grad_ups[, grad_conv]) in float64 and the rounded inputs (float64).
    ``smem_limit``: the emulated device's shared memory per block (0: an H100's)."""
    import numpy as np

    # the file holds float32: round there first, then to the dtype (the kernels see these)
    values = [t.float().to(case.dtype).double() if t is not None else None for t in inputs(case)]
    y, taps, ups, w, grad = values
    gh, gw = case.conv_grid or (0, 0)
    header = [case.batch, case.tokens, case.d, case.K, case.k, case.num_prefix, gh, gw, case.sms]
    inp, res = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        code = EMU_MIXED[case.side] if case.side is not None else EMU_DTYPES[case.dtype]
        f.write(np.array(header + [code, smem_limit], dtype=np.int64).tobytes())
        f.write(np.array([case.beta], dtype=np.float64).tobytes())
        for t in (y, taps, ups, w if case.k else torch.zeros(0), grad):
            f.write(t.float().numpy().tobytes())
    proc = subprocess.run(
        [str(exe), str(inp), str(res)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    data = torch.from_numpy(np.fromfile(res, dtype=np.float64).copy())
    outs, at = [], 0
    for t in (y, taps, ups, w)[: 4 if case.k else 3]:
        outs.append(data[at : at + t.numel()].view(t.shape))
        at += t.numel()
    return outs, values


def _check_emulated(exe, case, tmp_path, smem_limit=0):
    """The emulated kernels against the float64 reference, by the shared accuracy rule."""
    ours, values = _emulate(exe, case, tmp_path, smem_limit)
    exact, at_dtype = references(case, case.dtype, values)
    del exact[1], at_dtype[1]  # grad_y is G itself: not computed by side_backward
    names = ("out", "grad_taps", "grad_ups", "grad_conv")
    ok, report = compare(case, case.dtype, ours, exact, at_dtype, names, out_dtype=torch.float64)
    assert ok, json.dumps(report, indent=1)


@pytest.mark.parametrize("case", [c for c in CASES if not c.big], ids=lambda c: c.name)
def test_cuda_kernels_emulated_on_host(emulator, case, tmp_path):
    _check_emulated(emulator, case, tmp_path)


# Swin-B stage 3's K = 72 with DTL+ k = 5, no prefix tokens (as Swin), on a small grid
SWIN_K72 = Case("k5-K72-grid6x6", 1, 0, (6, 6), 40, 72, 5)


@pytest.mark.parametrize("prefix", [0, 1], ids=["no-prefix", "prefix1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_kernels_fit_a_99kb_device(emulator, dtype, prefix, tmp_path):
    """An RTX 30 / 40, A10 or L4 (99 KB per block) at K = 72: the conv tiles shrink until
    they fit; the rows kernels count only where they run (prefix tokens), and there the rows
    ∂U keeps one taps copy (66 KB, not 110)."""
    case = dataclasses.replace(SWIN_K72, dtype=dtype, prefix=prefix)
    _check_emulated(emulator, case, tmp_path, smem_limit=99 * 1024)


@pytest.mark.parametrize("prefix", [0, 1], ids=["no-prefix", "prefix1"])
def test_cuda_plan_refuses_what_does_not_fit(emulator, prefix, tmp_path):
    """K = 72 taps do not fit a T4's 64 KB however small the tiles: the plan says so, as
    side.cu raises (and `auto` picks another backend)."""
    case = dataclasses.replace(SWIN_K72, prefix=prefix)
    with pytest.raises(AssertionError, match="bytes of shared memory, the device has"):
        _emulate(emulator, case, tmp_path, smem_limit=64 * 1024)


SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# 16-bit taps on rows, conv (k 2 … 5, prefix rows), K over 16, the fp32 mix, strided
NO_MMA_CASES = [
    "dtl-bf16", "dtl-fp16-noncontig", "k3-fp16", "k5-fp16", "k2-bf16-grid11x9",
    "k3-bf16-prefix1-K40", "mix-bf16-dtl-rows197-d100-K24", "mix-fp16-k4-prefix5-rowslice",
]  # fmt: skip


def test_no_mma_cases_are_16_bit():
    for name in NO_MMA_CASES:
        case = BY_NAME[name]
        assert not case.big and (case.dtype in SIXTEEN_BIT or case.side in SIXTEEN_BIT), name


@pytest.mark.parametrize("name", NO_MMA_CASES)
def test_cuda_kernels_without_tensor_cores_emulated(emulator_no_mma, name, tmp_path):
    """The CUDA-core fallback for 16-bit taps (no mma.sync below sm_80) against the same
    float64 reference: the default build never runs it."""
    _check_emulated(emulator_no_mma, BY_NAME[name], tmp_path)


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


def _raw_ops(case, dtype, values):
    """side_forward and side_backward on the GPU, called directly (no autograd)."""
    y, taps, ups, w, grad = (t.to("cuda", dtype) if t is not None else None for t in values)
    gh, gw = case.conv_grid or (0, 0)
    args = (taps, ups, w, gh, gw, case.num_prefix, case.beta)
    out = torch.ops.dtl_kernels.side_forward(y, *args)
    return [out, *torch.ops.dtl_kernels.side_backward(grad, *args)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["dtl-rows197-d100-K24", "k3-prefix5-grid16x21-d72", "vit-b-k3", "vit-b-dtl"]
)
def test_cuda_backward_deterministic(name):
    """Bit-identical repeats of the raw ops (fixed-order reductions, no atomics)."""
    _need_gpu()
    case = BY_NAME[name]
    values = inputs(case)
    runs = [_raw_ops(case, torch.float32, values) for _ in range(3)]
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r, strict=True))


@pytest.mark.gpu
def test_cuda_opcheck():
    """The registered fake kernel and schema agree with the CUDA kernel."""
    _need_gpu()
    case = BY_NAME["k4-prefix5-grid4x8"]
    y, taps, ups, w, _ = (t.to("cuda", torch.float32) for t in inputs(case))
    args = (y, taps, ups, w, 4, 8, 5, 100.0)
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
