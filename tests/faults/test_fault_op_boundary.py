"""Hostile integer arguments at the op boundary raise instead of crashing the process
(the op's own checks are tested with the op; this is the fault suite's entry)."""

import pytest
import torch

from dtl_kernels.ops import _ext


@pytest.mark.skipif(not _ext.cpu_built(), reason="the CPU extension is not built")
def test_overflowing_grid_argument_raises():
    z = torch.zeros
    with pytest.raises(RuntimeError):
        torch.ops.dtl_kernels.side_forward(
            z(1, 4, 8), z(1, 4, 1), z(8, 1), z(8, 1, 3, 3), 2**62 + 1, 4, 0, 100.0
        )
