"""The CPU kernels' bf16 pairs (``csrc/cpu/bf16_dot.h``): where they are used, the switch
that turns them off, and both paths against the float64 reference on the same inputs.
The shared case table (``test_side_backends.py``) runs whichever path this CPU takes."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from side_cases import Case, compare, inputs, references, run_autograd

from dtl_kernels import _build_check
from dtl_kernels.ops import _ext, compiled_side, side

pytestmark = pytest.mark.skipif(
    not compiled_side.available("cpu"), reason="the CPU extension is not built (make build)"
)

# autocast's mix with odd K: d = 200 through the tiles (not a whole chunk), d = 192 in place
# (y / G read and out written from the registers); all-bf16 in place with odd K; DTL+ k = 3
CASES = {
    "mix-tiles": (Case("mix-dtl", 2, 0, (1, 45), 200, 7, side=torch.bfloat16), torch.float32),
    "mix-in-place": (Case("mix-dtl", 2, 0, (1, 45), 192, 7, side=torch.bfloat16), torch.float32),
    "bf16-in-place": (Case("bf16-dtl", 2, 0, (1, 29), 64, 5), torch.bfloat16),
    "bf16-k3": (Case("bf16-k3", 1, 1, (6, 5), 72, 12, 3), torch.bfloat16),
}

RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
from dtl_kernels.ops import _ext
from test_cpu_bf16_dot import CASES, run
torch.save(dict(dot=_ext.cpu_bf16_dot(), out={{n: run(*c) for n, c in CASES.items()}}), {path!r})
"""


def run(case: Case, dtype: torch.dtype) -> list[torch.Tensor]:
    """The CPU kernels' output and gradients on the case's inputs."""
    return run_autograd(functools.partial(side.side_add, backend="cpu"), case, dtype,
                        inputs(case))  # fmt: skip


def gcc_at_least_12() -> bool | None:
    """Whether ``c++`` (what torch's extension build calls) is GCC 12 or newer; None when
    that cannot be told."""
    try:
        out = subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=30)
        version = subprocess.run(["c++", "-dumpfullversion"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if "clang" in out.stdout.lower() or not version[:1].isdigit():
        return None
    return int(version.split(".")[0]) >= 12


def test_bf16_pairs_are_used_where_the_cpu_has_them():
    """Built into the AVX-512 variant (or a native build on an AVX-512 CPU) only; used
    where it is built, the CPU has AVX512-BF16 and DTL_KERNELS_CPU_BF16_DOT does not say
    0 / false / no / off."""
    flags = _build_check.cpu_flags() or set()
    native = bool((_build_check.build_info() or {}).get("native_isa"))
    wide = _ext.CPU_VARIANT == "_C_cpu_avx512" or (native and "avx512f" in flags)
    built = _ext.cpu_bf16_dot_built()
    assert not built or wide
    if wide and gcc_at_least_12():
        assert built  # what this project's machines build it with
    env = os.environ.get("DTL_KERNELS_CPU_BF16_DOT", "").strip().lower()
    off = env in ("0", "false", "no", "off")
    assert _ext.cpu_bf16_dot() == (built and "avx512_bf16" in flags and not off)


def test_both_paths_match_the_reference(tmp_path):
    """The path this process takes and the float32 path (``DTL_KERNELS_CPU_BF16_DOT=0``, in
    a process of its own: the kernels read it once) on the same inputs, each against the
    float64 reference by the shared accuracy rule."""
    path = tmp_path / "off.pt"
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DTL_KERNELS_CPU_BF16_DOT="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH", "")) if p)
    got = subprocess.run([sys.executable, "-c", RUN.format(tests=tests, path=str(path))],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert got.returncode == 0, got.stderr[-3000:]
    off = torch.load(path)
    assert off["dot"] is False
    for name, (case, dtype) in CASES.items():
        exact, at_dtype = references(case, dtype, inputs(case))
        for label, result in (
            ("this process", run(case, dtype)),
            ("float32 path", off["out"][name]),
        ):
            ok, report = compare(case, dtype, result, exact, at_dtype)
            assert ok, (name, label, report)
