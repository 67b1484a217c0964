"""benchmarks/bench_memory.py's attribution of saved bytes to the side network: the fused
path runs a training forward from the walk's plan (no ``tap`` / ``add_back`` calls), and
its CSN bytes must still be counted (they once read 0 MB there)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import SavedBytes, measure  # noqa: E402

from dtl_kernels import create_model  # noqa: E402
from dtl_kernels import csn as csn_module  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def _model(method: str, backend: str):
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16_224", method=method, num_classes=3, adapt_from=3, **TINY)
    m.csn.backend = backend
    with torch.no_grad():
        for p in m.csn.up.values():
            p.normal_(0, 0.02)
    return m


@pytest.mark.parametrize("method", ["dtl", "dtl+"])
def test_the_side_networks_bytes_are_counted_on_the_planned_walk(method, monkeypatch):
    images = torch.randn(2, 3, 32, 32)
    planned = []
    real = csn_module.PlannedPass.recorded_step

    def recorded_step(self, *args):
        planned.append(1)
        return real(self, *args)

    monkeypatch.setattr(csn_module.PlannedPass, "recorded_step", recorded_step)
    fused = measure(_model(method, "auto"), images)
    assert planned, "the fused training forward no longer runs from the walk's plan"
    reference = measure(_model(method, "reference"), images)
    assert 0 < fused.csn_only < reference.csn_only  # the fused CSN keeps less, not nothing
    assert fused.total < reference.total


def test_a_side_network_that_runs_past_every_counted_entry_is_refused(monkeypatch):
    monkeypatch.setattr(SavedBytes, "CSN_ENTRIES", ())
    with pytest.raises(RuntimeError, match="through none of"):
        measure(_model("dtl", "auto"), torch.randn(2, 3, 32, 32))
