"""Build of dtl_kernels: the CPU extension always, the CUDA extension when possible.

Install with ``pip install --no-build-isolation .`` (the build needs the installed torch).

Environment switches:
    DTL_KERNELS_CUDA=auto|0|1   auto (default): build the CUDA ops when a toolkit and a CUDA
                                build of PyTorch are present; 0: skip; 1: required (error if
                                impossible).
    DTL_KERNELS_NATIVE=0|1      0 (default): build the CPU kernels three times — x86-64
                                baseline, AVX2 and AVX-512 — and pick the widest this CPU
                                runs at import (as ATen does); 1: one build with
                                -march=native for this machine only (refused elsewhere).
                                Only the kernels are built per variant: the op schemas,
                                autograd and step (dispatcher calls only) are built once.
    TORCH_CUDA_ARCH_LIST        CUDA archs; defaults to "8.0;9.0+PTX" (no GPU is queried; the
                                PTX lets newer GPUs compile the kernels at load time).
    CUDA_HOME                   toolkit root; defaults to /usr/local/cuda when it exists.
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_mode() -> str:
    mode = os.environ.get("DTL_KERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"DTL_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _default_cuda_home() -> None:
    """PyTorch guesses the CUDA home from nvcc's place on PATH, which can be a wrapper
    script; prefer an explicit CUDA_HOME, else the conventional toolkit root."""
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        for candidate in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = candidate
                return
        nvcc = shutil.which("nvcc")
        if nvcc:
            os.environ["CUDA_HOME"] = str(Path(os.path.realpath(nvcc)).parent.parent)


def _nvidia_wheel_includes() -> list[str]:
    """Library headers (cusparse.h, cublas_v2.h, …) that PyTorch's CUDA headers include
    and that ship in the nvidia-* wheels rather than in the toolkit."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in found and os.path.isdir(inc):
                found.append(inc)
    return found


# The CPU kernels' instruction-set variants (module name → compiler flags): the kernels pick
# their at::vec width from these flags; dtl_kernels/ops/_ext.py imports the widest one this
# CPU runs (torch's own CPU capability, checked against /proc/cpuinfo).
CPU_VARIANTS = {
    "_C_cpu": [],
    "_C_cpu_avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "_C_cpu_avx512": ["-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mavx512f", "-mavx512bw",
                  "-mavx512dq", "-mavx512vl", "-mavx512cd"],
}  # fmt: skip


def _native() -> bool:
    return os.environ.get("DTL_KERNELS_NATIVE", "0") != "0"


def _variant_sources(name: str, sources: list[str]) -> list[str]:
    """Per-variant copies of the CPU sources' names (one-line files that #include the real
    ones), so that each variant's objects get their own paths and flags."""
    if name == "_C_cpu":
        return sources
    folder = ROOT / "build" / "cpu_variants" / name
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources:
        wrapper = folder / src.replace("/", "__")
        text = f'#include "{(ROOT / src).as_posix()}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        out.append(str(wrapper.relative_to(ROOT)))
    return out


def _extensions():
    mode = _cuda_mode()
    if mode != "0":
        _default_cuda_home()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    import torch
    from torch.utils import cpp_extension

    # -g0: Python's own CFLAGS carry -g, and torch's templates' debug information made the two
    # objects timed alone 27-33x larger and 1.6-1.7x slower to compile (the build is most of
    # `make test`)
    cxx_flags = ["-O3", "-std=c++20", "-g0"]
    # the op schemas, their autograd and the step (dispatcher calls only): built once
    exts = [
        cpp_extension.CppExtension(
            "dtl_kernels._C",
            ["csrc/module.cpp", "csrc/ops.cpp", "csrc/autograd.cpp", "csrc/step.cpp"],
            extra_compile_args={"cxx": cxx_flags},
        )
    ]
    # the CPU kernels, once per instruction-set variant
    cpu_sources = ["csrc/cpu/module.cpp"] + sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "csrc" / "cpu").glob("*.cpp")
        if p.name != "module.cpp"
    )
    variants = {"_C_cpu": ["-march=native"]} if _native() else CPU_VARIANTS
    exts += [
        cpp_extension.CppExtension(
            f"dtl_kernels.{name}",
            _variant_sources(name, cpu_sources),
            extra_compile_args={
                "cxx": cxx_flags + ["-fopenmp"] + flags + [f"-DDTL_CPU_MODULE={name}"]
            },
            extra_link_args=["-fopenmp"],
        )
        for name, flags in variants.items()
    ]
    # the direct Python entries to the ops, the launcher bridge and the launchers' allocations
    # (any variant's: they only call the dispatcher)
    exts.append(
        cpp_extension.CppExtension(
            "dtl_kernels._C_bind",
            [
                f"csrc/bind/{name}.cpp"
                for name in ("module", "step_binding", "launcher_bridge", "launch_buffers")
            ],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-g0"]},
        )
    )
    cuda_home = cpp_extension.CUDA_HOME
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not can_cuda:
        sys.exit(
            "DTL_KERNELS_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}. "
            "Install a CUDA build of PyTorch and a CUDA toolkit, or set DTL_KERNELS_CUDA=0."
        )
    if mode != "0" and can_cuda:
        cuda_sources = ["csrc/cuda/module.cpp"] + sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")
        )
        print(f"dtl_kernels: building CUDA ops with CUDA_HOME={cuda_home}", file=sys.stderr)
        exts.append(
            cpp_extension.CUDAExtension(
                "dtl_kernels._C_cuda",
                cuda_sources,
                include_dirs=_nvidia_wheel_includes(),
                extra_compile_args={
                    "cxx": cxx_flags,
                    # no --use_fast_math: exact expf / division keep the CUDA results within
                    # rounding of the CPU kernels (the same side_math.h). -compress-all: nvcc
                    # compressed only the largest objects' cubins by itself (one dtype
                    # pair's object 16.3 MB as it left them, 3.5 MB compressed)
                    "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-Xfatbin=-compress-all"],
                },
            )
        )
    else:
        print("dtl_kernels: CUDA ops not built (CPU and Triton only)", file=sys.stderr)
    return exts, cpp_extension.BuildExtension


def _write_build_info() -> None:
    """dtl_kernels/_build_info.json: the torch and (with -march=native) the CPU ISA this build
    is for; dtl_kernels/_build_check.py refuses to load the extension elsewhere."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "_build_check", ROOT / "dtl_kernels" / "_build_check.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_build_info(torch.__version__, _native())


def _version() -> str:
    for line in (ROOT / "dtl_kernels" / "_version.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("no __version__ in dtl_kernels/_version.py")


ext_modules, build_ext = _extensions()
_write_build_info()
setup(
    version=_version(),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
