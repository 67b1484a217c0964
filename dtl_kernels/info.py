"""``python -m dtl_kernels.info``: versions, built backends, and which backend runs.

Never initialises CUDA unless a GPU is actually usable (``torch.cuda.is_available()``
is only called here, at run time, not at import of the package)."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .ops import _ext
from .ops.side import resolve_backend


def report() -> str:
    lines = [
        f"dtl_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'no'})",
    ]
    try:
        import timm

        lines.append(f"timm {timm.__version__}")
    except ImportError:
        lines.append("timm: not installed")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import _build_check

    built = _build_check.build_info()
    if built:
        isa = built.get("native_isa")
        lines.append(
            f"built against torch {built.get('torch')}; CPU kernels "
            + (
                f"for this build machine's CPU (-march=native: {', '.join(isa)})"
                if isa
                else "portable (no -march=native)"
            )
        )
    lines.append("backends:")
    lines.append("  reference  available (pure PyTorch)")
    lines.append(
        "  cpu        "
        + (
            f"built (kernel variant {_ext.CPU_VARIANT}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 taps and ups "
            + ("with AVX512-BF16's dot product)" if _ext.cpu_bf16_dot() else "as float32)")
            if _ext.cpu_built()
            else "NOT BUILT: " + str(_ext.CPU_ERROR)
        )
    )
    lines.append(
        "  triton     "
        + (f"importable (triton {triton_version})" if triton_version else "triton not installed")
        + (", TRITON_INTERPRET=1" if _ext.triton_interpret() else "")
    )
    lines.append(
        f"  cuda       {'built' if _ext.cuda_built() else 'NOT BUILT: ' + str(_ext.CUDA_ERROR)}"
    )
    lines.append(
        "  binding    "
        + ("built (side_step called directly)" if _ext.BINDING else
           "NOT BUILT (side_step goes through torch.ops, slower): " + str(_ext.BINDING_ERROR))
    )  # fmt: skip
    gpu = torch.cuda.is_available()
    lines.append(f"GPU visible: {torch.cuda.get_device_name(0) if gpu else 'no'}")
    lines.append("side op backend used:")
    lines.append(f"  cpu tensors  -> {resolve_backend(torch.empty(0))}")
    if gpu:
        lines.append(f"  cuda tensors -> {resolve_backend(torch.empty(0, device='cuda'))}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
