"""Whether the compiled extensions were built for this machine and this torch.

The build (setup.py) writes ``dtl_kernels/_build_info.json``: the torch version it compiled
against and, when the CPU kernels were compiled with ``-march=native``, the instruction-set
flags of the build machine's CPU. Loading such an extension on a CPU without one of those
instructions would kill the interpreter with SIGILL at the first kernel; loading it under
another torch fails with an undefined symbol or, worse, loads and misbehaves. Both are
checked before the extension is imported, and the reason comes back as one message that
says how to rebuild.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

INFO_FILE = Path(__file__).resolve().parent / "_build_info.json"
REBUILD = "rebuild with `pip install --no-build-isolation -e .` (see README, 'Install')"
# x86 extensions -march=native may use and that CPUs differ in (as /proc/cpuinfo names them)
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
    "avx512dq", "avx512cd", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_flags() -> set[str] | None:
    """This CPU's instruction-set flags (Linux ``/proc/cpuinfo``), or None where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def build_info() -> dict | None:
    try:
        return json.loads(INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def mismatch(info: dict | None, torch_version: str, flags: set[str] | None) -> str | None:
    """Why the extension built as ``info`` cannot load here, or None if it can."""
    if not info:
        return None  # an older build or a copied tree: let the import decide
    built_torch = info.get("torch")
    if built_torch and built_torch.split("+")[0] != torch_version.split("+")[0]:
        return (
            f"the compiled kernels were built against torch {built_torch} but torch "
            f"{torch_version} is installed; {REBUILD}"
        )
    needed = set(info.get("native_isa") or [])
    if needed and flags is not None and platform.machine() in ("x86_64", "AMD64"):
        missing = sorted(needed - flags)
        if missing:
            return (
                f"the CPU kernels were compiled with -march=native on a CPU with "
                f"{', '.join(missing)}, which this CPU lacks (code using them would crash "
                f"with an illegal instruction); {REBUILD}, or build portable code with "
                "DTL_KERNELS_NATIVE=0"
            )
    return None


def write_build_info(torch_version: str, native: bool) -> None:
    """Called by setup.py at build time."""
    flags = cpu_flags() if native else None
    info = {
        "torch": torch_version,
        "native_isa": sorted(f for f in ISA_FLAGS if f in flags) if flags else [],
    }
    INFO_FILE.write_text(json.dumps(info, indent=1) + "\n")
