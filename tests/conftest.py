"""Shared test setup: every test starts from the same random state."""

from __future__ import annotations

import random

import pytest
import torch


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
