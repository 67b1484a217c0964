"""Running ``dtl-train`` as a user would, in a child process (one OpenMP thread)."""

from __future__ import annotations

import os
import subprocess
import sys


def train_cli(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m dtl_kernels.train ARGS`` (``torch.distributed.run`` with ``nproc`` ranks
    when ``nproc > 1``); fails the test with the end of stderr unless it exits 0."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "dtl_kernels.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
