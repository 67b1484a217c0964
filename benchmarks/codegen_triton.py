"""Ahead-of-time compiles of the Triton side-op kernels, exactly as the launchers call them.

No GPU: the launchers (``triton_side.side_fwd`` / ``side_bwd``) run on fake CUDA tensors
(``FakeTensorMode``) with their kernel launch replaced by a recorder, so every launch
brings its kernel, grid, runtime arguments and constexprs as the real code would pass
them (tiles from ``plan()``, dtype and stride constants from the launchers). Each launch
is then specialised as Triton's JIT would (``native_specialize_impl``: unit ints become
constants, 16-divisible ints and pointers get ``tt.divisibility``; tensors are assumed
16-byte aligned, as fresh allocations are), compiled with ``triton.compile`` for the
target, and its PTX assembled again with Triton's own ``ptxas -v`` (same flags, same
cubin) for registers and spills.
"""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch


@dataclass
class Launch:
    kernel: str  # the @triton.jit function's name
    grid: tuple
    args: tuple  # positional runtime arguments (fake tensors, ints, floats)
    constexprs: dict  # keyword arguments: constexprs and num_warps / num_stages


class _Ptr:
    """A stand-in for a tensor argument: its dtype and an aligned address."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20


def capture_launches(case: dict, y_dtype: torch.dtype, side_dtype: torch.dtype) -> list[Launch]:
    """The kernel launches of one forward and one backward of ``case`` (keys B, N, d, K,
    k, prefix, grid) with ``y`` / ``grad_out`` / ``conv_weight`` in ``y_dtype`` and
    ``taps`` / ``ups`` in ``side_dtype``. Raises the launchers' own ``TypeError`` when they
    refuse the dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dtl_kernels.ops import triton_side as ts

    launches: list[Launch] = []

    def record(cfg, args, consts):
        # what ts._launch passes: kernel[grid](*args, *cfg["args"], **meta, **consts)
        full = (*args, *cfg["args"])
        launches.append(Launch(cfg["kernel"], tuple(cfg["grid"]), full, {**cfg["meta"], **consts}))

    k = case["k"]
    gh, gw = case["grid"] if k else (0, 0)
    prefix = case["prefix"] if k else 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ts, "_launch", record))
        stack.enter_context(mock.patch.object(ts, "_device_of", lambda x: contextlib.nullcontext()))
        stack.enter_context(mock.patch.dict(ts._SM_COUNT, {0: case.get("sms", 132)}))
        stack.enter_context(FakeTensorMode())
        dev = torch.device("cuda:0")
        bsz, n, d, kw = case["B"], case["N"], case["d"], case["K"]
        y = torch.empty(bsz, n, d, device=dev, dtype=y_dtype)
        taps = torch.empty(bsz, n, kw, device=dev, dtype=side_dtype)
        ups = torch.empty(d, kw, device=dev, dtype=side_dtype)
        w = torch.empty(d, 1, k, k, device=dev, dtype=y_dtype) if k else None
        ts.side_fwd(y, taps, ups, w, gh, gw, prefix, 100.0)
        ts.side_bwd(y, taps, ups, w, gh, gw, prefix, 100.0)
    return launches


def specialise(fn, launch: Launch, backend):
    """(signature, constexprs, attrs, options) of a launch, as Triton's JIT builds them."""
    from triton._C.libtriton import native_specialize_impl

    consts = dict(launch.constexprs)
    options = {o: consts.pop(o) for o in ("num_warps", "num_stages") if o in consts}
    sig, attrs = {}, {}
    positional = dict(zip(fn.arg_names, launch.args, strict=False))
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        value = positional[name]
        if isinstance(value, torch.Tensor):
            value = _Ptr(value.dtype)
        kind, key = native_specialize_impl(backend, value, False, True, True)[:2]
        sig[name] = kind
        if kind == "constexpr":
            consts[name] = key
        elif isinstance(key, str) and key:
            attrs[(i,)] = backend.parse_attr(key)
    return sig, consts, attrs, options


def shift_regions(path: Path) -> list[tuple[str, int, int]]:
    """(file name, first, last line) of each ``for a in …(KSIZE)`` loop in the Triton
    source: the per-shift loops of the DTL+ kernels (unrolled or not)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.For)
            and isinstance(node.target, ast.Name)
            and node.target.id == "a"
            and "KSIZE" in ast.unparse(node.iter)
        ):
            out.append((path.name, node.lineno, node.end_lineno))
    return sorted(out, key=lambda r: r[1])


def tool(name: str) -> str:
    """Path of a CUDA tool that ships with this Triton (ptxas, nvdisasm, cuobjdump)."""
    from triton import knobs

    return getattr(knobs.nvidia, name.replace("-", "_")).path


def tool_version(name: str) -> str:
    """``12.8.93`` from the tool's ``--version``."""
    text = subprocess.run([tool(name), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", text)
    return m.group(1) if m else "?"


@dataclass
class Compiled:
    ptx: str
    cubin: bytes
    ttir: str
    shared: int  # dynamic shared memory bytes Triton asks for at launch
    ptxas_log: str
    cubin_match: bool  # ptxas -v gave Triton's cubin, byte for byte
    sass: str


def compile_launch(launch: Launch, arch: int, workdir: Path) -> Compiled:
    """Compile one launch for ``sm_<arch>`` (``a`` suffix from 90 on, as Triton does)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from dtl_kernels.ops import triton_kernels

    fn = getattr(triton_kernels, launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    sig, consts, attrs, options = specialise(fn, launch, make_backend(target))
    c = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
    gpu = f"sm_{arch}{'a' if arch >= 90 else ''}"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(c.asm["ptx"])
        # Triton's own ptxas command (compiler.py make_cubin), which prints what we need
        log = subprocess.run(
            [tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        ours = cubin.read_bytes()
        cubin.write_bytes(c.asm["cubin"])
        sass = subprocess.run(
            [tool("nvdisasm"), "-c", "-gi", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return Compiled(
        ptx=c.asm["ptx"],
        cubin=c.asm["cubin"],
        ttir=c.asm["ttir"],
        shared=int(c.metadata.shared),
        ptxas_log=log,
        cubin_match=ours == c.asm["cubin"],
        sass=sass,
    )
