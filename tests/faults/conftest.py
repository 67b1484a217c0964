"""Fixtures of the fault-injection suite (helpers in ``fault_kit.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fault_kit import options
from toy_images import make_toy_folder

from dtl_kernels.train import make_config, run


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every fault test on one intra-op thread (tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """3 classes of 32×32 PNGs: 12 train, 6 test."""
    return make_toy_folder(tmp_path_factory.mktemp("faults-toy"), 12, 6)


@pytest.fixture(scope="session")
def reference(toy, tmp_path_factory) -> Path:
    """An uninterrupted run with the suite's default options (3 epochs)."""
    import warnings

    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test here and the child processes (OMP_NUM_THREADS=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(make_config(options(toy, out)))
    finally:
        torch.set_num_threads(threads)
    return out
