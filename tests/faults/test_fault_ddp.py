"""DDP: rank 0 fails while building the disk trunk cache (the others wait for it). Every
rank must stop promptly with a clear error naming rank 0's failure — not hang at a
barrier until the job is killed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from fault_kit import flags, options

FAIL_ON_RANK_0 = """
import errno, os, sys
from dtl_kernels.train import cache
def build_disk(self, folder):
    if os.environ["RANK"] == "0":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
cache.TrunkCache.build_disk = build_disk
from dtl_kernels.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
def test_rank0_cache_build_failure_reaches_every_rank(toy, tmp_path):
    argv = flags(options(toy, tmp_path / "out", cache_trunk="disk", ddp_timeout=120))
    port, procs = free_port(), []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(FAIL_ON_RANK_0), *argv],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    t0 = time.time()
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.time() - t0 < 90
    errors = [err for _, err in results]
    assert [p.returncode for p in procs] == [1, 1], errors
    assert "No space left on device (injected)" in errors[0]
    assert "rank 0 failed while building the disk trunk cache" in errors[1]
    assert "Traceback" not in errors[0] + errors[1]
