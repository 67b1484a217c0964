"""Ahead-of-time compiles of the CUDA C++ side-op kernels (csrc/cuda), no GPU needed.

* ``compile_tu``: one kernel translation unit (``side_<dtype>.cu``) to a cubin with
  ``nvcc -gencode=arch=compute_90a,code=sm_90a -Xptxas -v``, with setup.py's nvcc flags
  and include paths (torch's headers and the nvidia-* wheel headers, found by setup.py's
  own ``_nvidia_wheel_includes``), and its SASS (``nvdisasm -c -gi``).
* ``launches``: which kernels the op launches for a shape, with grid, threads and dynamic
  shared memory, from the GPU's plan and launch sequence (``codegen_cuda_launches.cpp``,
  built as host code).
* ``shift_regions``: the source lines of the per-shift code (the depthwise k×k loops).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
# the translation unit that instantiates the kernels for each dtype
TU = {"fp32": "side_f32.cu", "bf16": "side_bf16.cu", "fp16": "side_f16.cu", "fp64": "side_f64.cu"}
LAUNCH_DTYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "fp64": "f64"}
# setup.py's nvcc flags (less -Xfatbin=-compress-all: a cubin is no fat binary), plus what
# torch's CUDAExtension adds (COMMON_NVCC_FLAGS, names)
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]
EXT_DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C_cuda"]
# (marker, …) of the per-shift code in side_kernels.cuh: each marker's brace block
SHIFT_MARKERS = {
    "side_kernels.cuh": (
        "__device__ void conv_tile(",  # the k×k window of every conv kernel
        "for (int p = p0; p < p1; ++p)",  # ∂w[ab] += θ(h)·G[p − s_ab] in du_conv_kernel
    )
}


def cuda_home() -> Path | None:
    """The toolkit root: CUDA_HOME, else /usr/local/cuda, else nvcc's place on PATH."""
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return Path(cand)
    nvcc = shutil.which("nvcc")
    return Path(os.path.realpath(nvcc)).parents[1] if nvcc else None


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else "?"


def _setup_function(name: str):
    """A function of setup.py (which cannot be imported: it runs setup())."""
    import glob
    import site
    import sys

    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(glob=glob, os=os, site=site, sys=sys)
    exec(compile(ast.Module([node], []), "setup.py", "exec"), scope)
    return scope[name]


def _cpp_extension():
    """torch.utils.cpp_extension, without its warning that no CUDA runtime is found (none
    is needed to compile)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    return cpp_extension


def include_dirs() -> list[str]:
    """torch's headers and the nvidia-* wheel headers, as setup.py builds with (nvcc adds
    the toolkit's own)."""
    return _cpp_extension().include_paths("cpu") + _setup_function("_nvidia_wheel_includes")()


def compile_tu(dtype: str, nvcc: Path, nvdisasm: str, workdir: Path, arch: int = 90):
    """Compile ``TU[dtype]`` for sm_<arch>a (sm_<arch> below 90, which has no "a" targets);
    returns (ptxas log, SASS text, cubin path)."""
    src = CUDA_DIR / TU[dtype]
    sm = f"{arch}a" if arch >= 90 else str(arch)
    cubin = workdir / f"{src.stem}.sm_{sm}.cubin"
    cmd = [
        str(nvcc),
        "-cubin",
        f"-gencode=arch=compute_{sm},code=sm_{sm}",
        *NVCC_FLAGS,
        *_common_nvcc_flags(),
        *EXT_DEFINES,
        "-Xptxas",
        "-v",
        *(f"-I{d}" for d in include_dirs()),
        str(src),
        "-o",
        str(cubin),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}")
    sass = subprocess.run(
        [nvdisasm, "-c", "-gi", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    return proc.stderr + proc.stdout, sass, cubin


def _common_nvcc_flags() -> list[str]:
    return list(_cpp_extension().COMMON_NVCC_FLAGS)


def build_launch_recorder(workdir: Path) -> Path:
    """Build codegen_cuda_launches.cpp (host code: plan + launch sequence, no kernels run)."""
    import torch

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("needs a C++20 compiler (g++ / c++)")
    exe = workdir / "codegen_cuda_launches"
    torch_inc = Path(torch.__file__).parent / "include"
    cmd = [
        cxx, "-std=c++20", "-O0", "-pthread", "-rdynamic",
        f"-I{ROOT / 'tests' / 'cuda_emu'}", f"-I{CUDA_DIR}", f"-I{torch_inc}",
        str(Path(__file__).with_name("codegen_cuda_launches.cpp")), "-o", str(exe), "-ldl",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the launch recorder does not build:\n{proc.stderr[-4000:]}")
    return exe


def launches(exe: Path, case: dict, dtype: str, sms: int = 132, smem_limit: int = 227 * 1024):
    """[(mangled kernel, dynamic smem, grid CTAs, threads)] of one forward + backward, each
    kernel once (the first launch: ``sum_partials`` runs for ∂U and for ∂w).
    ``smem_limit``: the opt-in shared memory per block of an H100 / H200 (227 KB)."""
    k = case["k"]
    gh, gw = case["grid"] if k else (0, 0)
    args = [case["B"], case["N"], case["d"], case["K"], k, case["prefix"] if k else 0, gh, gw]
    args += [LAUNCH_DTYPE[dtype], sms, smem_limit]
    out = subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, check=True
    ).stdout
    seen, rows = set(), []
    for line in out.splitlines():
        name, smem, gx, gy, threads = line.split()
        if name not in seen:
            seen.add(name)
            rows.append((name, int(smem), int(gx) * int(gy), int(threads)))
    return rows


def pretty(mangled: str) -> str:
    """``_ZN3dtl9cuda_side14du_conv_kernelIfLi5EEE…`` → ``du_conv_kernel<5>``."""
    m = re.match(r"_ZN3dtl9cuda_side(\d+)", mangled)
    if not m:
        return mangled
    start = m.end()
    name = mangled[start : start + int(m.group(1))]
    ks = re.search(r"Li(\d+)EEEv", mangled)
    return f"{name}<{ks.group(1)}>" if ks else name


def _block_end(lines: list[str], start: int) -> int:
    """Index of the line that closes the first brace block opening at or after ``start``."""
    depth, opened = 0, False
    for i in range(start, len(lines)):
        code = lines[i].split("//")[0]
        for ch in code:
            if ch == "{":
                depth, opened = depth + 1, True
            elif ch == "}":
                depth -= 1
                if opened and depth == 0:
                    return i
    return len(lines) - 1


def shift_regions() -> list[tuple[str, int, int]]:
    """(file name, first, last line) of each SHIFT_MARKERS block (1-based lines)."""
    out = []
    for name, markers in SHIFT_MARKERS.items():
        lines = (CUDA_DIR / name).read_text().splitlines()
        for marker in markers:
            hits = [i for i, line in enumerate(lines) if marker in line]
            if not hits:
                raise RuntimeError(f"{name}: no line holds the shift-loop marker {marker!r}")
            out.append((name, hits[0] + 1, _block_end(lines, hits[0]) + 1))
    return out
