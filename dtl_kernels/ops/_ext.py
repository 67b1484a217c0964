"""Loading of the compiled extensions and what each backend needs to run.

Importing ``dtl_kernels._C`` runs its ``TORCH_LIBRARY`` registrations (the op schemas
and the CPU kernels); ``dtl_kernels._C_cuda`` adds the CUDA kernels. Neither touches a
GPU at import. A missing extension is recorded, not raised: the reference backend
always works, and asking for a missing backend raises :class:`BackendUnavailable`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from .. import _build_check

BUILD_HINT = (
    "rebuild the package with `pip install --no-build-isolation -e .` (see README, 'Install')"
)


class BackendUnavailable(RuntimeError):
    """A backend was requested that is not built or cannot run here."""


def _try_import(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return f"{name} is not built"
    reason = _build_check.mismatch(
        _build_check.build_info(), torch.__version__, _build_check.cpu_flags()
    )
    if reason is None:
        try:
            importlib.import_module(name)
            return None
        except ImportError as exc:  # e.g. an undefined symbol of another torch
            reason = f"{type(exc).__name__}: {exc}; {_build_check.REBUILD}"
    # built but unusable here: say so loudly once (auto falls back to slower backends)
    warnings.warn(f"dtl_kernels: {name} cannot be used: {reason}", RuntimeWarning, stacklevel=2)
    return reason


CPU_ERROR = _try_import("dtl_kernels._C")
CUDA_ERROR = "the CPU extension is missing" if CPU_ERROR else _try_import("dtl_kernels._C_cuda")


def cpu_built() -> bool:
    return CPU_ERROR is None


def cuda_built() -> bool:
    return CUDA_ERROR is None


def cuda_module():
    """The imported CUDA extension module (its shape queries), or None when not built."""
    if CUDA_ERROR:
        return None
    return importlib.import_module("dtl_kernels._C_cuda")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (for tests here, slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_cpu() -> None:
    if CPU_ERROR:
        raise BackendUnavailable(f"the CPU extension is not built ({CPU_ERROR}); {BUILD_HINT}")


def require_cuda() -> None:
    if CUDA_ERROR:
        raise BackendUnavailable(
            f"the CUDA extension is not built ({CUDA_ERROR}); it needs a CUDA toolkit and a CUDA "
            f"build of PyTorch: {BUILD_HINT} with DTL_KERNELS_CUDA=1"
        )
