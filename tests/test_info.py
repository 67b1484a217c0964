"""``python -m dtl_kernels.info`` runs in a fresh interpreter and lists every backend."""

from __future__ import annotations

import subprocess
import sys

from dtl_kernels.ops import _ext


def test_info_lists_the_backends():
    proc = subprocess.run(
        [sys.executable, "-m", "dtl_kernels.info"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dtl_kernels" in out and "torch" in out
    for backend in ("reference", "cpu", "triton", "cuda"):
        assert f"  {backend} " in out, f"backend {backend!r} not listed:\n{out}"
    cpu_line = next(line for line in out.splitlines() if line.strip().startswith("cpu "))
    assert ("built" in cpu_line) and (("NOT BUILT" in cpu_line) != _ext.cpu_built())
    cuda_line = next(line for line in out.splitlines() if line.strip().startswith("cuda "))
    assert ("NOT BUILT" in cuda_line) != _ext.cuda_built()
    assert "GPU visible:" in out
    assert "cpu tensors  ->" in out


def test_import_does_not_initialise_cuda():
    code = "import torch, dtl_kernels, dtl_kernels.info; print(torch.cuda.is_initialized())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
