"""benchmarks/bench_host.py's providers: timm's inference baseline is a frozen copy of the
model it trains (the same weights), as every DTL model's backbone is frozen."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_host import Provider  # noqa: E402


def test_timm_infers_on_a_frozen_copy_of_the_model_it_trains():
    p = Provider("timm")
    assert p.infer_model is not p.model
    assert not any(q.requires_grad for q in p.infer_model.parameters())
    assert all(q.requires_grad for q in p.model.parameters())  # its step still trains
    p.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(p.infer_model(p.x), p.model(p.x), rtol=0, atol=0)
    p.infer()
    p.model.train()
    p.step()
    assert len(p.parts) == 1


def test_other_providers_infer_on_their_own_model():
    p = Provider("dtl")
    assert p.infer_model is p.model
