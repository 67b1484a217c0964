"""Shared test setup: every test starts from the same random state; fixtures that several
test modules use (one intra-op thread, a toy image folder)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers on two cores) every worker, and
    the processes it starts, runs one intra-op thread: two workers of two threads each
    would fight over the cores. Tests of the threaded kernels set their thread counts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The test files that take longest (≥ 12 s each on the 2-core CI machine, `pytest
# --durations` on 2026-12-07), roughly longest first. `make test` hands whole files to its
# two workers in collection order (`--dist loadfile --no-loadscope-reorder`): these go out
# first, the many short files fill in after them, and the workers finish close together.
SLOW_FILES = (
    "test_side_cuda.py", "test_side_triton.py", "test_gpu_check.py", "test_train_cache.py",
    "test_estimate.py", "test_fidelity.py", "test_compile.py", "test_train_run.py",
    "test_adapter_to_prediction.py", "test_triton_launch.py", "test_fault_hostile_weights.py",
    "test_wheel_check.py", "test_models.py", "test_train_fsdp.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors and models: intra-op threads only add overhead (and stall badly when the
    cores are shared), so a module that asks runs on one thread; the setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """3 classes of 32×32 images (12 train / 6 test), an ImageFolder layout."""
    from toy_images import make_toy_folder

    return make_toy_folder(tmp_path_factory.mktemp("toy"), 12, 6)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Fix the Python and torch seeds before each test (restores nothing else)."""
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the package
        pass
    else:
        np.random.seed(0)
    yield
