"""The Triton side op against the reference, on CPU tensors under ``TRITON_INTERPRET=1``.

Triton decides at kernel-definition time whether a kernel is interpreted, and the whole
suite runs in one pytest process, so the interpreted checks run in ONE subprocess with
``TRITON_INTERPRET=1`` set (this file, run as ``python tests/test_side_triton.py
--worker``). It prints one JSON line per check; each pytest test below asserts one line.
The parent process never sets the variable, so other test files are unaffected.

Accuracy rule (flash-attention's): for every output (out, ∂y, ∂taps, ∂ups, ∂w) the
kernel's error against a float64 reference may be at most a small multiple of the error
of the same computation done by the PyTorch reference at the kernel's dtype, plus a floor.
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
# flags: "noncontig" (strided y / taps / ups / grad), "saturated" (|h| ~ 1e3).
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
}
# Extra checks of the worker, beyond accuracy.
EXTRA = ("deterministic", "opcheck-dtl", "opcheck-dtl+", "bad-inputs", "k-zero-width")

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


def _run(fn, case, dtype, y, taps, ups, w, grad, device="cpu"):
    bsz, n, d, kw, beta, k, prefix, grid, _, flags = case
    leaves = [t.detach().to(device, dtype).clone().requires_grad_() if t is not None else None
              for t in (y, taps, ups, w)]
    args = list(leaves)
    g = grad.to(device, dtype)
    if "noncontig" in flags:
        args[0] = _noncontig(args[0], 0)
        args[1] = _noncontig(args[1], 1)
        args[2] = _noncontig(args[2], 2)
        g = _noncontig(g, 0)
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
    for nm, e, o, t in zip(names, exact, ours, torch_lp):
        finite = bool(torch.isfinite(o).all())
        err = (o.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        tol = MULTIPLE * err_torch + FLOOR[case[8]] * max(1.0, e.abs().max().item())
        good = finite and o.dtype == dtype and o.shape == e.shape and err <= tol
        ok &= good
        verdict = "" if good else " FAIL"
        report[nm] = f"err {err:.2e} (torch {err_torch:.2e}, tol {tol:.2e}){verdict}"
    if "saturated" in case[9]:
        report["saturated"] = "theta saturates: |h| max %.0f" % (
            torch.matmul(taps, ups.t()).abs().max().item()
        )
    return ok, report


def _check_extra(name):
    from dtl_kernels.ops import triton_side

    case = CASES["dtl+k4-prefix5-grid4x8"]
    if name == "deterministic":
        y, taps, ups, w, grad = _inputs(case)
        runs = [_run(triton_side.side_add, case, torch.float32, y, taps, ups, w, grad)
                for _ in range(2)]
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        return same, {"bitwise equal over two runs": same}
    if name.startswith("opcheck"):
        k = 3 if name.endswith("+") else 0
        c = (1, 7, 16, 2, 100.0, k, 1 if k else 0, (2, 3) if k else None, "float32", "")
        y, taps, ups, w, grad = _inputs(c)
        args = (y.float().requires_grad_(), taps.float().requires_grad_(),
                ups.float().requires_grad_(), w.float().requires_grad_() if k else None,
                2 if k else 0, 3 if k else 0, c[6], 100.0)
        fwd = torch.ops.dtl_kernels.triton_side_forward.default
        bwd = torch.ops.dtl_kernels.triton_side_backward.default
        res = torch.library.opcheck(fwd, args)
        res2 = torch.library.opcheck(bwd, (grad.float(),) + tuple(
            a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:]))
        ok = all(v == "SUCCESS" for v in list(res.values()) + list(res2.values()))
        return ok, {"forward": res, "backward": res2}
    if name == "bad-inputs":
        y, taps, ups, w, grad = (t.float() if t is not None else None
                                 for t in _inputs(case))
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
    raise KeyError(name)


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
        env=env, capture_output=True, text=True, timeout=900,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["name"]] = row
    if not results:
        pytest.fail(f"the interpreter worker produced nothing (rc {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
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
                op, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "dtl_kernels::triton_side_forward", "Autograd")


def test_cpu_tensors_need_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs with TRITON_INTERPRET=1")
    from dtl_kernels.ops import BackendUnavailable, triton_side

    y = torch.zeros(1, 1, 16)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        triton_side.side_add(y, torch.zeros(1, 1, 2), torch.zeros(16, 2), 100.0)


# The GPU code path compiles without a GPU: Triton's ahead-of-time compiler lowers the
# kernels (JIT flavour, as a GPU run would) to cubin for sm_80 / sm_90, including the
# 16-bit tensor-core dots and the fp64 path that the interpreter does not take.
AOT_CASES = [
    ("fwd", "fp32", 3, 90), ("bwd", "fp32", 3, 90),
    ("fwd", "bf16", 5, 80), ("bwd", "bf16", 5, 90),
    ("bwd", "fp16", 0, 80), ("bwd", "fp64", 4, 80),
]


@pytest.mark.parametrize("kernel,dtype,k,arch", AOT_CASES)
def test_triton_kernels_compile_for_gpu(kernel, dtype, k, arch):
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton interpreted")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dtl_kernels.ops import triton_side

    fn = triton_side._side_fwd_kernel if kernel == "fwd" else triton_side._side_bwd_kernel
    acc = "fp64" if dtype == "fp64" else "fp32"
    ptrs = {"y_ptr", "taps_ptr", "ups_ptr", "w_ptr", "out_ptr", "g_ptr"}
    consts = dict(KSIZE=k, BLOCK_M=64, BLOCK_D=64, BLOCK_K=32,
                  NATIVE_DOT=dtype in ("bf16", "fp16"),
                  ACC=tl.float64 if acc == "fp64" else tl.float32)
    if kernel == "bwd":
        consts["BLOCK_KK"] = triton.next_power_of_2(max(k * k, 1))
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = f"*{dtype}"
        elif name.endswith("_ptr"):  # fp32 / fp64 partial sums
            sig[name] = f"*{acc}"
        else:
            sig[name] = "fp32" if name == "beta" else "i32"
    compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=4))
    assert compiled.asm.get("cubin"), "no cubin produced"


# Same checks on a GPU, compiled (not interpreted), plus ViT-B-sized shapes.
GPU_CASES = dict(CASES)
GPU_CASES.update({
    "vit-b-dtl-fp32": (4, 197, 768, 24, 100.0, 0, 0, None, "float32", ""),
    "vit-b-dtl+k5-bf16": (4, 197, 768, 24, 100.0, 5, 1, (14, 14), "bfloat16", ""),
    "vit-b-dtl+k3-fp16-noncontig": (2, 197, 768, 12, 100.0, 3, 1, (14, 14), "float16",
                                    "noncontig"),
    "swin-dtl+k5-K64": (2, 196, 512, 64, 100.0, 5, 0, (14, 14), "float32", ""),
})


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_gpu(name):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton interpreted")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible): compiled Triton kernels not run here")
    ok, report = _check_case(name, GPU_CASES[name], device="cuda")
    assert ok, json.dumps(report, indent=1)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
