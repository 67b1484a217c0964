"""The Triton side op against the reference, on CPU tensors under ``TRITON_INTERPRET=1``.

Triton decides at kernel-definition time whether a kernel is interpreted, and the whole
suite runs in one pytest process, so the interpreted checks run in ONE subprocess with
``TRITON_INTERPRET=1`` set (this file, run as ``python tests/test_side_triton.py
--worker``). It prints one JSON line per check; each pytest test below asserts one line.
The parent process never sets the variable, so other test files are unaffected.

Accuracy rule (flash-attention's): for every output (out, ∂y, ∂taps, ∂ups, ∂w) the
kernel's error against a float64 reference may be at most a small multiple of the error
of the same computation done by the PyTorch reference at the kernel's dtype, plus a floor.

The interpreter runs the kernels with small tiles (``triton_side.plan`` for a CPU device:
32-row tiles, 32-column d chunks, 3 row groups, 2 persistent forward programs), so the
cases below give programs several row tiles, d chunks, row groups and forward items.
Without a GPU, ``test_triton_kernels_compile_for_gpu`` lowers every kernel to sm_80 /
sm_90 cubin with the tiles the planner picks for the benchmark shapes, and
``test_backward_temporaries_small`` checks the planned temporaries at ViT-B / Swin-B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

# name: (B, N, d, K, beta, k, num_prefix, grid, dtype, flags)
# flags: "noncontig" (strided y / taps / ups / grad: last dims sliced or transposed),
# "rowslice" (y, taps, grad are slices along N of longer tensors: stride_b != N·stride_n),
# "saturated" (|h| ~ 1e3).
CASES: dict[str, tuple] = {
    "dtl-rows1": (2, 1, 24, 2, 1.0, 0, 0, None, "float32", ""),
    "dtl-rows7-K6-beta100": (2, 7, 24, 6, 100.0, 0, 0, None, "float32", ""),
    "dtl-rows37-d40-beta100": (3, 37, 40, 2, 100.0, 0, 0, None, "float32", ""),
    "dtl-rows37-d72-noncontig": (1, 37, 72, 6, 1.0, 0, 0, None, "float32", "noncontig"),
    "dtl-saturated": (2, 7, 24, 6, 100.0, 0, 0, None, "float32", "saturated"),
    "dtl+k3-rows1-grid1x1": (2, 1, 24, 2, 1.0, 3, 0, (1, 1), "float32", ""),
    "dtl+k3-prefix1-grid2x3": (2, 7, 24, 6, 100.0, 3, 1, (2, 3), "float32", ""),
    "dtl+k3-grid1x7": (1, 7, 17, 2, 100.0, 3, 0, (1, 7), "float32", ""),
    "dtl+k4-grid7x1": (1, 7, 24, 6, 1.0, 4, 0, (7, 1), "float32", ""),
    "dtl+k4-prefix5-grid4x8": (2, 37, 40, 6, 100.0, 4, 5, (4, 8), "float32", ""),
    "dtl+k4-prefix1-grid6x6": (1, 37, 24, 2, 1.0, 4, 1, (6, 6), "float32", ""),
    "dtl+k3-prefix5-noncontig": (1, 37, 40, 2, 100.0, 3, 5, (4, 8), "float32", "noncontig"),
    "dtl+k5-prefix1-grid3x4": (1, 13, 24, 6, 100.0, 5, 1, (3, 4), "float32", ""),
    "dtl+k3-saturated": (1, 37, 24, 6, 100.0, 3, 1, (6, 6), "float32", "saturated"),
    "dtl+k3-float16": (1, 37, 40, 6, 100.0, 3, 1, (6, 6), "float16", ""),
    "dtl+k4-bfloat16": (1, 37, 40, 6, 1.0, 4, 5, (4, 8), "bfloat16", ""),
    "dtl+k3-float64": (1, 7, 24, 6, 100.0, 3, 1, (2, 3), "float64", ""),
    "dtl-bfloat16": (2, 37, 40, 6, 100.0, 0, 0, None, "bfloat16", ""),
    # 111 rows: 4 row tiles (crossing images), 3 d chunks (72 = 32 + 32 + 8), K = 8
    "dtl-multitile-B3-d72-K8": (3, 37, 72, 8, 1.0, 0, 0, None, "float32", ""),
    # float16: the split (hi + lo) tensor-core path runs under the interpreter too
    "dtl-float16-noncontig": (2, 37, 40, 6, 100.0, 0, 0, None, "float16", "noncontig"),
    "dtl-float64-rowslice": (2, 7, 24, 6, 1.0, 0, 0, None, "float64", "rowslice"),
    "dtl+k1-prefix1-grid3x4": (2, 13, 24, 2, 100.0, 1, 1, (3, 4), "float32", ""),
    # even k = 2: no pad top / left, one row / column bottom / right; 5 images per tile
    "dtl+k2-grid5x3": (2, 15, 40, 6, 1.0, 2, 0, (5, 3), "float32", ""),
    "dtl+k4-prefix5-rowslice": (1, 37, 40, 6, 100.0, 4, 5, (4, 8), "float32", "rowslice"),
    "dtl+k3-float16-noncontig": (1, 37, 40, 6, 100.0, 3, 1, (6, 6), "float16", "noncontig"),
    "dtl+k5-prefix1-B2-K8": (2, 37, 40, 8, 100.0, 5, 1, (6, 6), "float32", ""),
}
# Extra checks of the worker, beyond accuracy.
EXTRA = (
    "deterministic",
    "opcheck-dtl",
    "opcheck-dtl+",
    "bad-inputs",
    "k-zero-width",
    "temporaries",
)

# error floors relative to max|reference| of each output, per dtype
FLOOR = {"float32": 2e-6, "float64": 1e-12, "float16": 2e-3, "bfloat16": 2e-2}
MULTIPLE = 4.0


# ------------------------------------------------------------------------------------
# The worker (runs in the subprocess, TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------


def _inputs(case, seed=0):
    bsz, n, d, kw, beta, k, prefix, grid, dtype, flags = case
    g = torch.Generator().manual_seed(seed)
    scale = 1e3 if "saturated" in flags else 0.3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    y = rnd(bsz, n, d)
    taps = rnd(bsz, n, kw) * scale
    ups = rnd(d, kw) * 0.3
    w = rnd(d, 1, k, k) * 0.3 if k else None
    grad = rnd(bsz, n, d)
    return y, taps, ups, w, grad


def _noncontig(x: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in a strided layout (checked non-contiguous)."""
    if x.dim() == 3 and how == 0:  # y, grad: a slice of a wider tensor
        big = x.new_zeros(*x.shape[:-1], x.shape[-1] + 5)
        big[..., 2 : 2 + x.shape[-1]] = x
        out = big[..., 2 : 2 + x.shape[-1]]
    elif x.dim() == 3:  # taps: last dim strided (a transposed buffer)
        out = x.transpose(1, 2).contiguous().transpose(1, 2)
    else:  # ups (d, K) as the transpose of a (K, d) buffer
        out = x.t().contiguous().t()
    assert not out.is_contiguous() and torch.equal(out, x)
    return out


def _rowslice(x: torch.Tensor) -> torch.Tensor:
    """The same values as rows 1 … N of an (B, N + 3, ·) tensor (stride_b != N·stride_n)."""
    big = x.new_zeros(x.shape[0], x.shape[1] + 3, x.shape[2])
    big[:, 1 : 1 + x.shape[1]] = x
    out = big[:, 1 : 1 + x.shape[1]]
    assert out.stride(0) != x.shape[1] * out.stride(1) and torch.equal(out, x)
    return out


def _run(fn, case, dtype, y, taps, ups, w, grad, device="cpu"):
    bsz, n, d, kw, beta, k, prefix, grid, _, flags = case
    leaves = [
        t.detach().to(device, dtype).clone().requires_grad_() if t is not None else None
        for t in (y, taps, ups, w)
    ]
    args = list(leaves)
    g = grad.to(device, dtype)
    if "noncontig" in flags:
        args[0] = _noncontig(args[0], 0)
        args[1] = _noncontig(args[1], 1)
        args[2] = _noncontig(args[2], 2)
        g = _noncontig(g, 0)
    if "rowslice" in flags:
        args[0], args[1], g = _rowslice(args[0]), _rowslice(args[1]), _rowslice(g)
    out = fn(args[0], args[1], args[2], beta, args[3], grid, prefix)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def _check_case(name, case, device="cpu"):
    from dtl_kernels.ops import reference, triton_side

    dtype = getattr(torch, case[8])
    y, taps, ups, w, grad = _inputs(case)
    exact = _run(reference.side_add, case, torch.float64, y, taps, ups, w, grad, device)
    ours = _run(triton_side.side_add, case, dtype, y, taps, ups, w, grad, device)
    torch_lp = _run(reference.side_add, case, dtype, y, taps, ups, w, grad, device)
    names = ["out", "grad_y", "grad_taps", "grad_ups", "grad_conv"]
    report, ok = {}, True
    for nm, e, o, t in zip(names, exact, ours, torch_lp, strict=False):  # DTL: no ∂w
        finite = bool(torch.isfinite(o).all())
        err = (o.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        tol = MULTIPLE * err_torch + FLOOR[case[8]] * max(1.0, e.abs().max().item())
        good = finite and o.dtype == dtype and o.shape == e.shape and err <= tol
        ok &= good
        verdict = "" if good else " FAIL"
        report[nm] = f"err {err:.2e} (torch {err_torch:.2e}, tol {tol:.2e}){verdict}"
    if "saturated" in case[9]:
        h_max = torch.matmul(taps, ups.t()).abs().max().item()
        report["saturated"] = f"theta saturates: |h| max {h_max:.0f}"
    return ok, report


def _check_extra(name):
    from dtl_kernels.ops import triton_side

    case = CASES["dtl+k4-prefix5-grid4x8"]
    if name == "deterministic":  # bitwise: fixed row-group order, no atomics
        case = CASES["dtl+k4-prefix1-grid6x6"]
        y, taps, ups, w, grad = _inputs(case)
        runs = [
            _run(triton_side.side_add, case, torch.float32, y, taps, ups, w, grad) for _ in range(2)
        ]
        same = all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
        return same, {"bitwise equal over two runs": same}
    if name.startswith("opcheck"):
        k = 3 if name.endswith("+") else 0
        c = (1, 7, 16, 2, 100.0, k, 1 if k else 0, (2, 3) if k else None, "float32", "")
        y, taps, ups, w, grad = _inputs(c)
        args = (
            y.float().requires_grad_(),
            taps.float().requires_grad_(),
            ups.float().requires_grad_(),
            w.float().requires_grad_() if k else None,
            2 if k else 0,
            3 if k else 0,
            c[6],
            100.0,
        )
        fwd = torch.ops.dtl_kernels.triton_side_forward.default
        bwd = torch.ops.dtl_kernels.triton_side_backward.default
        res = torch.library.opcheck(fwd, args)
        res2 = torch.library.opcheck(
            bwd,
            (grad.float(),)
            + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]),
        )
        ok = all(v == "SUCCESS" for v in list(res.values()) + list(res2.values()))
        return ok, {"forward": res, "backward": res2}
    if name == "bad-inputs":
        y, taps, ups, w, grad = (t.float() if t is not None else None for t in _inputs(case))
        bad = {
            "grid mismatch": lambda: triton_side.side_add(y, taps, ups, 1.0, w, (4, 7), 5),
            "no grid": lambda: triton_side.side_add(y, taps, ups, 1.0, w, None, 5),
            "ups shape": lambda: triton_side.side_add(y, taps, ups[:, :2], 1.0),
            "dtype mix": lambda: triton_side.side_add(y, taps.double(), ups, 1.0),
            "conv shape": lambda: triton_side.side_add(y, taps, ups, 1.0, w[:4], (4, 8), 5),
        }
        report = {}
        for what, fn in bad.items():
            try:
                fn()
                report[what] = "no error"
            except (ValueError, TypeError) as exc:
                report[what] = f"ok: {type(exc).__name__}"
        return all(v.startswith("ok") for v in report.values()), report
    if name == "k-zero-width":  # K = 0 taps: h = 0, out = y, zero grads
        y, taps, ups, w, grad = _inputs(case)
        y, w = y.float().requires_grad_(), w.float().requires_grad_()
        taps0 = torch.zeros(2, 37, 0, requires_grad=True)
        ups0 = torch.zeros(40, 0, requires_grad=True)
        out = triton_side.side_add(y, taps0, ups0, 100.0, w, (4, 8), 5)
        out.backward(grad.float())
        ok = torch.equal(out, y) and torch.equal(y.grad, grad.float())
        ok &= not w.grad.abs().any().item()
        return bool(ok), {"out == y": bool(torch.equal(out, y))}
    if name == "temporaries":  # the backward allocates exactly what plan() reports
        return _check_temporaries()
    raise KeyError(name)


def _check_temporaries():
    """Log the tensors side_bwd allocates (interpreted, on CPU) and compare with the
    planner's report: outputs aside, only the partial buffer and the (k², d) kernel copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dtl_kernels.ops import triton_side

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided)
                and out.dtype.is_floating_point
                and out.dim() > 0
            ):  # not the interpreter's
                self.shapes.append((tuple(out.shape), out.dtype))
            return out

    report, ok = {}, True
    for name in ("dtl+k4-prefix5-grid4x8", "dtl-rows37-d40-beta100"):
        bsz, n, d, kw, beta, k, prefix, grid, dtype, _ = CASES[name]
        y, taps, ups, w, grad = (t.float() if t is not None else None for t in _inputs(CASES[name]))
        log = Log()
        with log:
            triton_side.side_bwd(grad, taps, ups, w, *(grid or (0, 0)), prefix, beta)
        outputs = {
            ((bsz, n, kw), torch.float32),
            ((d, kw), torch.float32),
            ((d, 1, k, k) if k else (0,), torch.float32),
        }
        temps = [s for s in log.shapes if s not in outputs]
        plan = triton_side.plan(bsz, n, d, kw, k, grid, torch.float32, "cpu")
        want = [plan["temporaries"]["bwd_partials"]] + ([(k * k, d)] if k else [])
        good = sorted(s for s, _ in temps) == sorted(want)
        ok &= good
        report[name] = f"allocated {temps}, planned {want}" + ("" if good else " FAIL")
    return ok, report


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    warnings.simplefilter("ignore", RuntimeWarning)  # numpy exp overflow in the interpreter
    torch.manual_seed(0)
    for name in list(CASES) + list(EXTRA):
        t0 = time.time()
        try:
            ok, report = _check_case(name, CASES[name]) if name in CASES else _check_extra(name)
        except Exception as exc:  # reported, not raised: the other checks still run
            ok, report = False, {"error": f"{type(exc).__name__}: {exc}"}
        report["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({"name": name, "ok": ok, "report": report}, default=str), flush=True)


# ------------------------------------------------------------------------------------
# pytest side (parent process: never sets TRITON_INTERPRET)
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["name"]] = row
    if not results:
        pytest.fail(
            f"the interpreter worker produced nothing (rc {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    results["_stderr"] = proc.stderr[-4000:]
    return results


@pytest.mark.parametrize("name", list(CASES) + list(EXTRA))
def test_triton_interpreted(interpreted, name):
    row = interpreted.get(name)
    assert row is not None, f"worker did not reach {name}:\n{interpreted['_stderr']}"
    assert row["ok"], json.dumps(row["report"], indent=1)


def test_available_and_registered():
    pytest.importorskip("triton")
    from dtl_kernels.ops import triton_side

    assert triton_side.available()
    for op in ("triton_side_forward", "triton_side_backward"):
        for key in ("CUDA", "CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dtl_kernels::{op}", key), (
                op,
                key,
            )
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "dtl_kernels::triton_side_forward", "Autograd"
    )


def test_cpu_tensors_need_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs with TRITON_INTERPRET=1")
    from dtl_kernels.ops import BackendUnavailable, triton_side

    y = torch.zeros(1, 1, 16)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        triton_side.side_add(y, torch.zeros(1, 1, 2), torch.zeros(16, 2), 100.0)


# The GPU code path compiles without a GPU: Triton's ahead-of-time compiler lowers each
# kernel to cubin for sm_80 / sm_90 with the tiles plan() picks for a shape and the
# specialisation a JIT launch would apply (unit strides constant, 16-divisible ints and
# pointers marked), including the 16-bit tensor-core dots, the SFU σ, fp32 and fp64.
AOT_SHAPES = {  # B, N, d, K, k-independent; prefix / grid used when k > 0
    "vit": dict(B=32, N=197, d=768, K=24, prefix=1, grid=(14, 14)),
    "swin": dict(B=32, N=196, d=512, K=72, prefix=0, grid=(14, 14)),
    "odd": dict(B=2, N=37, d=40, K=6, prefix=5, grid=(4, 8)),  # no aligned K, d % tile != 0
}
# (launch, dtype, k, arch, shape, strided): strided = taps transposed, y rows sliced
# (no FLAT rows, no vector loads of taps)
AOT_CASES = [
    ("fwd", "bf16", 0, 90, "vit", False),
    ("fwd", "fp32", 0, 80, "vit", True),
    ("fwd", "bf16", 5, 90, "vit", False),
    ("fwd", "fp32", 3, 80, "odd", True),
    ("fwd", "fp64", 4, 80, "odd", False),
    ("bwd_taps", "bf16", 3, 90, "vit", False),
    ("bwd_taps", "fp32", 0, 90, "vit", False),
    ("bwd_taps", "fp16", 0, 80, "odd", True),
    ("bwd_taps", "fp64", 4, 80, "odd", False),
    ("bwd_ups", "bf16", 5, 90, "swin", False),
    ("bwd_ups", "fp32", 3, 80, "vit", True),
    ("bwd_ups", "fp16", 0, 90, "vit", False),
    ("bwd_ups", "fp64", 2, 80, "odd", False),
    ("sum", "fp32", 3, 90, "vit", False),
]
_AOT_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}


def _aot_runtime_ints(shape: dict, k: int, plan: dict, launch: str, strided: bool) -> dict:
    """Example values of a launch's runtime int arguments (what decides specialisation)."""
    n, d, kw = shape["N"], shape["d"], shape["K"]
    row = d + 5 if strided else d  # y / out / grad rows sliced out of wider rows
    ints = dict(R=shape["B"] * n, N=n, D=d, K=kw, groups=plan["bwd_partials"][0], KK=k * k)
    for x in "yog":
        ints.update({f"stride_{x}b": n * row, f"stride_{x}n": row, f"stride_{x}d": 1})
    if strided:  # taps as the transpose of a (B, K, N) buffer
        ints.update(stride_tb=n * kw, stride_tn=1, stride_tk=n)
    else:
        ints.update(stride_tb=n * kw, stride_tn=kw, stride_tk=1)
    names = {"fwd": ("n_dchunks", "n_items"), "bwd_ups": ("rows_per_group",)}.get(launch, ())
    if launch == "fwd" and not k:
        names = ()
    ints.update(zip(names, plan[launch]["args"], strict=True))
    return ints


@pytest.mark.parametrize("launch,dtype,k,arch,shape,strided", AOT_CASES)
def test_triton_kernels_compile_for_gpu(launch, dtype, k, arch, shape, strided):
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton interpreted")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dtl_kernels.ops import triton_side

    geo = AOT_SHAPES[shape]
    torch_dtype = _AOT_DTYPES[dtype]
    grid = geo["grid"] if k else None
    n = geo["N"] if not k else geo["prefix"] + geo["grid"][0] * geo["grid"][1]
    plan = triton_side.plan(geo["B"], n, geo["d"], geo["K"], k, grid, torch_dtype)
    cfg = plan[launch]
    fn = getattr(triton_side, cfg["kernel"])
    consts = dict(cfg["meta"])
    options = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages", 3))
    acc = "fp64" if dtype == "fp64" else "fp32"
    if launch != "sum":
        consts.update(NATIVE_DOT=dtype in ("bf16", "fp16"), FAST=dtype != "fp64", FLAT=not strided)
        if strided:
            consts["T_VEC"] = 1
    consts["ACC"] = tl.float64 if acc == "fp64" else tl.float32
    ints = _aot_runtime_ints(dict(geo, N=n), k, plan, launch, strided)
    io_ptrs = {
        "y_ptr",
        "taps_ptr",
        "ups_ptr",
        "out_ptr",
        "g_ptr",
        "gtaps_ptr",
        "gups_ptr",
        "gw_ptr",
    }
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):  # w_t, the scratch and the partials are in ACC
            sig[name] = f"*{dtype}" if name in io_ptrs else f"*{acc}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "beta":
            sig[name] = "fp32"
        elif ints[name] == 1:  # the JIT makes unit ints compile-time constants
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    assert compiled.asm.get("cubin"), "no cubin produced"
    if launch == "fwd" and k:  # the scratch slot is read back after a CTA barrier
        assert (
            compiled.asm["ptx"].count("bar.sync") + compiled.asm["ptx"].count("barrier.sync") >= 2
        )


# The backward's temporaries at the benchmark shapes (planned by the launchers' own
# planner; no GPU needed): below 10 % of y's bytes, no (d chunks, B, N, K) buffer.
TEMP_SHAPES = {
    "vit-b-dtl": (32, 197, 768, 24, 0, None),
    "vit-b-dtl+k3": (32, 197, 768, 24, 3, (14, 14)),
    "vit-b-dtl+k5": (32, 197, 768, 24, 5, (14, 14)),
    "swin-b-stage3-k5": (32, 196, 512, 72, 5, (14, 14)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(TEMP_SHAPES))
def test_backward_temporaries_small(name, dtype):
    pytest.importorskip("triton")
    from dtl_kernels.ops import triton_side

    bsz, n, d, kw, k, grid = TEMP_SHAPES[name]
    plan = triton_side.plan(bsz, n, d, kw, k, grid, dtype, "cuda", sms=132)
    y_bytes = bsz * n * d * torch.empty((), dtype=dtype).element_size()
    assert plan["y_bytes"] == y_bytes
    temps = plan["temporaries"]
    assert set(temps) == {"fwd_scratch", "bwd_partials", "w_t"}
    groups, pd, width = temps["bwd_partials"]
    assert (pd, width) == (d, kw + k * k) and 1 <= groups <= 64
    partial_bytes = 4 * groups * d * width
    w_bytes = 4 * k * k * d
    assert plan["bwd_temp_bytes"] == partial_bytes + w_bytes
    assert plan["bwd_temp_bytes"] <= 0.10 * y_bytes, (
        f"{name} {dtype}: backward temporaries {plan['bwd_temp_bytes']} B = "
        f"{plan['bwd_temp_bytes'] / y_bytes:.1%} of y"
    )
    # the ∂T reduction over d is on chip: one program per row tile covers all of d
    assert plan["bwd_taps"]["grid"] == (-(-bsz * n // plan["bwd_taps"]["meta"]["BLOCK_M"]),)


# Same checks on a GPU, compiled (not interpreted), plus ViT-B / Swin-B-sized shapes.
GPU_CASES = dict(CASES)
GPU_CASES.update(
    {
        "vit-b-dtl-fp32": (4, 197, 768, 24, 100.0, 0, 0, None, "float32", ""),
        "vit-b-dtl-bf16": (4, 197, 768, 24, 100.0, 0, 0, None, "bfloat16", ""),
        "vit-b-dtl+k3-fp32": (4, 197, 768, 24, 100.0, 3, 1, (14, 14), "float32", ""),
        "vit-b-dtl+k5-bf16": (4, 197, 768, 24, 100.0, 5, 1, (14, 14), "bfloat16", ""),
        "vit-b-dtl+k3-fp16-noncontig": (
            2,
            197,
            768,
            12,
            100.0,
            3,
            1,
            (14, 14),
            "float16",
            "noncontig",
        ),
        "vit-b-dtl+k4-bf16-rowslice": (
            2,
            197,
            768,
            24,
            100.0,
            4,
            1,
            (14, 14),
            "bfloat16",
            "rowslice",
        ),
        "swin-dtl+k5-K64": (2, 196, 512, 64, 100.0, 5, 0, (14, 14), "float32", ""),
        "swin-dtl+k5-K72-bf16": (4, 196, 512, 72, 100.0, 5, 0, (14, 14), "bfloat16", ""),
    }
)


def _need_gpu():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton interpreted")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible): compiled Triton kernels not run here")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_gpu(name):
    _need_gpu()
    ok, report = _check_case(name, GPU_CASES[name], device="cuda")
    assert ok, json.dumps(report, indent=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit-b-dtl-bf16", "vit-b-dtl+k5-bf16", "vit-b-dtl+k3-fp32"])
def test_triton_gpu_deterministic(name):
    """Bit-identical repeats (fixed reduction order, no atomics)."""
    _need_gpu()
    from dtl_kernels.ops import triton_side

    case = GPU_CASES[name]
    y, taps, ups, w, grad = _inputs(case)
    runs = [
        _run(triton_side.side_add, case, getattr(torch, case[8]), y, taps, ups, w, grad, "cuda")
        for _ in range(3)
    ]
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("k", [0, 5])
def test_triton_gpu_backward_memory(k, dtype):
    """The backward's peak memory above its inputs and outputs stays under 10 % of y."""
    _need_gpu()
    from dtl_kernels.ops import triton_side

    dt = getattr(torch, dtype)
    bsz, n, d, kw = 32, 197, 768, 24
    dev = torch.device("cuda")
    grad = torch.randn(bsz, n, d, device=dev, dtype=dt)
    taps = torch.randn(bsz, n, kw, device=dev, dtype=dt) * 0.3
    ups = torch.randn(d, kw, device=dev, dtype=dt) * 0.3
    w = torch.randn(d, 1, k, k, device=dev, dtype=dt) * 0.3 if k else None
    grid = (14, 14) if k else (0, 0)
    triton_side.side_bwd(grad, taps, ups, w, *grid, 1 if k else 0, 100.0)  # compile, warm
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    outs = triton_side.side_bwd(grad, taps, ups, w, *grid, 1 if k else 0, 100.0)
    torch.cuda.synchronize()
    out_bytes = sum(o.numel() * o.element_size() for o in outs)
    extra = torch.cuda.max_memory_allocated(dev) - before - out_bytes
    assert extra <= 0.10 * grad.numel() * grad.element_size(), extra


@pytest.mark.gpu
def test_triton_gpu_launches_on_tensor_device():
    """Kernels run on the inputs' device, not on the current device."""
    _need_gpu()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from dtl_kernels.ops import reference, triton_side

    case = GPU_CASES["vit-b-dtl+k3-fp32"]
    y, taps, ups, w, grad = _inputs(case)
    with torch.cuda.device(0):
        ours = _run(triton_side.side_add, case, torch.float32, y, taps, ups, w, grad, "cuda:1")
        ref = _run(reference.side_add, case, torch.float32, y, taps, ups, w, grad, "cuda:1")
    for o, r in zip(ours, ref, strict=True):
        assert o.device == torch.device("cuda:1")
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
