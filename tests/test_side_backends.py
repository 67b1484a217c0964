"""Every in-process backend of the side op against the float64 reference, over the one
case table (``side_cases.py``), forward and every gradient, through
``side.side_add(..., backend=…)`` and its autograd.

``cpu`` runs here; ``cuda`` and ``triton`` need a GPU (skipped without one). Triton on CPU
tensors (the interpreter) and the CUDA kernels built as host code run the same table in
``test_side_triton.py`` and ``test_side_cuda.py``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from side_cases import CASES, SWEEP_DTYPES, compare, inputs, references, run_autograd

from dtl_kernels.ops import side
from dtl_kernels.ops.contract import SideArgs

DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}
# every case in every dtype; the mixed ones (float32 y, 16-bit taps) in float32 only
SWEEP = [
    pytest.param(case, dtype, id=f"{case.name}-{str(dtype)[6:]}")
    for case in CASES
    for dtype in SWEEP_DTYPES
    if case.side is None or dtype == torch.float32
]


def _need(backend: str) -> None:
    if DEVICE[backend] == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"the {backend} backend needs a CUDA GPU (none visible)")
    probe = torch.empty(0, device=DEVICE[backend])
    if not side.BACKENDS[backend].runs(probe):
        pytest.skip(side.BACKENDS[backend].why_not(probe))
    if DEVICE[backend] == "cuda":  # an exact float32 reference (cuDNN defaults to TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _check(backend: str, case, dtype) -> None:
    _need(backend)
    device = DEVICE[backend]
    values = inputs(case)
    if backend == "cuda":
        low = [t.to(device, dtype) if t is not None else None for t in values]
        y, taps, ups, w, _ = low
        args = SideArgs.of(y, taps, ups, case.beta, w, case.conv_grid, case.num_prefix, check=False)
        if not side.BACKENDS["cuda"].fits(args):
            # beyond this GPU's shared memory (K = 128, k = 7 in float64 on an H100): a clear
            # error, never a launch, and `auto` picks another backend
            with pytest.raises(RuntimeError, match="shared memory"):
                torch.ops.dtl_kernels.side_forward(*args.kernel_args())
            with pytest.MonkeyPatch.context() as mp:
                mp.delenv("DTL_KERNELS_BACKEND", raising=False)
                assert side.select(low[0], "auto", args) != "cuda"
            return
    exact, at_dtype = references(case, dtype, values, device)
    ours = run_autograd(
        functools.partial(side.side_add, backend=backend), case, dtype, values, device
    )
    ok, report = compare(case, dtype, ours, exact, at_dtype)
    assert ok, json.dumps(report, indent=1)


@pytest.mark.parametrize("case, dtype", SWEEP)
def test_cpu_matches_reference(case, dtype):
    _check("cpu", case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case, dtype", SWEEP)
def test_gpu_matches_reference(case, dtype, backend):
    _check(backend, case, dtype)
