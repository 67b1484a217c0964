"""Loading of the compiled extensions and what each backend needs to run.

Importing ``dtl_kernels._C`` runs its ``TORCH_LIBRARY`` registrations (the op schemas,
their autograd and the step); one of ``dtl_kernels._C_cpu*`` (the widest instruction-set
variant this CPU runs) adds the CPU kernels, ``dtl_kernels._C_cuda`` the CUDA kernels. None
touches a GPU at import. A missing extension is recorded, not raised: the reference backend
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
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
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
    return f"{name} cannot be used: {reason}"


def _warn(reason: str | None) -> str | None:
    """Built but unusable here: say so loudly, once (auto falls back to slower backends)."""
    if reason and "cannot be used" in reason:
        warnings.warn(f"dtl_kernels: {reason}", RuntimeWarning, stacklevel=3)
    return reason


# CPU kernel variants, widest first: (module, instructions it needs as /proc/cpuinfo names them)
CPU_VARIANTS = (
    ("_C_cpu_avx512", {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma"}),
    ("_C_cpu_avx2", {"avx2", "fma", "f16c", "bmi2"}),
    ("_C_cpu", set()),
)


def cpu_variant_order() -> list[str]:
    """The CPU variants this machine can run, widest first. ``DTL_KERNELS_CPU_VARIANT``
    (``avx512`` / ``avx2`` / ``default``) caps the choice, as ``ATEN_CPU_CAPABILITY`` does
    for torch; torch's own capability caps it too (so both use the same vector width).
    A ``-march=native`` build has one, ``_C_cpu``: wider ones left in the folder by an
    earlier portable build are stale (built beside another ``_C``), never imported."""
    if (_build_check.build_info() or {}).get("native_isa"):
        return ["_C_cpu"]
    flags = _build_check.cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability().upper()
    cap = os.environ.get("DTL_KERNELS_CPU_VARIANT", "").strip().lower()
    allowed = {"avx512": 0, "avx2": 1, "default": 2}.get(cap, 0)
    if not capability.startswith("AVX512"):
        allowed = max(allowed, 1 if capability.startswith("AVX2") else 2)
    return [
        name
        for i, (name, needs) in enumerate(CPU_VARIANTS)
        if i >= allowed and (not needs or (flags is not None and needs <= flags))
    ]


def _import_cpu() -> tuple[str | None, str | None]:
    """(the imported variant, None) or (None, why none could be imported). The op schemas
    (``_C``) first, then exactly one kernel variant: each registers the same kernels."""
    core = _try_import("dtl_kernels._C")
    if core is not None:
        return None, _warn(core)
    reasons = []
    for name in cpu_variant_order():
        err = _try_import(f"dtl_kernels.{name}")
        if err is None:
            return name, None
        reasons.append(err)
    unusable = [r for r in reasons if "cannot be used" in r]
    return None, _warn(unusable[0] if unusable else "dtl_kernels._C_cpu is not built")


CPU_VARIANT, CPU_ERROR = _import_cpu()
# Everything compiled counts on the CPU extension (the schemas and one kernel variant): the
# fakes, the step and the CUDA op's availability are keyed on cpu_built()
CUDA_ERROR = (
    "the CPU extension is missing" if CPU_ERROR else _warn(_try_import("dtl_kernels._C_cuda"))
)


def _import_binding():
    """``dtl_kernels._C_bind`` (a direct entry to ``side_step``, ``csrc/bind``), or None
    with the reason: without it every call goes through ``torch.ops``, only slower.
    ``DTL_KERNELS_DIRECT=0`` (or ``false`` / ``no`` / ``off``), read at import, leaves it
    out (to compare, or to rule it out)."""
    if CPU_ERROR:
        return None, "the CPU extension is missing"
    if os.environ.get("DTL_KERNELS_DIRECT", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "left out (DTL_KERNELS_DIRECT=0)"
    err = _try_import("dtl_kernels._C_bind")
    return (None, err) if err else (importlib.import_module("dtl_kernels._C_bind"), None)


BINDING, BINDING_ERROR = _import_binding()


def cpu_built() -> bool:
    return CPU_ERROR is None


def cuda_built() -> bool:
    return CUDA_ERROR is None


def cpu_bf16_dot() -> bool:
    """Whether the CPU kernels rebuild ``h`` from bf16 taps and ups with AVX512-BF16's
    ``vdpbf16ps`` (``csrc/cpu/bf16_dot.h``): in the AVX-512 variant, on a CPU that has it,
    unless ``DTL_KERNELS_CPU_BF16_DOT=0`` (read by the kernels at their first such call)."""
    return _cpu_module_says("bf16_dot")


def cpu_bf16_dot_built() -> bool:
    """Whether the loaded CPU variant was compiled with those kernels (the AVX-512 variant,
    by GCC ≥ 12 or clang ≥ 14), whatever this CPU runs."""
    return _cpu_module_says("bf16_dot_built")


def _cpu_module_says(question: str) -> bool:
    if CPU_ERROR:
        return False
    return bool(getattr(importlib.import_module(f"dtl_kernels.{CPU_VARIANT}"), question)())


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
